// Loading plugin libraries with Boost.DLL: the descriptor is checked before any plugin code runs.
#include <dlfcn.h>
#include <link.h>
#include <unistd.h>

#include <algorithm>
#include <cstddef>
#include <cstring>
#include <cstdio>
#include <cstdlib>
#include <filesystem>
#include <fstream>
#include <sstream>

#include "isp/registry/plugin.h"
#include "isp/registry/registry.h"
#include "loaded_library.h"

namespace fs = std::filesystem;

namespace isp {

const IspPluginDescriptor& host_descriptor() {
  static const IspPluginDescriptor d{ISP_PLUGIN_ABI_VERSION, TORCH_VERSION_MAJOR, TORCH_VERSION_MINOR,
                                     TORCH_VERSION_PATCH, _GLIBCXX_USE_CXX11_ABI, ISP_DESCRIPTOR_CUDA,
                                     NLOHMANN_JSON_VERSION_MAJOR, NLOHMANN_JSON_VERSION_MINOR, "isp_core",
                                     "0.1.0", "isp", nullptr};
  return d;
}

std::string describe(const IspPluginDescriptor& d) {
  std::ostringstream os;
  os << "ISP plugin ABI " << d.abi_version << ", LibTorch " << d.torch_major << "." << d.torch_minor << "."
     << d.torch_patch << ", C++11 ABI " << d.cxx11_abi << ", CUDA " << (d.with_cuda ? "on" : "off")
     << ", nlohmann_json " << d.json_major << "." << d.json_minor;
  return os.str();
}

std::string check_descriptor_bytes(const void* bytes, std::size_t size, const IspPluginDescriptor& host) {
  uint32_t abi = 0;
  if (bytes == nullptr || size < sizeof abi)
    return "its isp_plugin_descriptor has " + std::to_string(size) + " bytes, too few to hold an ABI number";
  std::memcpy(&abi, bytes, sizeof abi);
  if (abi != host.abi_version)
    return "refused: built for ISP plugin ABI " + std::to_string(abi) + ", host is ISP plugin ABI " +
           std::to_string(host.abi_version) + " (the rest of its descriptor is not read)";
  if (size < sizeof(IspPluginDescriptor))
    return "its isp_plugin_descriptor has " + std::to_string(size) + " bytes, ABI " + std::to_string(abi) + " needs " +
           std::to_string(sizeof(IspPluginDescriptor));
  // The integers only: a copy whose pointers are cleared, so nothing below can follow one.
  IspPluginDescriptor d{};
  std::memcpy(&d, bytes, offsetof(IspPluginDescriptor, library_name));
  const bool match = d.torch_major == host.torch_major && d.torch_minor == host.torch_minor &&
                     d.torch_patch == host.torch_patch && d.cxx11_abi == host.cxx11_abi &&
                     d.with_cuda == host.with_cuda && d.json_major == host.json_major && d.json_minor == host.json_minor;
  if (!match) return "refused: built for " + describe(d) + "; host is " + describe(host);
  return "";
}

// The size of the exported data symbol at `address`, from the dynamic symbol table (0 if unknown).
static std::size_t symbol_size(const void* address) {
  Dl_info info{};
  void* entry = nullptr;  // receives a const ElfW(Sym)*
  if (::dladdr1(address, &info, &entry, RTLD_DL_SYMENT) == 0 || entry == nullptr) return 0;
  return static_cast<std::size_t>(static_cast<const ElfW(Sym)*>(entry)->st_size);
}

// FNV-1a of a file's bytes: enough to notice a replaced .so (not a security measure).
static std::string file_hash(const std::string& path) {
  std::ifstream in(path, std::ios::binary);
  uint64_t h = 1469598103934665603ULL;
  char buf[1 << 16];
  while (in) {
    in.read(buf, sizeof buf);
    for (std::streamsize i = 0; i < in.gcount(); ++i) h = (h ^ static_cast<unsigned char>(buf[i])) * 1099511628211ULL;
  }
  char hex[17];
  std::snprintf(hex, sizeof hex, "%016llx", static_cast<unsigned long long>(h));
  return hex;
}

void Registry::load_library(const std::string& path_in) {
  std::error_code ec;
  fs::path p = fs::weakly_canonical(fs::absolute(path_in), ec);
  std::string path = ec ? path_in : p.string();
  {
    std::lock_guard<std::mutex> lock(mu_);
    for (const auto& l : libraries_)
      if (l->path == path) return;  // the same file twice is a no-op
    if (frozen_) throw RegistryFrozen(path + ": cannot load a plugin after the registry was frozen (a recipe is being built)");
  }
  if (!fs::exists(path)) throw PluginLoadError(path + ": plugin file not found");
  auto loaded = std::make_shared<LoadedLibrary>();
  loaded->path = path;
  try {
    loaded->lib.load(boost::dll::fs::path(path),
                     boost::dll::load_mode::rtld_now | boost::dll::load_mode::rtld_local);
  } catch (const std::exception& e) {
    const char* why = ::dlerror();
    throw PluginLoadError(path + ": cannot load: " + (why ? std::string(why) : std::string(e.what())));
  }
  if (!loaded->lib.has("isp_plugin_descriptor"))
    throw PluginLoadError(path + ": not an isp plugin (it exports no isp_plugin_descriptor)");
  // Reading the descriptor runs no plugin code: it is constant-initialised data. Its bytes are checked (ABI number
  // first, within the symbol's size) before any field of it is used.
  const auto& d = loaded->lib.get<const IspPluginDescriptor>("isp_plugin_descriptor");
  const std::string mismatch = check_descriptor_bytes(&d, symbol_size(&d), host_descriptor());
  if (!mismatch.empty()) throw PluginLoadError(path + ": " + mismatch + ". Rebuild the plugin against this isp installation.");
  loaded->descriptor = d;
  loaded->hash = file_hash(path);
  if (!d.register_components) throw PluginLoadError(path + ": descriptor has no registration function");
  PluginRegistrar registrar;
  try {
    d.register_components(&registrar);
  } catch (const std::exception& e) {
    registrar.pending.clear();
    throw PluginLoadError(path + ": registration failed: " + e.what() + " (no component of this library was registered)");
  } catch (...) {
    registrar.pending.clear();
    throw PluginLoadError(path + ": registration failed with a non-standard exception (nothing registered)");
  }
  for (auto& c : registrar.pending) {
    c.library = loaded;
    if (c.scope.empty() && c.name.find("::") == std::string::npos && d.scope) c.scope = d.scope;
  }
  try {
    add_all(std::move(registrar.pending));
  } catch (...) {
    registrar.pending.clear();
    throw;
  }
  std::lock_guard<std::mutex> lock(mu_);
  libraries_.push_back(loaded);
}

void Registry::scan_directory(const std::string& dir) {
  std::error_code ec;
  std::string shown = fs::weakly_canonical(fs::absolute(dir), ec).string();
  if (ec) shown = dir;
  if (scanned_set_.count(shown)) return;
  scanned_set_.insert(shown);
  scanned_.push_back(shown);
  if (!fs::is_directory(shown)) return;
  std::vector<std::string> files;
  for (const auto& e : fs::directory_iterator(shown, ec))
    if (e.is_regular_file() && e.path().extension() == ".so") files.push_back(e.path().string());
  std::sort(files.begin(), files.end());
  for (const auto& f : files) {
    try {
      load_library(f);
    } catch (const std::exception& e) {
      failures_.push_back(e.what());
    }
  }
}

static std::string self_exe_dir() {
  std::error_code ec;
  fs::path exe = fs::read_symlink("/proc/self/exe", ec);
  return ec ? std::string(".") : exe.parent_path().string();
}

void Registry::load_default_plugins() {
  fs::path exe_dir = self_exe_dir();
  fs::path build_tree = exe_dir / ".." / "plugins";
#ifndef ISP_INSTALL_PLUGIN_SUBDIR
#define ISP_INSTALL_PLUGIN_SUBDIR "lib/isp/plugins"
#endif
  fs::path install_tree = exe_dir / ".." / ISP_INSTALL_PLUGIN_SUBDIR;  // relative to the install prefix
  if (fs::is_directory(build_tree)) scan_directory(build_tree.lexically_normal().string());
  else scan_directory(install_tree.lexically_normal().string());
  if (const char* env = std::getenv("ISP_PLUGIN_PATH")) {
    std::stringstream ss(env);
    for (std::string d; std::getline(ss, d, ':');)
      if (!d.empty()) {
        if (fs::is_regular_file(d)) {
          try { load_library(d); } catch (const std::exception& e) { failures_.push_back(e.what()); }
        } else {
          scan_directory(d);
        }
      }
  }
}

}  // namespace isp
