#pragma once
// Typed component registries, keyed by (kind, name, version), and the context that builds recipe nodes.
#include <functional>
#include <map>
#include <memory>
#include <mutex>
#include <optional>
#include <set>
#include <string>
#include <vector>

#include "isp/options.h"

namespace isp {

class BuildContext;
class Registry;
struct LoadedLibrary;

// The kinds the host knows. A plugin may register further kinds; these are the ones the core interfaces use.
ISP_API const std::vector<std::string>& known_kinds();

using Factory = std::function<std::shared_ptr<void>(const json& validated, BuildContext& ctx, const Where& where)>;

struct ComponentInfo {
  // Declared first so it is destroyed last: factory code lives in the library (build-notes P2).
  std::shared_ptr<LoadedLibrary> library;
  std::string kind, name;
  int version = 1;
  std::string doc;
  Schema schema;
  Factory factory;
  std::string origin() const;  // library path or "builtin"
  json to_json() const;
};

// Collects a library's registrations; the host commits them all or none.
class ISP_API PluginRegistrar {
 public:
  void add(ComponentInfo info) { pending.push_back(std::move(info)); }
  std::vector<ComponentInfo> pending;
};

struct LoadedLibrary;  // defined in plugin_loader.cpp (holds the Boost.DLL handle)

class ISP_API Registry {
 public:
  Registry();
  ~Registry();
  Registry(const Registry&) = delete;
  Registry& operator=(const Registry&) = delete;

  // Adds one component; a (kind, name, version) key seen before from another origin is a DuplicateComponent.
  void add(ComponentInfo info);
  // Commits a registrar's entries atomically (all or none).
  void add_all(std::vector<ComponentInfo> infos);

  const ComponentInfo* find(const std::string& kind, const std::string& name,
                            std::optional<int> version = std::nullopt) const;
  // Throws UnknownComponent listing known names, the closest match, scanned folders and failed loads.
  const ComponentInfo& get(const std::string& kind, const std::string& name, std::optional<int> version,
                           const Where& where) const;
  std::vector<const ComponentInfo*> list(const std::string& kind = "") const;
  // Kinds under which `name` is registered.
  std::vector<std::string> kinds_of(const std::string& name) const;

  // Plugin loading (Boost.DLL). load_library throws PluginLoadError / DuplicateComponent; a second load of
  // the same file is a no-op. scan_directory records failures instead of throwing.
  void load_library(const std::string& path);
  void scan_directory(const std::string& dir);
  // Default folders: the build's plugin folder, the install folder next to the binary, then ISP_PLUGIN_PATH.
  void load_default_plugins();
  const std::vector<std::string>& scanned_directories() const { return scanned_; }
  const std::vector<std::string>& load_failures() const { return failures_; }
  std::vector<std::string> loaded_libraries() const;

 private:
  mutable std::mutex mu_;
  std::vector<ComponentInfo> entries_;
  std::vector<std::shared_ptr<LoadedLibrary>> libraries_;
  std::vector<std::string> scanned_, failures_;
  std::set<std::string> scanned_set_;
};

// The process-wide registry used by the apps (deliberately leaked: plugins are never unloaded).
ISP_API Registry& global_registry();

// Builds nodes of a recipe on demand, memoised by node name, resolving {"$ref": ...} links.
class ISP_API BuildContext {
 public:
  BuildContext(Registry& registry, json recipe, std::function<Where(const std::string&)> where_of);
  ~BuildContext();

  template <class I> std::shared_ptr<I> get(const NodeRef& ref) {
    return std::static_pointer_cast<I>(build(ref.spec, ref.where, I::kKind));
  }
  template <class I> std::shared_ptr<I> node(const std::string& name) {
    return std::static_pointer_cast<I>(build_node(name, I::kKind));
  }
  // Builds a spec (a $ref or an inline {"type": ...}); `kind` empty means "find the kind by type name".
  std::shared_ptr<void> build(const json& spec, const Where& where, const std::string& kind);
  std::shared_ptr<void> build_node(const std::string& name, const std::string& kind);
  // Builds a fresh, unshared instance of a node's spec (e.g. a predictor with the classifier's architecture).
  std::shared_ptr<void> build_fresh(const std::string& node_name, const std::string& kind);
  template <class I> std::shared_ptr<I> fresh(const std::string& node_name) {
    return std::static_pointer_cast<I>(build_fresh(node_name, I::kKind));
  }
  // Resolves a NodeRef to the node name it links to ("" for inline specs).
  static std::string ref_name(const json& spec);
  std::string kind_of_node(const std::string& name);

  Registry& registry() { return registry_; }
  const json& recipe() const { return recipe_; }
  Where where(const std::string& pointer) const { return where_of_(pointer); }
  // The validated spec (defaults filled) each node was built from; written into checkpoints.
  const std::map<std::string, json>& resolved_nodes() const { return resolved_; }

 private:
  std::shared_ptr<void> create(const json& spec, const Where& where, std::string kind, json* resolved);
  Registry& registry_;
  json recipe_;
  std::function<Where(const std::string&)> where_of_;
  std::map<std::string, std::shared_ptr<void>> built_;
  std::map<std::string, std::string> kinds_;
  std::map<std::string, json> resolved_;
  std::vector<std::string> building_;
};

// Wraps a plugin factory `std::shared_ptr<I> f(const Options&, BuildContext&)` into a ComponentInfo.
template <class I, class Options, class F>
ComponentInfo make_component(const char* name, int version, const char* doc, F factory) {
  ComponentInfo c;
  c.kind = I::kKind;
  c.name = name;
  c.version = version;
  c.doc = doc;
  c.schema = schema_of<Options>();
  c.factory = [factory](const json& validated, BuildContext& ctx, const Where& where) -> std::shared_ptr<void> {
    Options o = read_options<Options>(validated, where);
    std::shared_ptr<I> obj = factory(o, ctx);
    return std::static_pointer_cast<void>(obj);
  };
  return c;
}

}  // namespace isp
