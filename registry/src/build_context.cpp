// Building recipe nodes: $ref resolution, memoisation by node name, strict option schemas, and a record of
// the component (type, version, library) behind every spec.
#include "isp/registry/build_context.h"
#include "isp/registry/recipe.h"

#include <algorithm>

#include "loaded_library.h"

namespace isp {
namespace {
// Whether validated options hold a reference or an inline component spec: such an object was built from other
// nodes of its own recipe, so it is never shared with another recipe.
bool has_reference(const json& j) {
  if (j.is_object()) {
    if (j.contains("$ref") || j.contains("type")) return true;
    for (const auto& [k, v] : j.items())
      if (has_reference(v)) return true;
  } else if (j.is_array()) {
    for (const auto& v : j)
      if (has_reference(v)) return true;
  }
  return false;
}
}  // namespace

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

void BuildContext::note(const BuildTrace& sub) {
  if (!trace_) return;
  for (const auto& n : sub.nodes)
    if (std::find(trace_->nodes.begin(), trace_->nodes.end(), n) == trace_->nodes.end()) trace_->nodes.push_back(n);
  for (const auto& c : sub.components)
    if (std::none_of(trace_->components.begin(), trace_->components.end(), [&](const auto& e) { return e.first == c.first; }))
      trace_->components.push_back(c);
}

std::shared_ptr<void> BuildContext::build_node(const std::string& name, const std::string& kind) {
  if (auto it = built_.find(name); it != built_.end()) {
    if (!kind.empty() && kinds_[name] != kind)
      throw RecipeError(where("/nodes/" + name), "node '" + name + "' is a " + kinds_[name] + ", but a " + kind +
                                                     " is expected where it is referenced");
    note(node_traces_[name]);  // a memoised node still counts for whoever reaches it
    return it->second;
  }
  const json nodes = recipe_.value("nodes", json::object());
  if (!nodes.contains(name)) throw RecipeError(where("/nodes"), "no node named '" + name + "'");
  if (std::find(building_.begin(), building_.end(), name) != building_.end())
    throw RecipeError(where("/nodes/" + name), "reference cycle through node '" + name + "'");
  if (static_cast<int>(building_.size()) >= kMaxRefChain)
    throw RecipeError(where("/nodes/" + name), "$ref chain longer than " + std::to_string(kMaxRefChain) + " nodes");
  // Trace this node's own subtree separately, then hand it to the enclosing trace.
  BuildTrace sub;
  sub.nodes.push_back(name);
  BuildTrace* outer = trace_;
  trace_ = &sub;
  building_.push_back(name);
  json resolved;
  std::string k = kind;
  std::shared_ptr<void> obj;
  try {
    obj = create(nodes[name], where("/nodes/" + name), k, &resolved);
  } catch (...) {
    building_.pop_back();
    trace_ = outer;
    throw;
  }
  building_.pop_back();
  trace_ = outer;
  if (k.empty()) k = resolved.value("kind", std::string());
  built_[name] = obj;
  kinds_[name] = k;
  resolved_[name] = resolved;
  node_traces_[name] = sub;
  note(sub);
  return obj;
}

const ComponentRecord* BuildContext::record_of(const void* object) const {
  auto it = by_object_.find(object);
  return it == by_object_.end() ? nullptr : &it->second;
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
  const std::string type = t->get<std::string>();
  TypeName parsed = TypeName::parse(type, where.child("type"));
  if (auto v = spec.find("version"); v != spec.end()) {
    if (!v->is_number_integer()) throw RecipeError(where.child("version"), "expected an integer, got " + v->dump());
    if (parsed.version && *parsed.version != v->get<int>())
      throw RecipeError(where.child("version"), "contradicts the version pinned in \"type\": \"" + type + "\"");
    parsed.version = v->get<int>();
  }
  if (auto k = spec.find("kind"); k != spec.end()) {
    if (!k->is_string()) throw RecipeError(where.child("kind"), "expected a kind name string");
    std::string declared = k->get<std::string>();
    if (!kind.empty() && declared != kind)
      throw RecipeError(where.child("kind"), "this node is declared a " + declared + ", but a " + kind + " is expected here");
    kind = declared;
  }
  const std::string lookup = (parsed.scope.empty() ? "" : parsed.scope + "::") + parsed.name;
  if (kind.empty()) {
    auto ks = registry_.kinds_of(lookup);
    if (ks.size() > 1) {
      std::string all;
      for (const auto& k : ks) all += (all.empty() ? "" : ", ") + k;
      throw RecipeError(where.child("type"), "'" + type + "' is registered under several kinds (" + all + "); add \"kind\"");
    }
    if (ks.empty()) registry_.get("", lookup, parsed.version, where.child("type"));  // throws with the known names
    kind = ks[0];
  }
  const ComponentInfo& info = registry_.get(kind, lookup, parsed.version, where.child("type"));
  json validated = info.schema.validate(spec, where);
  if (resolved) {
    *resolved = validated;
    resolved->emplace("type", type);
    (*resolved)["kind"] = kind;
    (*resolved)["version"] = info.version;
  }
  // Nested builds (a stage building its inputs) are traced under the enclosing node; record this spec first.
  const ComponentRecord record = info.record();
  records_[where.pointer] = record;
  if (trace_) trace_->components.emplace_back(where.pointer, record);
  // A shared kind: the same component with the same options built by an earlier recipe is taken as it is.
  std::string share_key;
  const bool leaf = std::none_of(validated.begin(), validated.end(), [](const json& v) { return has_reference(v); });
  if (shared_ && shared_->shares(kind) && leaf) {
    share_key = kind + "\n" + record.identity().dump() + "\n" + validated.dump();
    if (std::shared_ptr<void> hit = shared_->find(share_key)) {
      by_object_[hit.get()] = record;
      return hit;
    }
  }
  std::shared_ptr<void> obj;
  building_where_.push_back(where);
  struct PopWhere {
    std::vector<Where>& stack;
    ~PopWhere() { stack.pop_back(); }
  } pop_where{building_where_};
  try {
    obj = info.factory(validated, *this, where);
  } catch (const RecipeError&) {
    throw;
  } catch (const OptionError& e) {
    // At the option's own path: its value may come from another file than the node (an overriding recipe, --set).
    Where at = where;
    std::string rest = e.option();
    for (std::size_t slash; !rest.empty(); rest = slash == std::string::npos ? "" : rest.substr(slash + 1)) {
      slash = rest.find('/');
      at = at.child(rest.substr(0, slash));
    }
    throw RecipeError(at, e.what());
  } catch (const Error& e) {
    throw RecipeError(where, e.what());  // add the recipe location to the component's own error
  } catch (const std::exception& e) {
    throw RecipeError(where, "building " + kind + " '" + type + "' failed: " + e.what());
  }
  if (!obj) throw RecipeError(where, "building " + kind + " '" + type + "' returned nothing");
  by_object_[obj.get()] = record;
  if (info.library) {
    void* raw = obj.get();
    auto bound = std::make_shared<LibraryBoundObject>(LibraryBoundObject{info.library, std::move(obj)});
    obj = std::shared_ptr<void>(bound, raw);
  }
  if (!share_key.empty()) shared_->put(share_key, obj);
  return obj;
}

SharedComponents::SharedComponents(std::vector<std::string> kinds, std::size_t capacity)
    : kinds_(std::move(kinds)), capacity_(std::max<std::size_t>(1, capacity)) {}

bool SharedComponents::shares(const std::string& kind) const {
  return std::find(kinds_.begin(), kinds_.end(), kind) != kinds_.end();
}

std::shared_ptr<void> SharedComponents::find(const std::string& key) {
  for (auto it = recent_.begin(); it != recent_.end(); ++it)
    if (it->first == key) {
      auto entry = std::move(*it);
      recent_.erase(it);
      recent_.push_back(std::move(entry));
      ++hits_;
      return recent_.back().second;
    }
  return nullptr;
}

void SharedComponents::put(const std::string& key, std::shared_ptr<void> object) {
  ++builds_;
  recent_.emplace_back(key, std::move(object));
  if (recent_.size() > capacity_) recent_.erase(recent_.begin());
}

}  // namespace isp
