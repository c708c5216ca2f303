# One precompiled header for the whole tree: LibTorch's, nlohmann/json's and the standard library's headers,
# parsed once instead of in each of the ~60 translation units that reach torch::nn (a third to a half of such a
# unit's compile time; docs/building.md has the figures). Only third-party headers go in, so editing isp's own headers
# never rebuilds it.
#
# GCC uses a .gch only when the unit's flags match the ones it was built with, and otherwise parses the headers
# again with no more than a -Winvalid-pch warning (which CMake turns on). So there is one OBJECT library whose
# flags are a subset of every user's: position-independent code (-fPIC; executables add -fPIC, since Debian's
# g++ builds them -fPIE otherwise), LibTorch's definitions, no DEFINE_SYMBOL. Definitions that only users have
# (isp_core's, a plugin's name) do not matter: no header in the .gch reads them.
#
# ISP_PRECOMPILED_HEADERS=OFF builds every unit from its own #includes (what the out-of-tree plugin projects do).
option(ISP_PRECOMPILED_HEADERS "Parse LibTorch's headers once for all translation units (GCC/Clang .gch/.pch)" ON)
if(ISP_PRECOMPILED_HEADERS)
  # ccache caches units compiled with a .gch only under this sloppiness (ccache(1), "Precompiled headers").
  if(CMAKE_CXX_COMPILER_LAUNCHER MATCHES "ccache")
    set(CMAKE_CXX_COMPILER_LAUNCHER ${CMAKE_COMMAND} -E env
      CCACHE_SLOPPINESS=pch_defines,time_macros,include_file_mtime,include_file_ctime ${CMAKE_CXX_COMPILER_LAUNCHER})
  endif()
  add_library(isp_pch OBJECT ${CMAKE_CURRENT_LIST_DIR}/isp_pch.cpp)
  target_link_libraries(isp_pch PRIVATE ${TORCH_LIBRARIES} nlohmann_json::nlohmann_json)
  set_target_properties(isp_pch PROPERTIES POSITION_INDEPENDENT_CODE ON DEFINE_SYMBOL "")
  target_precompile_headers(isp_pch PRIVATE
    <torch/torch.h> <ATen/ATen.h> <nlohmann/json.hpp>
    <algorithm> <chrono> <cmath> <cstdint> <cstdio> <cstdlib> <cstring> <filesystem> <fstream> <functional>
    <map> <memory> <mutex> <set> <sstream> <string> <utility> <vector>)
endif()

# Compiles `target`'s units that reach torch::nn with the tree's precompiled header. Loading the .gch costs
# about 7 s of its own, so units that include only ATen's tensor headers (datasets, regularizers, most of the
# command line, the recipe tests) compile faster without it: measured per unit, they took 2-15 s longer with it,
# and the units that reach torch::nn 5-19 s less. The rule reads each source's own #include lines (below); a
# unit it misjudges only compiles slower, never differently.
set(ISP_PCH_WORTH_IT_REGEX
  "#include [<\"](torch/(torch|nn|script|autograd)|isp/interfaces/(backbone|aem|pruner)\\.h|isp/selector\\.h|isp/train\\.h|test_support\\.h)")
function(isp_use_precompiled_headers target)
  if(NOT TARGET isp_pch)
    return()
  endif()
  target_precompile_headers(${target} REUSE_FROM isp_pch)
  get_target_property(_type ${target} TYPE)
  if(_type STREQUAL "EXECUTABLE")
    target_compile_options(${target} PRIVATE -fPIC)
  endif()
  get_target_property(_dir ${target} SOURCE_DIR)
  get_target_property(_sources ${target} SOURCES)
  foreach(_src IN LISTS _sources)
    get_filename_component(_path ${_src} ABSOLUTE BASE_DIR ${_dir})
    file(STRINGS ${_path} _hits REGEX "${ISP_PCH_WORTH_IT_REGEX}" LIMIT_COUNT 1)
    if(NOT _hits)
      set_source_files_properties(${_src} TARGET_DIRECTORY ${target} PROPERTIES SKIP_PRECOMPILE_HEADERS ON)
    endif()
  endforeach()
endfunction()
