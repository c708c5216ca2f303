#pragma once
// Options structs and their argument schema, generated from one list.
//
// A component's options are a plain struct with defaults and a visit() that names every field once:
//
//   struct ResNetCifarOptions {
//     int depth = 56;
//     template <class V> void visit(V& v) {
//       v("depth", depth, "layers: 6n+2", isp::one_of({20, 32, 44, 56, 110}));
//     }
//   };
//
// The same visit() yields the schema (type, default, range/choices, doc) and reads a validated JSON object
// into the struct. Validation is strict: unknown keys, wrong types, out-of-range values and missing required
// arguments are RecipeErrors naming the file and JSON pointer.
#include <cstdint>
#include <optional>
#include <string>
#include <vector>

#include <nlohmann/json.hpp>

#include "isp/registry/error.h"
#include "isp/registry/api.h"

namespace isp {

using json = nlohmann::json;

enum class ArgType { Bool, Int, Float, String, IntList, FloatList, StringList, Object, Node, NodeList };
ISP_API const char* to_string(ArgType t);

// A value that names another component: {"$ref": "node"} or an inline {"type": ..., ...} spec.
struct NodeRef {
  json spec;
  Where where;
  bool empty() const { return spec.is_null(); }
};

struct ArgSpec {
  std::string name;
  ArgType type = ArgType::Int;
  std::string doc;
  json default_value;  // null when required or when a Node/Object field defaults to "absent"
  bool required = false;
  bool optional = false;  // may be null/absent without a default
  std::optional<double> min, max;
  bool min_exclusive = false, max_exclusive = false;
  std::vector<json> choices;
  std::string node_kind;  // for ArgType::Node: the registry kind it must resolve to
  json to_json() const;
};

// Constraint tags accepted after the doc string in visit().
struct Required {};
struct Optional {};
struct Range { std::optional<double> min, max; bool min_exclusive = false, max_exclusive = false; };
struct Choices { std::vector<json> values; };
struct NodeKind { std::string kind; };
inline Required required() { return {}; }
inline Optional optional_arg() { return {}; }
inline Range at_least(double v) { return {v, std::nullopt}; }
inline Range greater_than(double v) { return {v, std::nullopt, true, false}; }
inline Range between(double lo, double hi) { return {lo, hi}; }
inline Range open_closed(double lo, double hi) { return {lo, hi, true, false}; }
inline Choices one_of(std::vector<json> v) { return {std::move(v)}; }
inline NodeKind of_kind(std::string k) { return {std::move(k)}; }

class ISP_API Schema {
 public:
  std::vector<ArgSpec> args;
  // Keys every component spec may carry besides its arguments.
  static bool is_reserved(const std::string& key);
  // Checks `spec` strictly and returns it with defaults filled in (reserved keys dropped).
  json validate(const json& spec, const Where& where) const;
  json to_json() const;
};

namespace detail {
template <class T> struct ArgTypeOf;
template <> struct ArgTypeOf<bool> { static constexpr ArgType value = ArgType::Bool; };
template <> struct ArgTypeOf<int> { static constexpr ArgType value = ArgType::Int; };
template <> struct ArgTypeOf<int64_t> { static constexpr ArgType value = ArgType::Int; };
template <> struct ArgTypeOf<float> { static constexpr ArgType value = ArgType::Float; };
template <> struct ArgTypeOf<double> { static constexpr ArgType value = ArgType::Float; };
template <> struct ArgTypeOf<std::string> { static constexpr ArgType value = ArgType::String; };
template <> struct ArgTypeOf<std::vector<int>> { static constexpr ArgType value = ArgType::IntList; };
template <> struct ArgTypeOf<std::vector<int64_t>> { static constexpr ArgType value = ArgType::IntList; };
template <> struct ArgTypeOf<std::vector<float>> { static constexpr ArgType value = ArgType::FloatList; };
template <> struct ArgTypeOf<std::vector<double>> { static constexpr ArgType value = ArgType::FloatList; };
template <> struct ArgTypeOf<std::vector<std::string>> { static constexpr ArgType value = ArgType::StringList; };
template <> struct ArgTypeOf<json> { static constexpr ArgType value = ArgType::Object; };
template <> struct ArgTypeOf<NodeRef> { static constexpr ArgType value = ArgType::Node; };
template <> struct ArgTypeOf<std::vector<NodeRef>> { static constexpr ArgType value = ArgType::NodeList; };

inline void apply(ArgSpec& s, const Required&) { s.required = true; s.default_value = nullptr; }
inline void apply(ArgSpec& s, const Optional&) { s.optional = true; }
inline void apply(ArgSpec& s, const Range& r) {
  s.min = r.min; s.max = r.max; s.min_exclusive = r.min_exclusive; s.max_exclusive = r.max_exclusive;
}
inline void apply(ArgSpec& s, const Choices& c) { s.choices = c.values; }
inline void apply(ArgSpec& s, const NodeKind& k) { s.node_kind = k.kind; }

template <class T> json default_of(const T& v) { return json(v); }
inline json default_of(const NodeRef& v) { return v.spec; }
inline json default_of(const std::vector<NodeRef>& v) {
  json j = json::array();
  for (const auto& r : v) j.push_back(r.spec);
  return j;
}
}  // namespace detail

// visit() pass 1: collect the schema from a default-constructed struct.
class SchemaCollector {
 public:
  Schema schema;
  template <class T, class... C>
  void operator()(const char* name, T& field, const char* doc, const C&... constraints) {
    ArgSpec s;
    s.name = name;
    s.type = detail::ArgTypeOf<T>::value;
    s.doc = doc;
    s.default_value = detail::default_of(field);
    (detail::apply(s, constraints), ...);
    if (s.default_value.is_null() && !s.required) s.optional = true;
    schema.args.push_back(std::move(s));
  }
};

// visit() pass 2: read a validated object (defaults filled) into the struct.
class OptionsReader {
 public:
  OptionsReader(const json& j, const Where& w) : j_(j), w_(w) {}
  template <class T, class... C>
  void operator()(const char* name, T& field, const char*, const C&...) {
    auto it = j_.find(name);
    if (it == j_.end() || it->is_null()) return;
    read(*it, field, w_.child(name));
  }
 private:
  template <class T> static void read(const json& v, T& field, const Where&) { field = v.get<T>(); }
  static void read(const json& v, NodeRef& field, const Where& w) { field.spec = v; field.where = w; }
  static void read(const json& v, std::vector<NodeRef>& field, const Where& w) {
    field.clear();
    for (std::size_t i = 0; i < v.size(); ++i) field.push_back(NodeRef{v[i], w.child(i)});
  }
  const json& j_;
  Where w_;
};

// visit() pass 3: write the struct back to JSON (for resolved recipes and checkpoints).
class OptionsWriter {
 public:
  json out = json::object();
  template <class T, class... C>
  void operator()(const char* name, T& field, const char*, const C&...) { out[name] = detail::default_of(field); }
};

template <class Options> Schema schema_of() {
  Options o{};
  SchemaCollector c;
  o.visit(c);
  return std::move(c.schema);
}
template <class Options> Options read_options(const json& validated, const Where& where) {
  Options o{};
  OptionsReader r(validated, where);
  o.visit(r);
  return o;
}
template <class Options> json options_to_json(Options o) {
  OptionsWriter w;
  o.visit(w);
  return std::move(w.out);
}

// "closest match" helper shared by unknown-key and unknown-name errors.
ISP_API std::string closest_match(const std::string& word, const std::vector<std::string>& candidates);

}  // namespace isp
