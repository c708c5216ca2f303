// Pipeline runner: recipe -> plugins -> frozen registry -> nodes and stages -> stages executed in order, with
// resume (--resume), reruns of changed stages (--force) and reuse of another run's stages (--reuse).
#include "isp/runner.h"
#include "isp/distributed.h"

#include <ATen/Context.h>
#include <ATen/Parallel.h>
#include <torch/utils.h>

#include <fcntl.h>
#include <sys/file.h>
#include <unistd.h>

#include <atomic>
#include <chrono>
#include <csignal>
#include <cstdio>
#include <filesystem>
#include <fstream>
#include <map>
#include <memory>

#include "isp/interfaces/dataset.h"
#include "run_folder.h"

namespace fs = std::filesystem;

namespace isp {

namespace {
std::atomic<bool> g_interrupted{false};
extern "C" void on_sigint(int) { g_interrupted.store(true); }

const std::vector<std::string> kTopLevelKeys{"_base_", "plugins", "nodes",     "stages",     "vars", "seed",
                                             "runtime", "work_dir", "name", "description", "components"};

double now() { return std::chrono::duration<double>(std::chrono::steady_clock::now().time_since_epoch()).count(); }
void save(const std::string& path, const json& j) { write_file_atomic(path, j.dump(2) + "\n"); }
bool contains(const json& list, const std::string& name) {
  for (const auto& c : list)
    if (c == name) return true;
  return false;
}
}  // namespace

namespace {

// One writer per run folder: an exclusive flock on <work>/.lock for as long as the run lives. The kernel drops
// the lock when the process ends however it ends (kill -9 included), so a crash never leaves a stale lock; the
// pid written into the file only serves the error message.
class RunFolderLock {
 public:
  explicit RunFolderLock(const std::string& dir) {
    const std::string path = dir + "/.lock";
    fd_ = ::open(path.c_str(), O_RDWR | O_CREAT | O_CLOEXEC, 0644);
    if (fd_ < 0) throw Error(path + ": cannot open the run folder's lock file");
    if (::flock(fd_, LOCK_EX | LOCK_NB) != 0) {
      char buf[32] = {0};
      const ssize_t n = ::pread(fd_, buf, sizeof buf - 1, 0);
      ::close(fd_);
      const std::string pid = n > 0 ? std::string(buf, static_cast<std::size_t>(n)) : std::string("?");
      throw Error(dir + " is in use by another isp run (pid " + pid + ", lock " + path +
                  "); wait for it to finish or use another --work-dir");
    }
    const std::string pid = std::to_string(::getpid());
    if (::ftruncate(fd_, 0) == 0 && ::pwrite(fd_, pid.data(), pid.size(), 0) < 0) {
      // the pid is informative only
    }
  }
  ~RunFolderLock() { ::close(fd_); }  // releases the flock
  RunFolderLock(const RunFolderLock&) = delete;
  RunFolderLock& operator=(const RunFolderLock&) = delete;

 private:
  int fd_ = -1;
};

// The run folder's bookkeeping: which stages finished, under which fingerprints, and what they reported.
struct RunFolder {
  std::string dir;
  std::unique_ptr<RunFolderLock> lock;
  json state, summary;
  void save_state() const { save(dir + "/state.json", state); }
  void save_summary() const { save(dir + "/summary.json", summary); }
};

RunFolder open_run_folder(const RunOptions& o, const std::string& work) {
  RunFolder f;
  f.dir = work;
  fs::create_directories(work);
  f.lock = std::make_unique<RunFolderLock>(work);
  const std::string state_path = work + "/state.json";
  const bool existing = fs::exists(state_path);
  if (existing && !o.resume)
    throw Error(work + " already holds a run (" + state_path + "); pass --resume to continue it or --work-dir to start a new one");
  if (existing && !o.reuse_from.empty())
    throw Error("--reuse starts a new run, but " + work + " already holds one (" + state_path + "); pick another --work-dir");
  f.state = detail::read_json_or(state_path, json{{"completed", json::array()}});
  if (existing && !f.state.contains("fingerprints"))
    throw Error(work + ": this run folder predates per-stage fingerprints; start a new run with another --work-dir");
  if (!f.state.contains("fingerprints")) f.state["fingerprints"] = json::object();
  f.summary = detail::read_json_or(work + "/summary.json", json::object());
  if (!f.summary.contains("stages")) f.summary["stages"] = json::object();
  return f;
}

// Stages that ran (or started) under a different fingerprint: an error, or with --force set aside and rerun.
void handle_changed_stages(RunFolder& f, const std::vector<detail::PlannedStage>& plan, bool force) {
  std::vector<std::string> changed;
  for (const auto& p : plan)
    if (f.state["fingerprints"].contains(p.name) && f.state["fingerprints"][p.name] != p.fingerprint) changed.push_back(p.name);
  if (changed.empty()) return;
  std::string list;
  for (const auto& n : changed) list += (list.empty() ? "" : ", ") + n;
  if (!force)
    throw Error(f.dir + ": the recipe or a plugin changed for stage(s) " + list + " since they ran (see " + f.dir +
                "/recipe.resolved.json); pass --force to rerun them (their folders are kept as <stage>.replaced-N), "
                "or use another --work-dir");
  for (const auto& n : changed) {
    const std::string dir = f.dir + "/" + n;
    if (fs::exists(dir)) {
      std::string aside = detail::aside_name(dir);
      fs::rename(dir, aside);
      std::fprintf(stderr, "[%s] recipe changed: rerunning; the old folder is kept as %s\n", n.c_str(), aside.c_str());
    }
    json kept = json::array();
    for (const auto& c : f.state["completed"])
      if (c != n) kept.push_back(c);
    f.state["completed"] = kept;
    f.state["fingerprints"].erase(n);
    f.summary["stages"].erase(n);
  }
}

// Takes over another run's finished stages whose fingerprints equal this recipe's.
void reuse_stages(RunFolder& f, const std::vector<detail::PlannedStage>& plan, const std::string& from) {
  const fs::path src = from;
  if (!fs::exists(src / "recipe.resolved.json")) throw Error(from + ": --reuse expects a run folder (no recipe.resolved.json)");
  const json src_state = detail::read_json_or((src / "state.json").string(), json{{"completed", json::array()}});
  const json src_summary = detail::read_json_or((src / "summary.json").string(), json::object());
  const json src_fp = src_state.value("fingerprints", json::object());
  std::vector<std::string> reused;
  for (const auto& p : plan) {
    if (!contains(src_state.value("completed", json::array()), p.name) || src_fp.value(p.name, std::string()) != p.fingerprint ||
        contains(f.state["completed"], p.name))  // an earlier --reuse folder gave it already
      continue;
    detail::link_tree((src / p.name).string(), f.dir + "/" + p.name);
    f.state["completed"].push_back(p.name);
    f.state["fingerprints"][p.name] = p.fingerprint;
    json st = src_summary.value("stages", json::object()).value(p.name, json::object());
    for (auto it = st.begin(); it != st.end(); ++it) f.summary[it.key()] = it.value();
    st["reused_from"] = fs::absolute(src).lexically_normal().string();
    f.summary["stages"][p.name] = st;
    reused.push_back(p.name);
  }
  if (fs::exists(src / "metrics.jsonl")) {  // the reused stages' history, so reports and plots stay complete
    std::ifstream in(src / "metrics.jsonl");
    std::ofstream out(f.dir + "/metrics.jsonl", std::ios::app);
    for (std::string line; std::getline(in, line);) {
      json j = json::parse(line, nullptr, false);
      if (!j.is_discarded() && std::find(reused.begin(), reused.end(), j.value("stage", std::string())) != reused.end())
        out << line << "\n";
    }
  }
  std::string list;
  for (const auto& n : reused) list += " " + n;
  std::fprintf(stderr, "reused from %s:%s\n", from.c_str(), reused.empty() ? " nothing (no stage matches)" : list.c_str());
  f.save_summary();
}

StageRecord record_of(const RunFolder& f, const std::string& name) {
  StageRecord rec;
  rec.name = name;
  rec.summary = f.summary["stages"].value(name, json::object());
  rec.wall_seconds = rec.summary.value("wall_seconds", 0.0);
  rec.reused_from = rec.summary.value("reused_from", std::string());
  return rec;
}

// Runs (or restores) every stage in order. Returns 130 on Ctrl-C.
int execute(RunFolder& f, std::vector<detail::PlannedStage>& plan, const Runtime& rt, const json& resolved, bool resume) {
  const std::string metrics_path = f.dir + "/metrics.jsonl";
  std::vector<StageRecord> finished;
  for (auto& p : plan) {
    RunContext rc;
    rc.run_dir = f.dir;
    rc.stage_name = p.name;
    rc.stage_type = p.type;
    rc.stage_dir = f.dir + "/" + p.name;
    rc.device = rt.device;
    rc.speed = rt.speed;
    rc.seed = p.seed;
    rc.resume = resume;
    rc.resolved_recipe = resolved;
    rc.interrupted = &g_interrupted;
    rc.finished = finished;
    rc.log_metrics = [&metrics_path, name = p.name](json line) {
      if (!writes_files()) return;  // data-parallel rank > 0
      line["stage"] = name;
      std::ofstream out(metrics_path, std::ios::app);
      out << line.dump() << "\n";
    };
    fs::create_directories(rc.stage_dir);
    if (contains(f.state["completed"], p.name)) {
      std::fprintf(stderr, "[%s] already finished; restoring its result\n", p.name.c_str());
      p.stage->restore(rc);
      finished.push_back(record_of(f, p.name));
      continue;
    }
    f.state["fingerprints"][p.name] = p.fingerprint;  // before running: a partial stage is tracked too
    f.save_state();
    torch::manual_seed(p.seed);
    const double t0 = now();
    try {
      p.stage->run(rc);
    } catch (const Interrupted& e) {
      std::fprintf(stderr, "%s\n", e.what());
      return 130;
    }
    rc.summary["wall_seconds"] = now() - t0;
    f.summary["stages"][p.name] = rc.summary;
    for (auto it = rc.summary.begin(); it != rc.summary.end(); ++it) f.summary[it.key()] = it.value();
    f.summary["device"] = rt.device.str();
    f.summary["world_size"] = dist::world_size();
    f.summary["dist_backend"] = dist::backend();
    f.summary["dist_sync_batchnorm"] = dist::active() && dist::settings().sync_batchnorm;
    f.summary["threads"] = at::get_num_threads();
    const json channels_last = rt.speed.channels_last            ? json(true)
                               : rt.speed.channels_last_if_grouped ? json("grouped networks")
                                                                   : json(false);
    f.summary["speed"] = {{"precision", rt.speed.bf16 ? "bf16" : "fp32"}, {"channels_last", channels_last},
                          {"cuda_graphs", rt.speed.cuda_graphs}, {"fold_batchnorm", rt.speed.fold_batchnorm}};
    f.save_summary();
    f.state["completed"].push_back(p.name);
    f.save_state();
    finished.push_back(record_of(f, p.name));
  }
  return 0;
}

}  // namespace

std::shared_ptr<SharedComponents> share_validation_data() {
  return std::make_shared<SharedComponents>(std::vector<std::string>{Dataset::kKind}, 2);
}

int run_recipe(Registry& reg, const RunOptions& o) {
  // Each prints one JSON document on stdout; checked here, not only by the CLI, so library callers get it too.
  if (o.print_resolved && o.print_data_sizes) throw Error("--print-resolved and --print-data-sizes: choose one");
  Recipe r = load_recipe(o.recipe_path, o.overrides);
  for (auto it = r.doc.begin(); it != r.doc.end(); ++it)
    if (std::find(kTopLevelKeys.begin(), kTopLevelKeys.end(), it.key()) == kTopLevelKeys.end()) {
      std::string near = closest_match(it.key(), kTopLevelKeys);
      throw RecipeError(r.where("/" + it.key()), "unknown top-level key" + (near.empty() ? "" : "; did you mean '" + near + "'?"));
    }
  r.doc.erase("components");  // written by the runner into recipe.resolved.json; recomputed on every build
  load_recipe_plugins(reg, r);
  reg.freeze();  // every node of this run is built from one fixed set of components
  const Runtime rt = apply_runtime(r);
  if (!r.doc.contains("stages") || !r.doc["stages"].is_array() || r.doc["stages"].empty())
    throw RecipeError(r.where("/stages"), "expected a non-empty list of stages");
  json seed_j = r.doc.value("seed", json(1));
  if (!seed_j.is_number_integer() || seed_j.get<int64_t>() < 0)
    throw RecipeError(r.where("/seed"), "expected an integer >= 0, got " + seed_j.dump());
  const uint64_t seed = seed_j.get<uint64_t>();

  BuildContext ctx(reg, r.doc, [&r](const std::string& p) { return r.where(p); });
  if (o.shared_components) ctx.share_components(o.shared_components);
  std::vector<detail::PlannedStage> plan = detail::build_stages(ctx, r, seed);
  if (o.validate_only) {
    const bool json_out = o.print_resolved || o.print_data_sizes;
    json sizes = json::object();
    if (o.print_data_sizes) {
      // The datasets' own rules (val split, subsets, folders) decide the sizes: loading them is the only way to
      // know, so scripts never re-implement those rules.
      for (const auto& [name, spec] : r.doc.value("nodes", json::object()).items()) {
        if (ctx.kind_of_node(name) != Dataset::kKind) continue;
        const DataBundle& d = ctx.node<Dataset>(name)->data();
        sizes[name] = {{"train", d.train.size()}, {"val", d.val.size()}, {"test", d.test.size()},
                       {"classes", d.num_classes()}};
      }
    }
    std::fprintf(json_out ? stderr : stdout, "%s: OK (%zu nodes, %zu stages)\n", o.recipe_path.c_str(),
                 r.doc.value("nodes", json::object()).size(), plan.size());
    if (o.print_resolved) std::printf("%s\n", detail::resolved_document(r, ctx).dump(2).c_str());
    if (o.print_data_sizes) std::printf("%s\n", sizes.dump(2).c_str());
    return 0;
  }

  std::string work = o.work_dir;
  if (work.empty()) work = r.doc.value("work_dir", std::string());
  if (work.empty()) work = "work_dirs/" + fs::path(o.recipe_path).stem().string();
  // Data-parallel (RANK/WORLD_SIZE set, e.g. by --nproc-per-node): join the group. Rank 0 owns the run folder
  // (lock, state, --force, --reuse); the others wait for it, then follow its state and write nothing.
  struct GroupScope {
    ~GroupScope() { dist::shutdown(); }
  } group_scope;
  const dist::WorldInfo world = dist::world_from_env();
  dist::init(world, rt.dist, rt.device);
  const json resolved = detail::resolved_document(r, ctx);
  RunFolder f;
  if (world.rank == 0) {
    f = open_run_folder(o, work);
    handle_changed_stages(f, plan, o.force);
    for (const auto& from : o.reuse_from) reuse_stages(f, plan, from);
    save(work + "/recipe.resolved.json", resolved);
    f.save_state();
  }
  dist::barrier("run folder ready");
  if (world.rank != 0) {
    f.dir = work;
    f.state = detail::read_json_or(work + "/state.json", json{{"completed", json::array()}});
    f.summary = detail::read_json_or(work + "/summary.json", json::object());
    if (!f.summary.contains("stages")) f.summary["stages"] = json::object();
  }
  if (world.world_size > 1)
    std::fprintf(stderr, "[rank %d of %d] %s backend, %d thread(s), run folder %s\n", world.rank, world.world_size,
                 dist::backend().c_str(), at::get_num_threads(), work.c_str());
  // Ranks > 0 log to <work>/logs/rank<r>.log, so the console shows each line once (rank 0's); their errors
  // still reach the console, naming that file.
  dist::WorkerLog worker_log(world.rank, work + "/logs/rank" + std::to_string(world.rank) + ".log");

  g_interrupted.store(false);
  auto previous = std::signal(SIGINT, on_sigint);
  int code = 0;
  try {
    code = execute(f, plan, rt, resolved, o.resume);
  } catch (const std::exception& e) {
    std::signal(SIGINT, previous);
    if (!worker_log.active()) throw;
    // Into the rank's log, and (main prints it once the console is back) to the console with the log's name.
    std::fprintf(stderr, "error: %s\n", e.what());
    throw Error(std::string(e.what()) + " [rank " + std::to_string(world.rank) + "; its log: " + worker_log.path() + "]");
  } catch (...) {
    std::signal(SIGINT, previous);
    throw;
  }
  std::signal(SIGINT, previous);
  if (code != 0) return code;
  std::fprintf(stderr, "run finished: %s/summary.json\n", work.c_str());
  // A stage that finished but did not keep its promise (e.g. a missed FLOPs budget) says so with "run_failure"
  // in its summary: every stage still runs and writes its outputs, then the run exits with status 4.
  for (auto it = f.summary["stages"].begin(); it != f.summary["stages"].end(); ++it)
    if (it.value().is_object() && it.value().contains("run_failure")) {
      std::fprintf(stderr, "error: [%s] %s\n", it.key().c_str(), it.value()["run_failure"].dump().c_str());
      code = 4;
    }
  return code;
}

}  // namespace isp
