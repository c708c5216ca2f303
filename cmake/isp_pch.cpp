// The translation unit of the isp_pch OBJECT library (cmake/IspPrecompiledHeaders.cmake): CMake needs one
// source to build the precompiled header from; nothing links its object.
