#pragma once
// The binary contract between the host and a plugin .so.
//
// A plugin exports exactly one symbol, the constant-initialised data object `isp_plugin_descriptor`. The host
// reads it (no registration code runs; plugins have no static constructors of their own), compares ABI/LibTorch/C++-ABI/CUDA with its own, and only then calls
// `register_components`. Registrations are function pointers placed in the ELF section `isp_registrations`
// by ISP_REGISTER: no static constructors, so a refused plugin runs none of its code.
#include <cstdint>

#include <torch/version.h>

#include "isp/registry/build_context.h"
#include "isp/registry/registry.h"

// Bump on any change of a core interface's layout or vtable, of ComponentInfo, or of the registrar.
#define ISP_PLUGIN_ABI_VERSION 6  // 3: descriptor scope, typed stage results, Backbone topology; 4: DataBundle::foreground_above;
                                  // 5: SpeedSettings::channels_last_if_grouped; 6: BuildContext::spec_where

#ifdef ISP_TORCH_WITH_CUDA
#define ISP_DESCRIPTOR_CUDA ISP_TORCH_WITH_CUDA
#else
#define ISP_DESCRIPTOR_CUDA 0
#endif

extern "C" {
struct IspPluginDescriptor {
  uint32_t abi_version;
  uint32_t torch_major, torch_minor, torch_patch;
  uint32_t cxx11_abi;
  uint32_t with_cuda;
  uint32_t json_major, json_minor;
  const char* library_name;
  const char* library_version;
  const char* scope;  // the scope of the library's components ("isp" for the built-ins)
  void (*register_components)(isp::PluginRegistrar*);
};
}

namespace isp {
// The host's own descriptor values, compiled into libisp_core.so.
ISP_API const IspPluginDescriptor& host_descriptor();
ISP_API std::string describe(const IspPluginDescriptor& d);
// Checks a plugin's descriptor given as the raw bytes of its exported symbol (`size` from the ELF symbol table),
// before anything in it is trusted: "" when it matches `host`, else why not. Only the leading integers are read,
// the ABI number first (later fields may differ between ABIs); no pointer in it is followed.
ISP_API std::string check_descriptor_bytes(const void* bytes, std::size_t size, const IspPluginDescriptor& host);
using RegistrationFn = void (*)(PluginRegistrar&);
}  // namespace isp

#define ISP_CONCAT_INNER(a, b) a##b
#define ISP_CONCAT(a, b) ISP_CONCAT_INNER(a, b)

// One line per component, at the end of its .cpp:
//   ISP_REGISTER(isp::Backbone, "ResNetCifar", 1, ResNetCifarOptions, make_resnet, "CIFAR ResNet (6n+2)");
#define ISP_REGISTER(Interface, Name, Version, Options, FactoryFn, Doc)                                    \
  static void ISP_CONCAT(isp_register_, __LINE__)(::isp::PluginRegistrar & r) {                            \
    r.add(::isp::make_component<Interface, Options>(Name, Version, Doc, FactoryFn));                       \
  }                                                                                                        \
  __attribute__((used, section("isp_registrations"))) static ::isp::RegistrationFn const ISP_CONCAT(       \
      isp_registration_ptr_, __LINE__) = &ISP_CONCAT(isp_register_, __LINE__)

#ifndef ISP_PLUGIN_SCOPE
#define ISP_PLUGIN_SCOPE "user"  // isp_add_plugin() defines it: "isp" in-tree, SCOPE (or the project name) outside
#endif

// Once per plugin library (any one of its .cpp files).
#define ISP_PLUGIN(LibraryVersion)                                                                         \
  extern "C" ::isp::RegistrationFn const __start_isp_registrations[] __attribute__((weak));               \
  extern "C" ::isp::RegistrationFn const __stop_isp_registrations[] __attribute__((weak));                \
  static void isp_plugin_register_all(::isp::PluginRegistrar* r) {                                         \
    for (auto* p = __start_isp_registrations; p && p != __stop_isp_registrations; ++p) (*p)(*r);          \
  }                                                                                                        \
  extern "C" __attribute__((visibility("default"))) const IspPluginDescriptor isp_plugin_descriptor = {   \
      ISP_PLUGIN_ABI_VERSION, TORCH_VERSION_MAJOR, TORCH_VERSION_MINOR, TORCH_VERSION_PATCH,               \
      _GLIBCXX_USE_CXX11_ABI, ISP_DESCRIPTOR_CUDA, NLOHMANN_JSON_VERSION_MAJOR,                            \
      NLOHMANN_JSON_VERSION_MINOR, ISP_PLUGIN_LIBRARY_NAME, LibraryVersion, ISP_PLUGIN_SCOPE,                 \
      &isp_plugin_register_all}
