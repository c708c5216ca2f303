// Stage fingerprints, the resolved recipe, and restoring a run folder.
//
// A stage's fingerprint covers exactly what its artifact depends on: its own spec, every node it reaches
// through $ref (transitively), the component (type, version, library version and file hash) each of them was
// built from, the run seed, and the fingerprints of the stages whose artifacts it takes. Each stage runs under
// its own seed derived from the run seed and its name, so an unrelated change elsewhere in the recipe neither
// changes its fingerprint nor its result.
#include <torch/utils.h>

#include <algorithm>
#include <cstdio>
#include <filesystem>
#include <map>
#include <set>

#include "run_folder.h"

namespace fs = std::filesystem;

namespace isp::detail {

uint64_t fnv1a(const std::string& s) {
  uint64_t h = 1469598103934665603ULL;
  for (unsigned char c : s) h = (h ^ c) * 1099511628211ULL;
  return h;
}

static std::string hex(uint64_t v) {
  char buf[17];
  std::snprintf(buf, sizeof buf, "%016llx", static_cast<unsigned long long>(v));
  return buf;
}

uint64_t stage_seed(uint64_t run_seed, const std::string& stage_name) {
  // torch::manual_seed takes any 64-bit value; keep it positive for readers of the logs.
  return fnv1a(std::to_string(run_seed) + "/" + stage_name) & 0x7fffffffffffffffULL;
}

json read_json_or(const std::string& path, json fallback) {
  if (!fs::exists(path)) return fallback;
  try {
    return json::parse(read_text_file(path));
  } catch (const std::exception& e) {
    throw Error(path + ": unreadable (" + e.what() + ")");
  }
}

std::string plugin_path(const Recipe& r, std::size_t i) {
  fs::path p = r.doc["plugins"][i].get<std::string>();
  if (p.is_relative()) {  // relative to the recipe file that named it
    fs::path origin = r.where("/plugins/" + std::to_string(i)).file;
    p = (origin.has_parent_path() ? origin.parent_path() : fs::path(".")) / p;
  }
  return fs::absolute(p).lexically_normal().string();
}

std::vector<PlannedStage> build_stages(BuildContext& ctx, const Recipe& r, uint64_t seed) {
  const json& sj = r.doc["stages"];
  const json nodes = r.doc.value("nodes", json::object());
  std::vector<PlannedStage> out;
  std::vector<BuildTrace> traces(sj.size());
  std::set<std::string> names;
  std::map<std::string, std::size_t> stage_nodes;  // node name of a listed stage -> its index
  for (std::size_t i = 0; i < sj.size(); ++i)
    if (std::string n = BuildContext::ref_name(sj[i]); !n.empty()) stage_nodes[n] = i;
  for (std::size_t i = 0; i < sj.size(); ++i) {
    const Where w = r.where("/stages/" + std::to_string(i));
    if (!sj[i].is_object()) throw RecipeError(w, "expected a stage spec {\"type\": ...}");
    PlannedStage p;
    p.name = stage_name(sj[i], i);
    if (!names.insert(p.name).second) throw RecipeError(w.child("name"), "duplicate stage name '" + p.name + "'");
    p.seed = stage_seed(seed, p.name);
    torch::manual_seed(p.seed);  // weights the stage's own nodes initialise with
    ctx.begin_trace(&traces[i]);
    try {
      p.stage = ctx.get<Stage>(NodeRef{sj[i], w});
    } catch (...) {
      ctx.end_trace();
      throw;
    }
    ctx.end_trace();
    if (const ComponentRecord* rec = ctx.record_of(p.stage.get())) p.type = rec->type;
    const std::string self = BuildContext::ref_name(sj[i]);
    for (const auto& n : traces[i].nodes) {
      if (n == self || ctx.kind_of_node(n) != "stage") continue;
      auto at = stage_nodes.find(n);
      if (at == stage_nodes.end() || at->second >= i)
        throw RecipeError(w, "stage '" + p.name + "' takes the result of stage node '" + n + "', which " +
                                 (at == stage_nodes.end() ? std::string("is not listed in /stages")
                                                          : "comes after it in /stages") +
                                 "; list it before this stage");
      p.inputs.push_back(n);
    }
    out.push_back(std::move(p));
  }
  // Every node is built even when no stage references it, so `validate` checks the whole recipe.
  for (auto it = nodes.begin(); it != nodes.end(); ++it) ctx.build_node(it.key(), "");

  const json doc = resolved_document(r, ctx);
  std::map<std::string, std::string> fp_of_node;
  for (std::size_t i = 0; i < out.size(); ++i) {
    const std::string self = BuildContext::ref_name(sj[i]);
    json f = {{"seed", seed}, {"stage", doc["stages"][i]}, {"nodes", json::object()}, {"components", json::object()},
              {"inputs", json::object()}};
    for (const auto& n : traces[i].nodes)
      if (n == self || ctx.kind_of_node(n) != "stage") f["nodes"][n] = doc["nodes"][n];
    for (const auto& [ptr, rec] : traces[i].components) f["components"][ptr] = rec.identity();
    for (const auto& n : out[i].inputs) f["inputs"][n] = fp_of_node.at(n);
    out[i].fingerprint = hex(fnv1a(f.dump()));
    if (!self.empty()) fp_of_node[self] = out[i].fingerprint;
  }
  return out;
}

json resolved_document(const Recipe& r, const BuildContext& ctx) {
  json doc = r.doc;
  if (doc.contains("plugins"))  // absolute, so the run folder can be reopened from anywhere
    for (std::size_t i = 0; i < doc["plugins"].size(); ++i) doc["plugins"][i] = plugin_path(r, i);
  json components = json::object();
  for (const auto& [ptr, rec] : ctx.records()) {
    components[ptr] = rec.to_json();
    const json::json_pointer jp(ptr);
    if (doc.contains(jp) && doc[jp].is_object() && doc[jp].contains("type")) {
      doc[jp]["type"] = rec.type + "@" + std::to_string(rec.version);
      doc[jp].erase("version");
    }
  }
  doc["components"] = components;
  return doc;
}

void link_tree(const std::string& from_s, const std::string& to_s) {
  const fs::path from = from_s, to = to_s;
  fs::create_directories(to);
  for (const auto& e : fs::recursive_directory_iterator(from)) {
    fs::path target = to / fs::relative(e.path(), from);
    if (e.is_directory()) {
      fs::create_directories(target);
      continue;
    }
    std::error_code ec;
    fs::create_hard_link(e.path(), target, ec);  // checkpoints are only ever replaced by rename
    if (ec) fs::copy_file(e.path(), target, fs::copy_options::overwrite_existing);
  }
}

std::string aside_name(const std::string& dir) {
  for (int k = 1;; ++k) {
    std::string p = dir + ".replaced-" + std::to_string(k);
    if (!fs::exists(p)) return p;
  }
}

}  // namespace isp::detail

namespace isp {

std::string stage_name(const json& spec, std::size_t i) {
  std::string name = BuildContext::ref_name(spec);
  if (name.empty()) name = spec.value("name", spec.value("type", std::string("stage")) + std::to_string(i));
  return name;
}

std::shared_ptr<Stage> RestoredRun::stage(const std::string& name) const {
  for (const auto& [n, s] : stages)
    if (n == name) return s;
  return nullptr;
}

RestoredRun restore_run(Registry& reg, const std::string& work_dir) {
  RestoredRun out;
  out.work_dir = work_dir;
  const std::string resolved = work_dir + "/recipe.resolved.json";
  if (!fs::exists(resolved)) throw Error(work_dir + ": not a run folder (no recipe.resolved.json)");
  out.recipe = load_recipe(resolved);
  load_recipe_plugins(reg, out.recipe);
  out.runtime = apply_runtime(out.recipe);
  const uint64_t seed = out.recipe.doc.value("seed", json(1)).get<uint64_t>();
  const json state = detail::read_json_or(work_dir + "/state.json", json{{"completed", json::array()}});
  out.summary = detail::read_json_or(work_dir + "/summary.json", json::object());
  const Recipe& r = out.recipe;
  out.ctx = std::make_unique<BuildContext>(reg, r.doc, [&r](const std::string& p) { return r.where(p); });
  for (auto& p : detail::build_stages(*out.ctx, r, seed)) {
    bool done = false;
    for (const auto& c : state["completed"]) done = done || c == p.name;
    if (!done) continue;
    RunContext rc;
    rc.run_dir = work_dir;
    rc.stage_name = p.name;
    rc.stage_type = p.type;
    rc.stage_dir = work_dir + "/" + p.name;
    rc.device = out.runtime.device;
    rc.seed = p.seed;
    rc.resume = true;
    rc.resolved_recipe = r.doc;
    p.stage->restore(rc);
    out.stages.emplace_back(p.name, p.stage);
  }
  return out;
}

}  // namespace isp
