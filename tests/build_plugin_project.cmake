# build_plugin_project(<source dir> <build dir> <how isp is found, e.g. -Disp_DIR=...>): configures and builds an
# out-of-tree plugin project the way a user would, failing the test with the tool's output on any error.
function(build_plugin_project src build find_isp)
  execute_process(COMMAND ${CMAKE_COMMAND} -S ${src} -B ${build} ${find_isp} -DCMAKE_CXX_COMPILER=${CXX}
    -DCMAKE_BUILD_TYPE=RelWithDebInfo RESULT_VARIABLE rc OUTPUT_VARIABLE out ERROR_VARIABLE err)
  if(NOT rc EQUAL 0)
    message(FATAL_ERROR "configuring ${src} (${find_isp}) failed: ${out}${err}")
  endif()
  execute_process(COMMAND ${CMAKE_COMMAND} --build ${build} RESULT_VARIABLE rc OUTPUT_VARIABLE out ERROR_VARIABLE err)
  if(NOT rc EQUAL 0)
    message(FATAL_ERROR "building ${src} failed: ${out}${err}")
  endif()
endfunction()
