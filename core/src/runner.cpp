// Pipeline runner: recipe -> plugins -> nodes and stages -> stages executed in order, resumable.
#include "isp/runner.h"

#include <ATen/Parallel.h>
#include <ATen/Context.h>
#include <c10/core/Device.h>
#include <torch/cuda.h>
#include <torch/utils.h>

#include <atomic>
#include <csignal>
#include <cstdio>
#include <filesystem>
#include <fstream>
#include <thread>

#include "isp/interfaces/stage.h"
#include <chrono>
#include <map>
#include <set>

namespace fs = std::filesystem;

namespace isp {

namespace {
std::atomic<bool> g_interrupted{false};
extern "C" void on_sigint(int) { g_interrupted.store(true); }

const std::vector<std::string> kTopLevelKeys{"_base_", "plugins", "nodes", "stages", "vars", "seed", "runtime",
                                             "work_dir", "name", "description"};

uint64_t fnv1a(const std::string& s) {
  uint64_t h = 1469598103934665603ULL;
  for (unsigned char c : s) h = (h ^ c) * 1099511628211ULL;
  return h;
}

c10::Device g_device(c10::kCPU);
}  // namespace

static std::string plugin_path(const Recipe& r, std::size_t i) {
  const json& e = r.doc["plugins"][i];
  fs::path p = e.get<std::string>();
  if (p.is_relative()) {
    // relative to the recipe file that named it
    fs::path origin = r.where("/plugins/" + std::to_string(i)).file;
    p = (origin.has_parent_path() ? origin.parent_path() : fs::path(".")) / p;
  }
  return fs::absolute(p).lexically_normal().string();
}

void load_recipe_plugins(Registry& reg, const Recipe& r) {
  auto it = r.doc.find("plugins");
  if (it == r.doc.end()) return;
  if (!it->is_array()) throw RecipeError(r.where("/plugins"), "expected a list of plugin files or folders");
  for (std::size_t i = 0; i < it->size(); ++i) {
    const json& e = (*it)[i];
    std::string ptr = "/plugins/" + std::to_string(i);
    if (!e.is_string()) throw RecipeError(r.where(ptr), "expected a path string, got " + e.dump());
    fs::path p = plugin_path(r, i);
    if (fs::is_directory(p)) {
      reg.scan_directory(p.string());
    } else if (fs::exists(p)) {
      try {
        reg.load_library(p.string());
      } catch (const Error& err) {
        throw RecipeError(r.where(ptr), err.what());
      }
    } else {
      throw RecipeError(r.where(ptr), "plugin file or folder not found: " + p.string());
    }
  }
}

void apply_runtime(const Recipe& r) {
  json rt = r.doc.value("runtime", json::object());
  if (!rt.is_object()) throw RecipeError(r.where("/runtime"), "expected an object");
  for (auto it = rt.begin(); it != rt.end(); ++it)
    if (it.key() != "threads" && it.key() != "device" && it.key() != "deterministic")
      throw RecipeError(r.where("/runtime/" + it.key()), "unknown runtime setting (known: threads, device, deterministic)");
  int threads = 0;
  if (rt.contains("threads")) {
    if (!rt["threads"].is_number_integer() || rt["threads"].get<int>() < 0)
      throw RecipeError(r.where("/runtime/threads"), "expected an integer >= 0 (0 = all cores), got " + rt["threads"].dump());
    threads = rt["threads"];
  }
  if (threads == 0) threads = static_cast<int>(std::max(1u, std::thread::hardware_concurrency()));
  // The default intra-op pool starts with 1 thread on small VMs (build-notes P4): always set it.
  at::set_num_threads(threads);
  std::string dev = rt.value("device", std::string("auto"));
  if (dev == "auto") dev = torch::cuda::is_available() ? "cuda" : "cpu";
  try {
    g_device = c10::Device(dev);
  } catch (const std::exception&) {
    throw RecipeError(r.where("/runtime/device"), "expected auto, cpu, cuda or cuda:N, got \"" + dev + "\"");
  }
  if (g_device.is_cuda() && !torch::cuda::is_available())
    throw RecipeError(r.where("/runtime/device"), "CUDA requested but this LibTorch sees no CUDA device");
}

static json read_json_or(const std::string& path, json fallback) {
  if (!fs::exists(path)) return fallback;
  try {
    return json::parse(read_text_file(path));
  } catch (const std::exception& e) {
    throw Error(path + ": unreadable (" + e.what() + ")");
  }
}

std::string stage_name(const json& spec, std::size_t i) {
  std::string name = BuildContext::ref_name(spec);
  if (name.empty()) name = spec.value("name", spec.value("type", std::string("stage")) + std::to_string(i));
  return name;
}

static void collect_refs(const json& j, std::vector<std::string>& out) {
  if (j.is_object()) {
    std::string ref = BuildContext::ref_name(j);
    if (!ref.empty()) out.push_back(ref);
    for (const auto& v : j) collect_refs(v, out);
  } else if (j.is_array()) {
    for (const auto& v : j) collect_refs(v, out);
  }
}

// Stage fingerprints: what each stage's outputs depend on, so that a changed recipe reruns exactly the stages it
// affects and another run's finished stages can be reused (`--reuse`). A stage depends on its own spec, on every
// node it reaches through $ref (transitively), on the seed and the plugins -- and on every earlier stage, since
// stages hand results on through shared nodes (the classifier stage trains the backbone node that the prune
// stage reads without naming the classifier stage). Hence each fingerprint includes the previous one.
static std::vector<std::pair<std::string, std::string>> stage_fingerprints(const json& doc) {
  std::vector<std::pair<std::string, std::string>> out;
  const json nodes = doc.value("nodes", json::object());
  const json stages = doc.value("stages", json::array());
  std::string previous;
  for (std::size_t i = 0; i < stages.size(); ++i) {
    json f = {{"previous", previous}, {"seed", doc.value("seed", json(1))},
              {"plugins", doc.value("plugins", json::array())}, {"stage", stages[i]}, {"nodes", json::object()}};
    std::vector<std::string> todo;
    collect_refs(stages[i], todo);
    while (!todo.empty()) {
      std::string n = todo.back();
      todo.pop_back();
      if (f["nodes"].contains(n) || !nodes.contains(n)) continue;
      f["nodes"][n] = nodes[n];
      collect_refs(nodes[n], todo);
    }
    char hex[17];
    std::snprintf(hex, sizeof hex, "%016llx", static_cast<unsigned long long>(fnv1a(f.dump())));
    previous = hex;
    out.emplace_back(stage_name(stages[i], i), previous);
  }
  return out;
}

// A free name next to `dir` for keeping an outdated stage folder: prune.replaced-1, prune.replaced-2, ...
static std::string aside_name(const std::string& dir) {
  for (int k = 1;; ++k) {
    std::string p = dir + ".replaced-" + std::to_string(k);
    if (!fs::exists(p)) return p;
  }
}

// Copies a finished stage folder of another run with hard links (checkpoints are only ever replaced by rename,
// so the source files are never modified through the links); plain copies across file systems.
static void link_tree(const fs::path& from, const fs::path& to) {
  fs::create_directories(to);
  for (const auto& e : fs::recursive_directory_iterator(from)) {
    fs::path target = to / fs::relative(e.path(), from);
    if (e.is_directory()) {
      fs::create_directories(target);
      continue;
    }
    std::error_code ec;
    fs::create_hard_link(e.path(), target, ec);
    if (ec) fs::copy_file(e.path(), target, fs::copy_options::overwrite_existing);
  }
}

int run_recipe(Registry& reg, const RunOptions& o) {
  Recipe r = load_recipe(o.recipe_path, o.overrides);
  for (auto it = r.doc.begin(); it != r.doc.end(); ++it)
    if (std::find(kTopLevelKeys.begin(), kTopLevelKeys.end(), it.key()) == kTopLevelKeys.end()) {
      std::string near = closest_match(it.key(), kTopLevelKeys);
      throw RecipeError(r.where("/" + it.key()), "unknown top-level key" + (near.empty() ? "" : "; did you mean '" + near + "'?"));
    }
  load_recipe_plugins(reg, r);
  apply_runtime(r);
  if (!r.doc.contains("stages") || !r.doc["stages"].is_array() || r.doc["stages"].empty())
    throw RecipeError(r.where("/stages"), "expected a non-empty list of stages");
  json seed_j = r.doc.value("seed", json(1));
  if (!seed_j.is_number_integer() || seed_j.get<int64_t>() < 0)
    throw RecipeError(r.where("/seed"), "expected an integer >= 0, got " + seed_j.dump());
  const uint64_t seed = seed_j.get<uint64_t>();
  torch::manual_seed(seed);  // weight initialisation is part of the recipe

  BuildContext ctx(reg, r.doc, [&r](const std::string& p) { return r.where(p); });
  struct Entry { std::string name; std::shared_ptr<Stage> stage; };
  std::vector<Entry> stages;
  std::set<std::string> names;
  const json& sj = r.doc["stages"];
  for (std::size_t i = 0; i < sj.size(); ++i) {
    std::string ptr = "/stages/" + std::to_string(i);
    Where w = r.where(ptr);
    if (!sj[i].is_object()) throw RecipeError(w, "expected a stage spec {\"type\": ...}");
    // A stage is usually a node ({"$ref": "classifier"}), so recipes can override its fields by merging.
    std::string name = stage_name(sj[i], i);
    if (!names.insert(name).second) throw RecipeError(w.child("name"), "duplicate stage name '" + name + "'");
    stages.push_back({name, ctx.get<Stage>(NodeRef{sj[i], w})});
  }
  // Every node is built even when no stage references it, so `validate` checks the whole recipe.
  json nodes = r.doc.value("nodes", json::object());
  for (auto it = nodes.begin(); it != nodes.end(); ++it) ctx.build_node(it.key(), "");

  if (o.validate_only) {
    std::printf("%s: OK (%zu nodes, %zu stages)\n", o.recipe_path.c_str(), nodes.size(), stages.size());
    return 0;
  }

  std::string work = o.work_dir;
  if (work.empty()) work = r.doc.value("work_dir", std::string());
  if (work.empty()) work = "work_dirs/" + fs::path(o.recipe_path).stem().string();
  fs::create_directories(work);
  json resolved = r.doc;
  if (resolved.contains("plugins"))  // absolute, so the run folder can be reopened from anywhere
    for (std::size_t i = 0; i < resolved["plugins"].size(); ++i) resolved["plugins"][i] = plugin_path(r, i);
  const std::string hash = std::to_string(fnv1a([&] { json h = resolved; h.erase("runtime"); return h.dump(); }()));
  const auto fingerprints = stage_fingerprints(resolved);
  const std::string state_path = work + "/state.json";
  const bool existing = fs::exists(state_path);
  json state = read_json_or(state_path, json{{"completed", json::array()}});
  if (existing && !o.resume)
    throw Error(work + " already holds a run (" + state_path + "); pass --resume to continue it or --work-dir to start a new one");
  if (existing && !o.reuse_from.empty())
    throw Error("--reuse starts a new run, but " + work + " already holds one (" + state_path + "); pick another --work-dir");
  if (!state.contains("fingerprints")) {
    // A run folder written before stages had fingerprints: only an unchanged recipe can continue it.
    if (existing && state.value("recipe_hash", hash) != hash)
      throw Error(work + ": the recipe differs from the one this run was started with (see " + work +
                  "/recipe.resolved.json), and the folder predates per-stage fingerprints; use another --work-dir");
    state["fingerprints"] = json::object();
    for (const auto& [name, fp] : fingerprints)
      for (const auto& c : state["completed"])
        if (c == name) state["fingerprints"][name] = fp;
  }
  state["recipe_hash"] = hash;
  json summary = read_json_or(work + "/summary.json", json::object());
  if (!summary.contains("stages")) summary["stages"] = json::object();
  const std::string metrics_path = work + "/metrics.jsonl";

  // Stages that ran (or started) under a different recipe than this one, and therefore every stage after them.
  std::vector<std::string> changed;
  for (const auto& [name, fp] : fingerprints)
    if (state["fingerprints"].contains(name) && state["fingerprints"][name] != fp) changed.push_back(name);
  if (!changed.empty()) {
    std::string list;
    for (const auto& n : changed) list += (list.empty() ? "" : ", ") + n;
    if (!o.force)
      throw Error(work + ": the recipe changed for stage(s) " + list + " since they ran (see " + work +
                  "/recipe.resolved.json); pass --force to rerun them (their folders are kept as <stage>.replaced-N), "
                  "or use another --work-dir");
    for (const auto& n : changed) {
      const std::string dir = work + "/" + n;
      if (fs::exists(dir)) {
        std::string aside = aside_name(dir);
        fs::rename(dir, aside);
        std::fprintf(stderr, "[%s] recipe changed: rerunning; the old folder is kept as %s\n", n.c_str(), aside.c_str());
      }
      json kept = json::array();
      for (const auto& c : state["completed"])
        if (c != n) kept.push_back(c);
      state["completed"] = kept;
      state["fingerprints"].erase(n);
      summary["stages"].erase(n);
    }
  }

  if (!o.reuse_from.empty()) {
    // Take over another run's finished stages for as long as this recipe agrees with it (same fingerprints).
    const fs::path src = o.reuse_from;
    if (!fs::exists(src / "recipe.resolved.json"))
      throw Error(o.reuse_from + ": --reuse expects a run folder (no recipe.resolved.json)");
    const json src_state = read_json_or((src / "state.json").string(), json{{"completed", json::array()}});
    json src_summary = read_json_or((src / "summary.json").string(), json::object());
    std::map<std::string, std::string> src_fp;
    for (const auto& [name, fp] : stage_fingerprints(read_json_or((src / "recipe.resolved.json").string(), json::object())))
      src_fp[name] = fp;
    std::set<std::string> src_done;
    for (const auto& c : src_state.value("completed", json::array())) src_done.insert(c.get<std::string>());
    std::vector<std::string> reused;
    for (const auto& [name, fp] : fingerprints) {
      if (!src_done.count(name) || src_fp[name] != fp) break;
      link_tree(src / name, fs::path(work) / name);
      state["completed"].push_back(name);
      state["fingerprints"][name] = fp;
      json st = src_summary.value("stages", json::object()).value(name, json::object());
      for (auto it = st.begin(); it != st.end(); ++it) summary[it.key()] = it.value();
      st["reused_from"] = fs::absolute(src).lexically_normal().string();
      summary["stages"][name] = st;
      reused.push_back(name);
    }
    if (fs::exists(src / "metrics.jsonl")) {  // the reused stages' history, so reports and plots stay complete
      std::ifstream in(src / "metrics.jsonl");
      std::ofstream out(metrics_path, std::ios::app);
      for (std::string line; std::getline(in, line);) {
        json j = json::parse(line, nullptr, false);
        if (!j.is_discarded() && std::find(reused.begin(), reused.end(), j.value("stage", std::string())) != reused.end())
          out << line << "\n";
      }
    }
    std::string list;
    for (const auto& n : reused) list += " " + n;
    std::fprintf(stderr, "reused from %s:%s\n", o.reuse_from.c_str(), reused.empty() ? " nothing (the first stage differs)" : list.c_str());
    write_file_atomic(work + "/summary.json", summary.dump(2) + "\n");
  }
  write_file_atomic(work + "/recipe.resolved.json", resolved.dump(2) + "\n");
  write_file_atomic(state_path, state.dump(2) + "\n");

  g_interrupted.store(false);
  auto previous = std::signal(SIGINT, on_sigint);
  int code = 0;
  try {
    for (std::size_t si = 0; si < stages.size(); ++si) {
      auto& e = stages[si];
      RunContext rc;
      rc.run_dir = work;
      rc.stage_name = e.name;
      rc.stage_dir = work + "/" + e.name;
      rc.device = g_device;
      rc.seed = seed;
      rc.resume = o.resume;
      rc.resolved_recipe = resolved;
      rc.build = &ctx;
      rc.interrupted = &g_interrupted;
      rc.log_metrics = [&metrics_path, name = e.name](json line) {
        line["stage"] = name;
        std::ofstream out(metrics_path, std::ios::app);
        out << line.dump() << "\n";
      };
      fs::create_directories(rc.stage_dir);
      bool done = false;
      for (const auto& c : state["completed"]) done = done || c == e.name;
      if (done) {
        std::fprintf(stderr, "[%s] already finished; restoring its outputs\n", e.name.c_str());
        e.stage->restore(rc);
        continue;
      }
      state["fingerprints"][e.name] = fingerprints[si].second;  // before running: a partial stage is tracked too
      write_file_atomic(state_path, state.dump(2) + "\n");
      double t0 = std::chrono::duration<double>(std::chrono::steady_clock::now().time_since_epoch()).count();
      e.stage->run(rc);
      double t1 = std::chrono::duration<double>(std::chrono::steady_clock::now().time_since_epoch()).count();
      rc.summary["wall_seconds"] = t1 - t0;
      summary["stages"][e.name] = rc.summary;
      for (auto it = rc.summary.begin(); it != rc.summary.end(); ++it) summary[it.key()] = it.value();
      summary["device"] = g_device.str();
      summary["threads"] = at::get_num_threads();
      write_file_atomic(work + "/summary.json", summary.dump(2) + "\n");
      state["completed"].push_back(e.name);
      write_file_atomic(state_path, state.dump(2) + "\n");
    }
  } catch (const Interrupted& e) {
    std::fprintf(stderr, "%s\n", e.what());
    code = 130;
  }
  std::signal(SIGINT, previous);
  if (code == 0) std::fprintf(stderr, "run finished: %s/summary.json\n", work.c_str());
  // A stage that finished but did not keep its promise (e.g. a missed FLOPs budget) says so with "run_failure"
  // in its summary: every stage still runs and writes its outputs, then the run exits with status 4.
  if (code == 0)
    for (auto it = summary["stages"].begin(); it != summary["stages"].end(); ++it)
      if (it.value().is_object() && it.value().contains("run_failure")) {
        std::fprintf(stderr, "error: [%s] %s\n", it.key().c_str(), it.value()["run_failure"].dump().c_str());
        code = 4;
      }
  return code;
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
  apply_runtime(out.recipe);
  torch::manual_seed(out.recipe.doc.value("seed", json(1)).get<uint64_t>());
  json state = read_json_or(work_dir + "/state.json", json{{"completed", json::array()}});
  out.summary = read_json_or(work_dir + "/summary.json", json::object());
  const Recipe& r = out.recipe;
  out.ctx = std::make_unique<BuildContext>(reg, r.doc, [&r](const std::string& p) { return r.where(p); });
  const json& sj = r.doc["stages"];
  for (std::size_t i = 0; i < sj.size(); ++i) {
    Where w = r.where("/stages/" + std::to_string(i));
    std::string name = stage_name(sj[i], i);
    auto stage = out.ctx->get<Stage>(NodeRef{sj[i], w});
    bool done = false;
    for (const auto& c : state["completed"]) done = done || c == name;
    if (!done) continue;
    RunContext rc;
    rc.run_dir = work_dir;
    rc.stage_name = name;
    rc.stage_dir = work_dir + "/" + name;
    rc.device = g_device;
    rc.seed = r.doc.value("seed", json(1)).get<uint64_t>();
    rc.resume = true;
    rc.resolved_recipe = r.doc;
    rc.build = out.ctx.get();
    stage->restore(rc);
    out.stages.emplace_back(name, stage);
  }
  return out;
}

c10::Device current_device() { return g_device; }

}  // namespace isp
