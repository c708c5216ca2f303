// $ref checks of a loaded recipe: dangling references (with the closest node name) and cycles, found without
// recursion so that input cannot decide the stack depth.
#include <map>
#include <string>
#include <vector>

#include "isp/registry/options.h"
#include "isp/registry/recipe.h"

namespace isp {

static void collect_refs(const json& v, const std::string& ptr, std::vector<std::pair<std::string, std::string>>& out,
                         const Recipe& r) {
  if (v.is_object()) {
    if (auto it = v.find("$ref"); it != v.end()) {
      if (!it->is_string()) throw RecipeError(r.where(ptr + "/$ref"), "expected a node name string, got " + it->dump());
      if (v.size() != 1) throw RecipeError(r.where(ptr), "a {\"$ref\": ...} object may not carry other keys");
      out.emplace_back(it->get<std::string>(), ptr);
      return;
    }
    for (auto it = v.begin(); it != v.end(); ++it) collect_refs(it.value(), ptr + "/" + escape_pointer_token(it.key()), out, r);
  } else if (v.is_array()) {
    for (std::size_t i = 0; i < v.size(); ++i) collect_refs(v[i], ptr + "/" + std::to_string(i), out, r);
  }
}

void check_references(const Recipe& r) {
  const json& doc = r.doc;
  json nodes = doc.value("nodes", json::object());
  if (!nodes.is_object()) throw RecipeError(r.where("/nodes"), "expected an object mapping node names to specs");
  std::vector<std::pair<std::string, std::string>> refs;
  collect_refs(doc, "", refs, r);
  for (const auto& [name, ptr] : refs) {
    if (!nodes.contains(name)) {
      std::vector<std::string> names;
      for (auto it = nodes.begin(); it != nodes.end(); ++it) names.push_back(it.key());
      std::string msg = "dangling reference to node '" + name + "'";
      std::string near = closest_match(name, names);
      if (!near.empty()) msg += "; did you mean '" + near + "'?";
      throw RecipeError(r.where(ptr + "/$ref"), msg);
    }
  }
  // Cycle detection over node -> referenced nodes.
  std::map<std::string, std::vector<std::pair<std::string, std::string>>> edges;
  for (auto it = nodes.begin(); it != nodes.end(); ++it) {
    std::vector<std::pair<std::string, std::string>> out;
    collect_refs(it.value(), "/nodes/" + escape_pointer_token(it.key()), out, r);
    edges[it.key()] = out;
  }
  // Iterative depth-first search: a chain of 10^5 nodes must not overflow the stack.
  std::map<std::string, int> state;  // 0 new, 1 on the path, 2 done
  std::vector<std::string> path;
  std::vector<std::size_t> next;  // per path entry: the next edge to follow
  for (auto it = nodes.begin(); it != nodes.end(); ++it) {
    if (state[it.key()] != 0) continue;
    path.push_back(it.key());
    next.push_back(0);
    state[it.key()] = 1;
    while (!path.empty()) {
      const auto& out = edges[path.back()];
      if (next.back() == out.size()) {
        state[path.back()] = 2;
        path.pop_back();
        next.pop_back();
        continue;
      }
      const auto& [to, ptr] = out[next.back()++];
      if (state[to] == 1) {
        std::string cyc;
        bool on = false;
        for (const auto& p : path) { if (p == to) on = true; if (on) cyc += p + " -> "; }
        throw RecipeError(r.where(ptr + "/$ref"), "reference cycle: " + cyc + to);
      }
      if (state[to] == 0) {
        state[to] = 1;
        path.push_back(to);
        next.push_back(0);
      }
    }
  }
}

}  // namespace isp
