// Schema validation: strict, with errors that name the recipe file and the JSON pointer.
#include <algorithm>
#include <cmath>
#include <sstream>

#include "isp/registry/options.h"

namespace isp {

Error::~Error() = default;
UnknownComponent::~UnknownComponent() = default;
DuplicateComponent::~DuplicateComponent() = default;
PluginLoadError::~PluginLoadError() = default;
AmbiguousComponent::~AmbiguousComponent() = default;
RegistryFrozen::~RegistryFrozen() = default;
DataError::~DataError() = default;
OptionError::~OptionError() = default;
RecipeError::~RecipeError() = default;

std::string escape_pointer_token(const std::string& key) {
  std::string out;
  for (char c : key) {
    if (c == '~') out += "~0";
    else if (c == '/') out += "~1";
    else out += c;
  }
  return out;
}

static Where located(const Where& parent, std::string pointer) {
  Where w{parent.file, std::move(pointer), parent.locate};
  if (w.locate) w.file = (*w.locate)(w.pointer);
  return w;
}
Where Where::child(const std::string& key) const { return located(*this, pointer + "/" + escape_pointer_token(key)); }
Where Where::child(std::size_t index) const { return located(*this, pointer + "/" + std::to_string(index)); }
std::string Where::str() const {
  std::string p = pointer.empty() ? "/" : pointer;
  return file.empty() ? p : file + ": " + p;
}

RecipeError::RecipeError(const Where& where, const std::string& what)
    : Error(where.str() + ": " + what), where_(where) {}

const char* to_string(ArgType t) {
  switch (t) {
    case ArgType::Bool: return "bool";
    case ArgType::Int: return "int";
    case ArgType::Float: return "float";
    case ArgType::String: return "string";
    case ArgType::IntList: return "list of int";
    case ArgType::FloatList: return "list of float";
    case ArgType::StringList: return "list of string";
    case ArgType::Object: return "object";
    case ArgType::Node: return "node";
    case ArgType::NodeList: return "list of node";
  }
  return "?";
}

static std::size_t edit_distance(const std::string& a, const std::string& b) {
  std::vector<std::size_t> prev(b.size() + 1), cur(b.size() + 1);
  for (std::size_t j = 0; j <= b.size(); ++j) prev[j] = j;
  for (std::size_t i = 1; i <= a.size(); ++i) {
    cur[0] = i;
    for (std::size_t j = 1; j <= b.size(); ++j) {
      char ca = static_cast<char>(std::tolower(static_cast<unsigned char>(a[i - 1])));
      char cb = static_cast<char>(std::tolower(static_cast<unsigned char>(b[j - 1])));
      cur[j] = std::min({prev[j] + 1, cur[j - 1] + 1, prev[j - 1] + (ca == cb ? 0 : 1)});
    }
    std::swap(prev, cur);
  }
  return prev[b.size()];
}

std::string closest_match(const std::string& word, const std::vector<std::string>& candidates) {
  std::string best;
  std::size_t best_d = static_cast<std::size_t>(-1);
  for (const auto& c : candidates) {
    std::size_t d = edit_distance(word, c);
    if (d < best_d) best_d = d, best = c;
  }
  // Only suggest plausible matches (at most ~half the word changed).
  if (best.empty() || best_d > std::max<std::size_t>(2, word.size() / 2)) return "";
  return best;
}

bool Schema::is_reserved(const std::string& key) {
  return key == "type" || key == "kind" || key == "version" || key == "_delete_" || key == "doc" || key == "name";
}

static std::string join_json(const std::vector<json>& v) {
  std::string s;
  for (std::size_t i = 0; i < v.size(); ++i) s += (i ? "," : "") + (v[i].is_string() ? v[i].get<std::string>() : v[i].dump());
  return s;
}

static bool is_int(const json& v) { return v.is_number_integer() || v.is_number_unsigned(); }

static void check_number(const ArgSpec& a, const json& v, const Where& w) {
  double x = v.get<double>();
  if (!std::isfinite(x)) throw RecipeError(w, "expected a finite number, got " + v.dump());
  if (a.min) {
    bool bad = a.min_exclusive ? !(x > *a.min) : !(x >= *a.min);
    if (bad) {
      std::ostringstream os;
      os << "expected a value " << (a.min_exclusive ? "> " : ">= ") << *a.min;
      if (a.max) os << " and " << (a.max_exclusive ? "< " : "<= ") << *a.max;
      os << ", got " << v.dump();
      throw RecipeError(w, os.str());
    }
  }
  if (a.max) {
    bool bad = a.max_exclusive ? !(x < *a.max) : !(x <= *a.max);
    if (bad) {
      std::ostringstream os;
      os << "expected a value " << (a.max_exclusive ? "< " : "<= ") << *a.max;
      if (a.min) os << " and " << (a.min_exclusive ? "> " : ">= ") << *a.min;
      os << ", got " << v.dump();
      throw RecipeError(w, os.str());
    }
  }
}

static void check_value(const ArgSpec& a, const json& v, const Where& w) {
  auto type_error = [&]() { throw RecipeError(w, std::string("expected ") + to_string(a.type) + ", got " + v.dump()); };
  switch (a.type) {
    case ArgType::Bool: if (!v.is_boolean()) type_error(); break;
    case ArgType::Int: if (!is_int(v)) type_error(); check_number(a, v, w); break;
    case ArgType::Float: if (!v.is_number()) type_error(); check_number(a, v, w); break;
    case ArgType::String: if (!v.is_string()) type_error(); break;
    case ArgType::IntList:
    case ArgType::FloatList:
    case ArgType::StringList: {
      if (!v.is_array()) type_error();
      for (std::size_t i = 0; i < v.size(); ++i) {
        const json& e = v[i];
        bool ok = a.type == ArgType::IntList ? is_int(e) : a.type == ArgType::FloatList ? e.is_number() : e.is_string();
        if (!ok) throw RecipeError(w.child(i), std::string("expected ") + to_string(a.type) + " element, got " + e.dump());
        if (a.type != ArgType::StringList) check_number(a, e, w.child(i));
      }
      break;
    }
    case ArgType::Object: break;  // free-form JSON, checked by the component itself
    case ArgType::Node:
      if (!v.is_object() || (!v.contains("$ref") && !v.contains("type")))
        throw RecipeError(w, "expected a node: {\"$ref\": \"<node name>\"} or an inline {\"type\": ...} spec, got " + v.dump());
      break;
    case ArgType::NodeList:
      if (!v.is_array()) type_error();
      for (std::size_t i = 0; i < v.size(); ++i)
        if (!v[i].is_object() || (!v[i].contains("$ref") && !v[i].contains("type")))
          throw RecipeError(w.child(i), "expected a node: {\"$ref\": \"<node name>\"} or an inline {\"type\": ...} spec, got " + v[i].dump());
      break;
  }
  if (!a.choices.empty() && a.type != ArgType::IntList && a.type != ArgType::FloatList && a.type != ArgType::StringList) {
    bool found = false;
    for (const auto& c : a.choices) found = found || c == v;
    if (!found) throw RecipeError(w, "expected one of " + join_json(a.choices) + ", got " + v.dump());
  } else if (!a.choices.empty()) {
    for (std::size_t i = 0; i < v.size(); ++i) {
      bool found = false;
      for (const auto& c : a.choices) found = found || c == v[i];
      if (!found) throw RecipeError(w.child(i), "expected one of " + join_json(a.choices) + ", got " + v[i].dump());
    }
  }
}

json Schema::validate(const json& spec, const Where& where) const {
  if (!spec.is_object()) throw RecipeError(where, "expected an object, got " + spec.dump());
  std::vector<std::string> names;
  for (const auto& a : args) names.push_back(a.name);
  for (auto it = spec.begin(); it != spec.end(); ++it) {
    if (is_reserved(it.key())) continue;
    bool known = std::any_of(args.begin(), args.end(), [&](const ArgSpec& a) { return a.name == it.key(); });
    if (!known) {
      std::string msg = "unknown argument '" + it.key() + "'";
      std::string near = closest_match(it.key(), names);
      if (!near.empty()) msg += "; did you mean '" + near + "'?";
      std::string all;
      for (const auto& n : names) all += (all.empty() ? "" : ", ") + n;
      msg += " (known: " + (all.empty() ? std::string("none") : all) + ")";
      throw RecipeError(where.child(it.key()), msg);
    }
  }
  json out = json::object();
  for (const auto& a : args) {
    auto it = spec.find(a.name);
    if (it == spec.end() || it->is_null()) {
      if (a.required) throw RecipeError(where.child(a.name), std::string("missing required argument (") + to_string(a.type) + ": " + a.doc + ")");
      out[a.name] = a.default_value;
      continue;
    }
    check_value(a, *it, where.child(a.name));
    out[a.name] = *it;
  }
  return out;
}

json ArgSpec::to_json() const {
  json j = {{"name", name}, {"type", to_string(type)}, {"doc", doc}};
  if (required) j["required"] = true;
  else j["default"] = default_value;
  if (min) j[min_exclusive ? "exclusive_min" : "min"] = *min;
  if (max) j[max_exclusive ? "exclusive_max" : "max"] = *max;
  if (!choices.empty()) j["choices"] = choices;
  if (!node_kind.empty()) j["kind"] = node_kind;
  return j;
}

json Schema::to_json() const {
  json j = json::array();
  for (const auto& a : args) j.push_back(a.to_json());
  return j;
}

}  // namespace isp
