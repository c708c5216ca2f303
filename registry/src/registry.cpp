// Registries, the Boost.DLL plugin loader and the recipe node builder.
#include "isp/registry.h"

#include <dlfcn.h>
#include <unistd.h>

#include <algorithm>
#include <cstdlib>
#include <filesystem>
#include <sstream>

#include <boost/dll/shared_library.hpp>

#include "isp/plugin.h"

namespace fs = std::filesystem;

namespace isp {

struct LoadedLibrary {
  std::string path;
  IspPluginDescriptor descriptor{};
  boost::dll::shared_library lib;
};

const std::vector<std::string>& known_kinds() {
  static const std::vector<std::string> k{"backbone", "dataset", "stage", "decoder", "feature_filter", "mask_head",
                                          "mask_source", "sampler", "regularizer", "pruner"};
  return k;
}

const IspPluginDescriptor& host_descriptor() {
  static const IspPluginDescriptor d{ISP_PLUGIN_ABI_VERSION, TORCH_VERSION_MAJOR, TORCH_VERSION_MINOR,
                                     TORCH_VERSION_PATCH, _GLIBCXX_USE_CXX11_ABI, ISP_DESCRIPTOR_CUDA,
                                     NLOHMANN_JSON_VERSION_MAJOR, NLOHMANN_JSON_VERSION_MINOR, "isp_core",
                                     "0.1.0", nullptr};
  return d;
}

std::string describe(const IspPluginDescriptor& d) {
  std::ostringstream os;
  os << "ISP plugin ABI " << d.abi_version << ", LibTorch " << d.torch_major << "." << d.torch_minor << "."
     << d.torch_patch << ", C++11 ABI " << d.cxx11_abi << ", CUDA " << (d.with_cuda ? "on" : "off")
     << ", nlohmann_json " << d.json_major << "." << d.json_minor;
  return os.str();
}

std::string ComponentInfo::origin() const { return library ? library->path : std::string("builtin"); }

json ComponentInfo::to_json() const {
  return {{"kind", kind}, {"name", name}, {"version", version}, {"doc", doc}, {"library", origin()},
          {"schema", schema.to_json()}};
}

Registry::Registry() = default;
Registry::~Registry() {
  // Entries hold factories whose code lives in plugins: drop them before the library handles (P2).
  entries_.clear();
  libraries_.clear();
}

static std::string key_str(const ComponentInfo& c) {
  return c.kind + " '" + c.name + "' v" + std::to_string(c.version);
}

void Registry::add(ComponentInfo info) {
  std::vector<ComponentInfo> v;
  v.push_back(std::move(info));
  add_all(std::move(v));
}

void Registry::add_all(std::vector<ComponentInfo> infos) {
  std::lock_guard<std::mutex> lock(mu_);
  for (std::size_t i = 0; i < infos.size(); ++i) {
    const auto& c = infos[i];
    if (c.kind.empty() || c.name.empty()) throw Error("component with an empty kind or name from " + c.origin());
    for (const auto& e : entries_)
      if (e.kind == c.kind && e.name == c.name && e.version == c.version)
        throw DuplicateComponent("duplicate component " + key_str(c) + ": registered by " + e.origin() + " and by " +
                                 c.origin());
    for (std::size_t j = 0; j < i; ++j)
      if (infos[j].kind == c.kind && infos[j].name == c.name && infos[j].version == c.version)
        throw DuplicateComponent("duplicate component " + key_str(c) + ": registered twice by " + c.origin());
  }
  for (auto& c : infos) entries_.push_back(std::move(c));
}

const ComponentInfo* Registry::find(const std::string& kind, const std::string& name, std::optional<int> version) const {
  std::lock_guard<std::mutex> lock(mu_);
  const ComponentInfo* best = nullptr;
  for (const auto& e : entries_) {
    if (e.kind != kind || e.name != name) continue;
    if (version) {
      if (e.version == *version) return &e;
    } else if (!best || e.version > best->version) {
      best = &e;
    }
  }
  return best;
}

std::vector<const ComponentInfo*> Registry::list(const std::string& kind) const {
  std::lock_guard<std::mutex> lock(mu_);
  std::vector<const ComponentInfo*> out;
  for (const auto& e : entries_)
    if (kind.empty() || e.kind == kind) out.push_back(&e);
  std::sort(out.begin(), out.end(), [](auto* a, auto* b) {
    return std::tie(a->kind, a->name, a->version) < std::tie(b->kind, b->name, b->version);
  });
  return out;
}

std::vector<std::string> Registry::kinds_of(const std::string& name) const {
  std::lock_guard<std::mutex> lock(mu_);
  std::vector<std::string> out;
  for (const auto& e : entries_)
    if (e.name == name && std::find(out.begin(), out.end(), e.kind) == out.end()) out.push_back(e.kind);
  return out;
}

std::vector<std::string> Registry::loaded_libraries() const {
  std::lock_guard<std::mutex> lock(mu_);
  std::vector<std::string> out;
  for (const auto& l : libraries_) out.push_back(l->path);
  return out;
}

const ComponentInfo& Registry::get(const std::string& kind, const std::string& name, std::optional<int> version,
                                   const Where& where) const {
  if (const ComponentInfo* c = find(kind, name, version)) return *c;
  std::vector<std::string> names;
  for (const auto* e : list(kind)) names.push_back(e->name + (version ? " v" + std::to_string(e->version) : ""));
  names.erase(std::unique(names.begin(), names.end()), names.end());
  std::ostringstream os;
  os << where.str() << ": '" << name << "'" << (version ? " version " + std::to_string(*version) : std::string())
     << " is not a registered " << (kind.empty() ? std::string("component") : kind) << ". Known: ";
  for (std::size_t i = 0; i < names.size(); ++i) os << (i ? ", " : "") << names[i];
  if (names.empty()) os << "(none)";
  os << ".";
  std::vector<std::string> plain;
  for (const auto* e : list(kind)) plain.push_back(e->name);
  std::string near = closest_match(name, plain);
  if (!near.empty()) os << " Did you mean '" << near << "'?";
  os << " Plugin folders scanned: ";
  for (std::size_t i = 0; i < scanned_.size(); ++i) os << (i ? ", " : "") << scanned_[i];
  if (scanned_.empty()) os << "(none)";
  os << ". Failed loads: ";
  for (std::size_t i = 0; i < failures_.size(); ++i) os << (i ? "; " : "") << failures_[i];
  if (failures_.empty()) os << "(none)";
  throw UnknownComponent(os.str());
}

void Registry::load_library(const std::string& path_in) {
  std::error_code ec;
  fs::path p = fs::weakly_canonical(fs::absolute(path_in), ec);
  std::string path = ec ? path_in : p.string();
  {
    std::lock_guard<std::mutex> lock(mu_);
    for (const auto& l : libraries_)
      if (l->path == path) return;  // the same file twice is a no-op
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
  // Reading the descriptor runs no plugin code: it is constant-initialised data.
  const auto& d = loaded->lib.get<const IspPluginDescriptor>("isp_plugin_descriptor");
  const auto& h = host_descriptor();
  bool match = d.abi_version == h.abi_version && d.torch_major == h.torch_major && d.torch_minor == h.torch_minor &&
               d.torch_patch == h.torch_patch && d.cxx11_abi == h.cxx11_abi && d.with_cuda == h.with_cuda &&
               d.json_major == h.json_major && d.json_minor == h.json_minor;
  if (!match)
    throw PluginLoadError(path + ": refused: built for " + describe(d) + "; host is " + describe(h) +
                          ". Rebuild the plugin against this isp installation.");
  loaded->descriptor = d;
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
  for (auto& c : registrar.pending) c.library = loaded;
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
  fs::path install_tree = exe_dir / ".." / "lib" / "isp" / "plugins";
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

Registry& global_registry() {
  static Registry* r = new Registry();  // leaked on purpose: plugins are never unloaded
  return *r;
}

// ---------------------------------------------------------------------------------------------- BuildContext

BuildContext::BuildContext(Registry& registry, json recipe, std::function<Where(const std::string&)> where_of)
    : registry_(registry), recipe_(std::move(recipe)), where_of_(std::move(where_of)) {}
BuildContext::~BuildContext() = default;

std::string BuildContext::ref_name(const json& spec) {
  if (spec.is_object() && spec.contains("$ref") && spec["$ref"].is_string()) return spec["$ref"].get<std::string>();
  return "";
}

std::shared_ptr<void> BuildContext::build(const json& spec, const Where& where, const std::string& kind) {
  std::string ref = ref_name(spec);
  if (!ref.empty()) return build_node(ref, kind);
  return create(spec, where, kind, nullptr);
}

std::string BuildContext::kind_of_node(const std::string& name) {
  if (auto it = kinds_.find(name); it != kinds_.end()) return it->second;
  const json nodes = recipe_.value("nodes", json::object());
  if (!nodes.contains(name)) throw RecipeError(where("/nodes"), "no node named '" + name + "'");
  const json& spec = nodes[name];
  if (spec.contains("kind") && spec["kind"].is_string()) return spec["kind"].get<std::string>();
  if (!spec.contains("type") || !spec["type"].is_string()) return "";
  auto ks = registry_.kinds_of(spec["type"].get<std::string>());
  return ks.size() == 1 ? ks[0] : "";
}

std::shared_ptr<void> BuildContext::build_node(const std::string& name, const std::string& kind) {
  if (auto it = built_.find(name); it != built_.end()) {
    if (!kind.empty() && kinds_[name] != kind)
      throw RecipeError(where("/nodes/" + name), "node '" + name + "' is a " + kinds_[name] + ", but a " + kind +
                                                     " is expected where it is referenced");
    return it->second;
  }
  const json nodes = recipe_.value("nodes", json::object());
  if (!nodes.contains(name)) throw RecipeError(where("/nodes"), "no node named '" + name + "'");
  if (std::find(building_.begin(), building_.end(), name) != building_.end())
    throw RecipeError(where("/nodes/" + name), "reference cycle through node '" + name + "'");
  building_.push_back(name);
  json resolved;
  std::string k = kind;
  std::shared_ptr<void> obj;
  try {
    obj = create(nodes[name], where("/nodes/" + name), k, &resolved);
  } catch (...) {
    building_.pop_back();
    throw;
  }
  building_.pop_back();
  if (k.empty()) k = resolved.value("kind", std::string());
  built_[name] = obj;
  kinds_[name] = k;
  resolved_[name] = resolved;
  return obj;
}

std::shared_ptr<void> BuildContext::build_fresh(const std::string& node_name, const std::string& kind) {
  const json nodes = recipe_.value("nodes", json::object());
  if (!nodes.contains(node_name)) throw RecipeError(where("/nodes"), "no node named '" + node_name + "'");
  return create(nodes[node_name], where("/nodes/" + node_name), kind, nullptr);
}

namespace {
// Keeps the plugin library mapped while the object lives (Boost.DLL's "lifetime binding").
struct LibraryBoundObject {
  std::shared_ptr<LoadedLibrary> library;  // destroyed last
  std::shared_ptr<void> object;
};
}  // namespace

std::shared_ptr<void> BuildContext::create(const json& spec, const Where& where, std::string kind, json* resolved) {
  if (!spec.is_object()) throw RecipeError(where, "expected a component spec {\"type\": ...}, got " + spec.dump());
  auto t = spec.find("type");
  if (t == spec.end() || !t->is_string()) throw RecipeError(where.child("type"), "missing \"type\" (a registered component name)");
  std::string type = t->get<std::string>();
  std::optional<int> version;
  if (auto v = spec.find("version"); v != spec.end()) {
    if (!v->is_number_integer()) throw RecipeError(where.child("version"), "expected an integer, got " + v->dump());
    version = v->get<int>();
  }
  if (auto k = spec.find("kind"); k != spec.end()) {
    if (!k->is_string()) throw RecipeError(where.child("kind"), "expected a kind name string");
    std::string declared = k->get<std::string>();
    if (!kind.empty() && declared != kind)
      throw RecipeError(where.child("kind"), "this node is declared a " + declared + ", but a " + kind + " is expected here");
    kind = declared;
  }
  if (kind.empty()) {
    auto ks = registry_.kinds_of(type);
    if (ks.size() > 1) {
      std::string all;
      for (const auto& k : ks) all += (all.empty() ? "" : ", ") + k;
      throw RecipeError(where.child("type"), "'" + type + "' is registered under several kinds (" + all + "); add \"kind\"");
    }
    if (ks.empty()) registry_.get("", type, version, where.child("type"));  // throws with the known names
    kind = ks[0];
  }
  const ComponentInfo& info = registry_.get(kind, type, version, where.child("type"));
  json validated = info.schema.validate(spec, where);
  if (resolved) {
    *resolved = validated;
    resolved->emplace("type", type);
    (*resolved)["kind"] = kind;
    (*resolved)["version"] = info.version;
  }
  std::shared_ptr<void> obj;
  try {
    obj = info.factory(validated, *this, where);
  } catch (const RecipeError&) {
    throw;
  } catch (const Error& e) {
    throw RecipeError(where, e.what());  // add the recipe location to the component's own error
  } catch (const std::exception& e) {
    throw RecipeError(where, "building " + kind + " '" + type + "' failed: " + e.what());
  }
  if (!obj) throw RecipeError(where, "building " + kind + " '" + type + "' returned nothing");
  if (!info.library) return obj;
  void* raw = obj.get();
  auto bound = std::make_shared<LibraryBoundObject>(LibraryBoundObject{info.library, std::move(obj)});
  return std::shared_ptr<void>(bound, raw);
}

}  // namespace isp
