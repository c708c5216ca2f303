#pragma once
// Builds the nodes of a recipe on demand, memoised by node name, resolving {"$ref": ...} links, and records
// which component (type, version, library) each one was built from.
#include <functional>
#include <map>
#include <memory>
#include <string>
#include <vector>

#include "isp/registry/registry.h"

namespace isp {

// Which named nodes and components a build reached (transitively through $ref), for stage fingerprints.
struct BuildTrace {
  std::vector<std::string> nodes;                                // node names, in first-reached order
  std::vector<std::pair<std::string, ComponentRecord>> components;  // JSON pointer of the spec -> record
};

// Objects shared between the builds of several recipes in one process (`isp validate` with many recipes, `isp sweep
// --validate`): a component of a shared kind, built once, is taken again by a later build whose spec names the same
// component (type, version, library) with the same validated options and no references. Only for kinds whose
// objects do not change once built (datasets: loading and decoding them is most of a validation's time). Holds the
// `capacity` most recently used objects.
class ISP_API SharedComponents {
 public:
  explicit SharedComponents(std::vector<std::string> kinds, std::size_t capacity = 2);
  bool shares(const std::string& kind) const;
  std::shared_ptr<void> find(const std::string& key);  // nullptr when absent; a hit becomes the most recent
  void put(const std::string& key, std::shared_ptr<void> object);
  int64_t hits() const { return hits_; }
  int64_t builds() const { return builds_; }  // objects built and put here

 private:
  std::vector<std::string> kinds_;
  std::size_t capacity_;
  std::vector<std::pair<std::string, std::shared_ptr<void>>> recent_;  // most recent last
  int64_t hits_ = 0, builds_ = 0;
};

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
  // Resolves a NodeRef to the node name it links to ("" for inline specs).
  static std::string ref_name(const json& spec);
  std::string kind_of_node(const std::string& name);

  // Everything built while `trace` is active (nested builds and memoised nodes included) is appended to it.
  void begin_trace(BuildTrace* trace) { trace_ = trace; }
  void end_trace() { trace_ = nullptr; }

  // Take objects of the shared kinds from `shared`, and put the ones built here into it.
  void share_components(std::shared_ptr<SharedComponents> shared) { shared_ = std::move(shared); }
  Registry& registry() { return registry_; }
  const json& recipe() const { return recipe_; }
  Where where(const std::string& pointer) const { return where_of_(pointer); }
  // Inside a component's factory: where its own spec is (a node "/nodes/prune", an inline spec
  // "/stages/3/regularizers/0"), so errors found later, at run time, can name its options. Empty outside factories.
  Where spec_where() const { return building_where_.empty() ? Where{} : building_where_.back(); }
  // The validated spec (defaults filled) each named node was built from.
  const std::map<std::string, json>& resolved_nodes() const { return resolved_; }
  // The component behind every spec built so far, by the JSON pointer of the spec ("/nodes/head",
  // "/stages/3/regularizers/0"): what recipe.resolved.json records.
  const std::map<std::string, ComponentRecord>& records() const { return records_; }
  // The component that built `object` (a pointer this context returned), or nullptr.
  const ComponentRecord* record_of(const void* object) const;

 private:
  std::shared_ptr<void> create(const json& spec, const Where& where, std::string kind, json* resolved);
  void note(const BuildTrace& sub);
  Registry& registry_;
  json recipe_;
  std::function<Where(const std::string&)> where_of_;
  std::map<std::string, std::shared_ptr<void>> built_;
  std::map<std::string, std::string> kinds_;
  std::map<std::string, json> resolved_;
  std::map<std::string, BuildTrace> node_traces_;  // what building each named node reached
  std::map<std::string, ComponentRecord> records_;
  std::map<const void*, ComponentRecord> by_object_;
  std::vector<std::string> building_;
  BuildTrace* trace_ = nullptr;
  std::shared_ptr<SharedComponents> shared_;
  std::vector<Where> building_where_;  // the specs whose factories are running, innermost last
};

}  // namespace isp
