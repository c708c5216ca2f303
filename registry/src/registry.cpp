// The component registry: registration, lookup by [scope::]Name[@version], ambiguity and freezing.
#include "isp/registry/registry.h"

#include <algorithm>
#include <sstream>

#include "loaded_library.h"

namespace isp {

const std::vector<std::string>& known_kinds() {
  static const std::vector<std::string> k{"backbone", "dataset", "stage", "decoder", "feature_filter", "mask_head",
                                          "mask_source", "sampler", "regularizer", "pruner"};
  return k;
}

static bool valid_identifier(const std::string& s) {
  if (s.empty()) return false;
  for (char c : s)
    if (!(std::isalnum(static_cast<unsigned char>(c)) || c == '_')) return false;
  return true;
}

TypeName TypeName::parse(const std::string& text, const Where& where) {
  TypeName t;
  std::string rest = text;
  if (auto at = rest.rfind('@'); at != std::string::npos) {
    const std::string v = rest.substr(at + 1);
    rest = rest.substr(0, at);
    const bool digits = !v.empty() && v.size() < 9 && std::all_of(v.begin(), v.end(), [](char c) { return c >= '0' && c <= '9'; });
    if (!digits || std::stoi(v) < 1)
      throw RecipeError(where, "'" + text + "': expected Name@<version>, a version number >= 1 after '@'");
    t.version = std::stoi(v);
  }
  if (auto sep = rest.find("::"); sep != std::string::npos) {
    t.scope = rest.substr(0, sep);
    rest = rest.substr(sep + 2);
    if (!valid_identifier(t.scope))
      throw RecipeError(where, "'" + text + "': expected scope::Name with a scope of letters, digits and '_'");
  }
  if (rest.empty() || rest.find("::") != std::string::npos)
    throw RecipeError(where, "'" + text + "': expected [scope::]Name[@version]");
  t.name = rest;
  return t;
}

std::string TypeName::str() const {
  return (scope.empty() ? "" : scope + "::") + name + (version ? "@" + std::to_string(*version) : "");
}

json ComponentRecord::to_json() const {
  return {{"kind", kind}, {"type", type}, {"version", version}, {"library", library},
          {"library_name", library_name}, {"library_version", library_version}, {"library_hash", library_hash}};
}

json ComponentRecord::identity() const {
  json j = to_json();
  j.erase("library");
  return j;
}

std::string ComponentInfo::qualified_name() const { return scope.empty() ? name : scope + "::" + name; }
std::string ComponentInfo::origin() const { return library ? library->path : std::string("builtin"); }

ComponentRecord ComponentInfo::record() const {
  ComponentRecord r;
  r.kind = kind;
  r.type = qualified_name();
  r.version = version;
  r.library = origin();
  if (library) {
    r.library_name = library->descriptor.library_name ? library->descriptor.library_name : "";
    r.library_version = library->descriptor.library_version ? library->descriptor.library_version : "";
    r.library_hash = library->hash;
  }
  return r;
}

json ComponentInfo::to_json() const {
  return {{"kind", kind}, {"name", name}, {"scope", scope}, {"type", qualified_name()}, {"version", version},
          {"doc", doc}, {"library", origin()}, {"schema", schema.to_json()}};
}

Registry::Registry() = default;
Registry::~Registry() {
  // Entries hold factories whose code lives in plugins: drop them before the library handles (P2).
  entries_.clear();
  libraries_.clear();
}

static std::string key_str(const ComponentInfo& c) {
  return c.kind + " '" + c.qualified_name() + "' v" + std::to_string(c.version);
}

void Registry::add(ComponentInfo info) {
  std::vector<ComponentInfo> v;
  v.push_back(std::move(info));
  add_all(std::move(v));
}

void Registry::add_all(std::vector<ComponentInfo> infos) {
  for (auto& c : infos) {
    if (auto sep = c.name.find("::"); sep != std::string::npos) {
      c.scope = c.name.substr(0, sep);
      c.name = c.name.substr(sep + 2);
    }
    if (c.kind.empty() || c.name.empty()) throw Error("component with an empty kind or name from " + c.origin());
  }
  std::lock_guard<std::mutex> lock(mu_);
  if (frozen_)
    throw RegistryFrozen("the registry is frozen (a recipe is being built); cannot register " +
                         (infos.empty() ? std::string("components") : key_str(infos[0])) + " from " +
                         (infos.empty() ? std::string("?") : infos[0].origin()));
  auto same = [](const ComponentInfo& a, const ComponentInfo& b) {
    return a.kind == b.kind && a.scope == b.scope && a.name == b.name && a.version == b.version;
  };
  for (std::size_t i = 0; i < infos.size(); ++i) {
    const auto& c = infos[i];
    for (const auto& e : entries_)
      if (same(e, c))
        throw DuplicateComponent("duplicate component " + key_str(c) + ": registered by " + e.origin() + " and by " +
                                 c.origin());
    for (std::size_t j = 0; j < i; ++j)
      if (same(infos[j], c)) throw DuplicateComponent("duplicate component " + key_str(c) + ": registered twice by " + c.origin());
  }
  for (auto& c : infos) entries_.push_back(std::move(c));
}

void Registry::freeze() {
  std::lock_guard<std::mutex> lock(mu_);
  frozen_ = true;
}

bool Registry::frozen() const {
  std::lock_guard<std::mutex> lock(mu_);
  return frozen_;
}

std::vector<const ComponentInfo*> Registry::matches(const std::string& kind, const TypeName& t) const {
  std::vector<const ComponentInfo*> out;
  for (const auto& e : entries_)
    if ((kind.empty() || e.kind == kind) && e.name == t.name && (t.scope.empty() || e.scope == t.scope) &&
        (!t.version || e.version == *t.version))
      out.push_back(&e);
  return out;
}

const ComponentInfo* Registry::find(const std::string& kind, const std::string& name, std::optional<int> version) const {
  TypeName t = TypeName::parse(name);
  if (version) t.version = version;
  std::lock_guard<std::mutex> lock(mu_);
  const auto m = matches(kind, t);
  if (m.empty()) return nullptr;
  std::set<std::string> origins;
  for (const auto* e : m) origins.insert(e->origin() + "|" + e->scope);
  if (origins.size() > 1) {
    std::ostringstream os;
    os << "'" << t.str() << "' is offered by several libraries: ";
    for (std::size_t i = 0; i < m.size(); ++i)
      os << (i ? ", " : "") << m[i]->qualified_name() << "@" << m[i]->version << " (" << m[i]->origin() << ")";
    os << ". Name one: write scope::" << t.name << " (e.g. '" << m[0]->qualified_name() << "') or pin a version "
       << t.name << "@N that only one of them offers";
    throw AmbiguousComponent(os.str());
  }
  const ComponentInfo* best = nullptr;
  for (const auto* e : m)
    if (!best || e->version > best->version) best = e;
  return best;
}

std::vector<const ComponentInfo*> Registry::list(const std::string& kind) const {
  std::lock_guard<std::mutex> lock(mu_);
  std::vector<const ComponentInfo*> out;
  for (const auto& e : entries_)
    if (kind.empty() || e.kind == kind) out.push_back(&e);
  std::sort(out.begin(), out.end(), [](auto* a, auto* b) {
    return std::tie(a->kind, a->name, a->scope, a->version) < std::tie(b->kind, b->name, b->scope, b->version);
  });
  return out;
}

std::vector<std::string> Registry::kinds_of(const std::string& name) const {
  TypeName t = TypeName::parse(name);
  std::lock_guard<std::mutex> lock(mu_);
  std::vector<std::string> out;
  for (const auto* e : matches("", t))
    if (std::find(out.begin(), out.end(), e->kind) == out.end()) out.push_back(e->kind);
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
  try {
    if (const ComponentInfo* c = find(kind, name, version)) return *c;
  } catch (const AmbiguousComponent& e) {
    throw AmbiguousComponent(where.str() + ": " + e.what());
  }
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
  std::string near = closest_match(TypeName::parse(name).name, plain);
  if (!near.empty()) os << " Did you mean '" << near << "'?";
  os << " Plugin folders scanned: ";
  for (std::size_t i = 0; i < scanned_.size(); ++i) os << (i ? ", " : "") << scanned_[i];
  if (scanned_.empty()) os << "(none)";
  os << ". Failed loads: ";
  for (std::size_t i = 0; i < failures_.size(); ++i) os << (i ? "; " : "") << failures_[i];
  if (failures_.empty()) os << "(none)";
  throw UnknownComponent(os.str());
}

Registry& global_registry() {
  static Registry* r = new Registry();  // leaked on purpose: plugins are never unloaded
  return *r;
}

}  // namespace isp
