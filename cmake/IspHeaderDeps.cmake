# The header-only dependencies (and zlib), found the normal way first -- Debian: nlohmann-json3-dev, libboost-dev,
# libcli11-dev, doctest-dev, libstb-dev, zlib1g-dev -- and, where a package is missing (a GPU machine with only a
# pip LibTorch that cannot download anything), taken from headers packed by scripts/pack_cuda_deps.sh into
# ISP_HEADER_DEPS_DIR, as IMPORTED INTERFACE targets of the same names:
#   nlohmann_json::nlohmann_json  Boost::headers  CLI11::CLI11  ZLIB::ZLIB  doctest::doctest (isp_find_doctest())
# and the cache path ISP_STB_INCLUDE_DIR (apps/isp). Included from the top-level CMakeLists.txt.
set(ISP_HEADER_DEPS_DIR "${PROJECT_SOURCE_DIR}/.deps/include" CACHE PATH
  "Fallback headers for packages find_package() cannot find (made by scripts/pack_cuda_deps.sh)")

function(_isp_need_header header what)
  if(NOT EXISTS "${ISP_HEADER_DEPS_DIR}/${header}")
    message(FATAL_ERROR "${what} was not found, and the fallback header ${ISP_HEADER_DEPS_DIR}/${header} does not "
      "exist either. Install the package, or run scripts/pack_cuda_deps.sh on a Debian machine that has it and "
      "carry the .deps/ folder here (or point -DISP_HEADER_DEPS_DIR=<pack>/include at it).")
  endif()
endfunction()

# _isp_header_target(<target> <what> <header>): INTERFACE IMPORTED target over ISP_HEADER_DEPS_DIR.
function(_isp_header_target target what header)
  _isp_need_header(${header} ${what})
  if(NOT TARGET ${target})
    add_library(${target} INTERFACE IMPORTED GLOBAL)
    set_target_properties(${target} PROPERTIES INTERFACE_INCLUDE_DIRECTORIES "${ISP_HEADER_DEPS_DIR}")
  endif()
  message(STATUS "${what}: not found by find_package, using the headers in ${ISP_HEADER_DEPS_DIR}")
endfunction()

# _isp_define_value(<out> <header> <macro>): the number a header #defines for <macro>, or "".
function(_isp_define_value out header macro)
  set(v "")
  if(EXISTS "${header}")
    file(STRINGS "${header}" line REGEX "^[ \t]*#[ \t]*define[ \t]+${macro}[ \t]+[0-9]+" LIMIT_COUNT 1)
    string(REGEX REPLACE ".*${macro}[ \t]+([0-9]+).*" "\\1" v "${line}")
  endif()
  set(${out} "${v}" PARENT_SCOPE)
endfunction()

# --- nlohmann_json -----------------------------------------------------------------------------------------
include(FindPackageMessage)  # find_package_message(): the "Found X" line, once, as the non-QUIET finds print it

find_package(nlohmann_json 3.9 QUIET)
if(nlohmann_json_FOUND)
  find_package_message(nlohmann_json "Found nlohmann_json: ${nlohmann_json_CONFIG} (found version \"${nlohmann_json_VERSION}\")"
    "[${nlohmann_json_CONFIG}][v${nlohmann_json_VERSION}]")
else()
  _isp_header_target(nlohmann_json::nlohmann_json nlohmann_json nlohmann/json.hpp)
  _isp_define_value(_maj "${ISP_HEADER_DEPS_DIR}/nlohmann/json.hpp" NLOHMANN_JSON_VERSION_MAJOR)
  _isp_define_value(_min "${ISP_HEADER_DEPS_DIR}/nlohmann/json.hpp" NLOHMANN_JSON_VERSION_MINOR)
  if(_maj AND _min AND "${_maj}.${_min}" VERSION_LESS 3.9)
    message(FATAL_ERROR "nlohmann_json ${_maj}.${_min} in ${ISP_HEADER_DEPS_DIR} is older than 3.9")
  endif()
endif()

# --- Boost (headers only: Boost.DLL on std::filesystem) ----------------------------------------------------
# Boost >= 1.70 ships BoostConfig.cmake; CMake >= 3.30 drops the FindBoost module (CMP0167), so config mode first,
# the module only where this CMake still has it, then the packed headers. The policy setting stays in this file.
if(POLICY CMP0167)
  cmake_policy(SET CMP0167 NEW)
endif()
find_package(Boost 1.70 QUIET CONFIG)
if(NOT Boost_FOUND AND NOT POLICY CMP0167)
  find_package(Boost 1.70 QUIET MODULE)
endif()
if(Boost_FOUND AND NOT TARGET Boost::headers AND TARGET Boost::boost)
  add_library(Boost::headers INTERFACE IMPORTED GLOBAL)
  set_target_properties(Boost::headers PROPERTIES INTERFACE_LINK_LIBRARIES Boost::boost)
endif()
if(Boost_FOUND)
  set(_where "${Boost_CONFIG}")
  if(NOT _where)
    set(_where "${Boost_INCLUDE_DIRS}")  # FindBoost without BoostConfig.cmake
  endif()
  find_package_message(Boost "Found Boost: ${_where} (found version \"${Boost_VERSION}\")" "[${_where}][v${Boost_VERSION}]")
else()
  _isp_header_target(Boost::headers Boost boost/dll/shared_library.hpp)
  _isp_define_value(_v "${ISP_HEADER_DEPS_DIR}/boost/version.hpp" BOOST_VERSION)
  if(_v AND _v LESS 107000)
    message(FATAL_ERROR "Boost ${_v} in ${ISP_HEADER_DEPS_DIR} is older than 1.70")
  endif()
endif()

# --- CLI11 -------------------------------------------------------------------------------------------------
find_package(CLI11 QUIET)
if(NOT CLI11_FOUND)
  _isp_header_target(CLI11::CLI11 CLI11 CLI/CLI.hpp)
endif()

# --- zlib: packed zlib.h, the runtime libz.so.1 (Ubuntu has it without zlib1g-dev's libz.so symlink) ---------
find_package(ZLIB QUIET)
if(ZLIB_FOUND)
  find_package_message(ZLIB "Found ZLIB: ${ZLIB_LIBRARIES} (found version \"${ZLIB_VERSION_STRING}\")"
    "[${ZLIB_LIBRARIES}][${ZLIB_INCLUDE_DIRS}][v${ZLIB_VERSION_STRING}]")
else()
  find_library(ISP_ZLIB_LIBRARY NAMES z libz.so.1 DOC "zlib runtime library (fallback when find_package(ZLIB) fails)")
  if(NOT ISP_ZLIB_LIBRARY)
    message(FATAL_ERROR "zlib: neither find_package(ZLIB) nor find_library(z / libz.so.1) found it; install zlib1g")
  endif()
  _isp_header_target(ZLIB::ZLIB zlib zlib.h)
  _isp_need_header(zconf.h zlib)
  set_target_properties(ZLIB::ZLIB PROPERTIES INTERFACE_LINK_LIBRARIES "${ISP_ZLIB_LIBRARY}")
  message(STATUS "zlib: linking ${ISP_ZLIB_LIBRARY}")
endif()

# --- stb (apps/isp: find_path(ISP_STB_INCLUDE_DIR stb/stb_image_write.h)) ------------------------------------
# Same search as apps/isp, with the packed headers as a last resort; apps/isp then finds the cached result.
find_path(ISP_STB_INCLUDE_DIR stb/stb_image_write.h PATHS "${ISP_HEADER_DEPS_DIR}")

# --- doctest: called from tests/CMakeLists.txt instead of find_package(doctest REQUIRED) ---------------------
# A macro, so that find_package's CMAKE_MODULE_PATH entry (for include(doctest)) lands in the caller's scope.
macro(isp_find_doctest)
  find_package(doctest QUIET)
  if(NOT doctest_FOUND)
    _isp_header_target(doctest::doctest doctest doctest/doctest.h)
    # doctest.cmake / doctestAddTests.cmake, packed next to the include folder (<pack>/cmake/doctest).
    get_filename_component(_isp_doctest_cmake "${ISP_HEADER_DEPS_DIR}/../cmake/doctest" ABSOLUTE)
    if(NOT EXISTS "${_isp_doctest_cmake}/doctest.cmake")
      message(FATAL_ERROR "doctest: ${_isp_doctest_cmake}/doctest.cmake is missing (run scripts/pack_cuda_deps.sh), "
        "or configure with -DISP_BUILD_TESTS=OFF")
    endif()
    list(APPEND CMAKE_MODULE_PATH "${_isp_doctest_cmake}")
  endif()
endmacro()
