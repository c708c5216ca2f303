#pragma once
// Typed component registries keyed by (kind, scope, name, version). Plugin loading is implemented in
// plugin_loader.cpp, recipe node building in build_context.h.
//
// A recipe names a component as "[scope::]Name[@version]": "RbfMaskHead", "isp::RbfMaskHead",
// "mylab::RbfMaskHead@2". Built-in plugins register in scope "isp"; an out-of-tree library in its own scope.
// An unscoped, unpinned name that several libraries offer is an error (AmbiguousComponent) rather than a
// silent choice, so an out-of-tree library never replaces a built-in by accident. Within one library the
// highest version wins.
#include <functional>
#include <map>
#include <memory>
#include <mutex>
#include <optional>
#include <set>
#include <string>
#include <vector>

#include "isp/registry/options.h"

namespace isp {

class BuildContext;
struct LoadedLibrary;  // the Boost.DLL handle and the plugin's descriptor (plugin_loader.cpp)

// The kinds the host knows. A plugin may register further kinds; these are the ones the core interfaces use.
ISP_API const std::vector<std::string>& known_kinds();

using Factory = std::function<std::shared_ptr<void>(const json& validated, BuildContext& ctx, const Where& where)>;

// What a recipe's "type" says: [scope::]Name[@version].
struct ISP_API TypeName {
  std::string scope;  // empty: any scope
  std::string name;
  std::optional<int> version;
  // Throws RecipeError at `where` on a malformed name ("a::", "Name@x", "Name@0").
  static TypeName parse(const std::string& text, const Where& where = {});
  std::string str() const;
};

// The component actually built for a node: written to recipe.resolved.json and part of stage fingerprints,
// so `--resume` notices a plugin whose version or file changed.
struct ISP_API ComponentRecord {
  std::string kind, type;  // type: scope::Name
  int version = 1;
  std::string library;          // absolute path of the .so, or "builtin"
  std::string library_name;     // e.g. isp_mask_heads_rbf
  std::string library_version;  // the plugin's own version string
  std::string library_hash;     // FNV-1a of the .so file's bytes (empty for builtins)
  json to_json() const;
  // What fingerprints depend on: everything except the path (a moved install is the same plugin).
  json identity() const;
};

struct ISP_API ComponentInfo {
  // Declared first so it is destroyed last: factory code lives in the library,
  // and a library unloaded while its code is still referenced crashes at exit.
  std::shared_ptr<LoadedLibrary> library;
  std::string kind, scope, name;
  int version = 1;
  std::string doc;
  Schema schema;
  Factory factory;
  std::string qualified_name() const;  // scope::name, or name when unscoped
  std::string origin() const;          // library path or "builtin"
  ComponentRecord record() const;
  json to_json() const;
};

// Collects a library's registrations; the host commits them all or none. Names without "::" get the
// library's scope.
class ISP_API PluginRegistrar {
 public:
  void add(ComponentInfo info) { pending.push_back(std::move(info)); }
  std::vector<ComponentInfo> pending;
};

class ISP_API Registry {
 public:
  Registry();
  ~Registry();
  Registry(const Registry&) = delete;
  Registry& operator=(const Registry&) = delete;

  // Adds one component; a (kind, scope, name, version) key seen before is a DuplicateComponent. A name
  // "scope::Name" sets the scope. Throws RegistryFrozen after freeze().
  void add(ComponentInfo info);
  // Commits a registrar's entries atomically (all or none).
  void add_all(std::vector<ComponentInfo> infos);

  // `name` is "[scope::]Name" (an "@version" suffix is read too when `version` is empty); `kind` "" = any.
  // Returns nullptr when nothing matches. Throws AmbiguousComponent when the matches come from several
  // libraries and no scope (or a version only one of them offers) picks one.
  const ComponentInfo* find(const std::string& kind, const std::string& name,
                            std::optional<int> version = std::nullopt) const;
  // Same; throws UnknownComponent listing known names, the closest match, scanned folders and failed loads.
  const ComponentInfo& get(const std::string& kind, const std::string& name, std::optional<int> version,
                           const Where& where) const;
  std::vector<const ComponentInfo*> list(const std::string& kind = "") const;
  // Kinds under which `name` ("[scope::]Name") is registered.
  std::vector<std::string> kinds_of(const std::string& name) const;

  // Plugin loading (Boost.DLL, plugin_loader.cpp). load_library throws PluginLoadError / DuplicateComponent;
  // a second load of the same file is a no-op. scan_directory records failures instead of throwing.
  void load_library(const std::string& path);
  void scan_directory(const std::string& dir);
  // Default folders: the build's plugin folder, the install folder next to the binary, then ISP_PLUGIN_PATH.
  void load_default_plugins();
  const std::vector<std::string>& scanned_directories() const { return scanned_; }
  const std::vector<std::string>& load_failures() const { return failures_; }
  std::vector<std::string> loaded_libraries() const;

  // After freeze() the set of components is fixed: registrations and new libraries throw RegistryFrozen (a
  // run builds every node from one set; re-loading an already loaded file stays a no-op).
  void freeze();
  bool frozen() const;

 private:
  std::vector<const ComponentInfo*> matches(const std::string& kind, const TypeName& t) const;
  mutable std::mutex mu_;
  std::vector<ComponentInfo> entries_;
  std::vector<std::shared_ptr<LoadedLibrary>> libraries_;
  std::vector<std::string> scanned_, failures_;
  std::set<std::string> scanned_set_;
  bool frozen_ = false;
};

// The process-wide registry used by the apps (deliberately leaked: plugins are never unloaded).
ISP_API Registry& global_registry();

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
