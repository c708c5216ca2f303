# isp_add_plugin(<kind> <name> SOURCES a.cpp ... [LIBS ...] [SCOPE <scope>] [OUTPUT_DIR <dir>])
# Builds plugins/<kind>/<name> as MODULE library libisp_<kind>_<name>.so: hidden visibility, one exported
# symbol (isp_plugin_descriptor, see isp/registry/plugin.h), linked to the host's shared LibTorch and isp core.
# Components register in SCOPE: "isp" for the built-ins, by default the project's name outside the isp tree, so
# recipes can tell "mylab::RbfMaskHead" from the built-in "isp::RbfMaskHead".
set(ISP_PLUGIN_MAP_FILE ${CMAKE_CURRENT_LIST_DIR}/isp_plugin.map)

function(isp_add_plugin kind name)
  cmake_parse_arguments(P "" "OUTPUT_DIR;SCOPE" "SOURCES;LIBS" ${ARGN})
  set(target isp_${kind}_${name})
  add_library(${target} MODULE ${P_SOURCES})
  if(TARGET isp_core)
    target_link_libraries(${target} PRIVATE isp_core ${P_LIBS})
  else()
    target_link_libraries(${target} PRIVATE isp::isp_core ${P_LIBS})
  endif()
  if(NOT P_OUTPUT_DIR)
    if(DEFINED ISP_PLUGIN_OUTPUT_DIR)
      set(P_OUTPUT_DIR ${ISP_PLUGIN_OUTPUT_DIR})
    else()
      set(P_OUTPUT_DIR ${CMAKE_BINARY_DIR}/plugins)
    endif()
  endif()
  set_target_properties(${target} PROPERTIES
    PREFIX "lib" OUTPUT_NAME "isp_${kind}_${name}"
    CXX_VISIBILITY_PRESET hidden VISIBILITY_INLINES_HIDDEN ON
    LIBRARY_OUTPUT_DIRECTORY ${P_OUTPUT_DIR})
  if(NOT P_SCOPE)
    if(TARGET isp_core)
      set(P_SCOPE isp)
    else()
      string(MAKE_C_IDENTIFIER "${PROJECT_NAME}" P_SCOPE)
    endif()
  endif()
  target_compile_definitions(${target} PRIVATE ISP_PLUGIN_LIBRARY_NAME="isp_${kind}_${name}" ISP_PLUGIN_SCOPE="${P_SCOPE}")
  target_link_options(${target} PRIVATE "-Wl,--version-script=${ISP_PLUGIN_MAP_FILE}" "-Wl,--no-undefined")
  if(DEFINED ISP_INSTALL_PLUGIN_DIR AND TARGET isp_core)
    set_target_properties(${target} PROPERTIES INSTALL_RPATH "$ORIGIN/../..")  # <libdir>/isp/plugins -> <libdir>
    install(TARGETS ${target} LIBRARY DESTINATION ${ISP_INSTALL_PLUGIN_DIR})
  endif()
  if(NOT kind STREQUAL "fixture")
    set_property(GLOBAL APPEND PROPERTY ISP_ALL_PLUGINS ${target})
    if(COMMAND isp_use_precompiled_headers)  # in the isp tree only (cmake/IspPrecompiledHeaders.cmake)
      isp_use_precompiled_headers(${target})
    endif()
  endif()
  set(ISP_LAST_PLUGIN_TARGET ${target} PARENT_SCOPE)
endfunction()
