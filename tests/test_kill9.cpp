// kill -9 at any moment: a whole pipeline (classifier, predictor, selector, gate learning, finetuning, export)
// run as a separate `isp` process, killed with SIGKILL at random moments -- some of them halfway through a
// checkpoint or report write (ISP_KILL_DURING_WRITE) -- and resumed each time, ends with exactly the last-epoch
// weights (checkpoint.pt), the selected weights (final.pt / gates.pt) and the metrics of an uninterrupted run.
#include "test_support.h"

#include <fcntl.h>
#include <signal.h>
#include <spawn.h>
#include <sys/wait.h>
#include <unistd.h>

#include <algorithm>
#include <cstdint>
#include <utility>
#include <chrono>
#include <fstream>
#include <iomanip>
#include <random>
#include <sstream>
#include <thread>

#include <ATen/ATen.h>

#include "isp/checkpoint.h"
#include "isp/registry/recipe.h"

extern char** environ;

namespace fs = std::filesystem;
using isp::json;

namespace {

json ref(const std::string& n) { return {{"$ref", n}}; }

json kill_recipe() {
  json nodes = {
      {"data", {{"type", "SyntheticImages"}, {"num_train", 192}, {"num_test", 48}, {"num_classes", 4},
                {"val_fraction", 0.25}, {"crop_padding", 2}, {"horizontal_flip", true}}},
      {"backbone", {{"type", "ResNetCifar"}, {"depth", 20}, {"num_classes", 4}}},
      {"classifier", {{"type", "TrainClassifier"}, {"model", ref("backbone")}, {"data", ref("data")}, {"epochs", 6},
                      {"batch_size", 16}, {"lr", 0.05}, {"milestones", {2}}}},
      {"mask_source", {{"type", "RandomRbfMasks"}}},
      {"predictor", {{"type", "TrainPredictor"}, {"classifier", ref("classifier")}, {"data", ref("data")},
                     {"mask_source", ref("mask_source")}, {"epochs", 4}, {"batch_size", 16}, {"lr", 2e-3}}},
      {"filter", {{"type", "ClassEmbeddingFilter"}, {"encoder", ref("backbone")}}},
      {"decoder", {{"type", "UNetDecoder"}, {"encoder", ref("backbone")}}},
      {"head", {{"type", "RbfMaskHead"}, {"decoder", ref("decoder")}, {"encoder", ref("backbone")}}},
      {"mask_sampler", {{"type", "RelaxedBernoulli"}, {"temperature", 1.0}}},
      {"area", {{"type", "MaskArea"}}},
      {"selector", {{"type", "TrainSelector"}, {"predictor", ref("predictor")}, {"filter", ref("filter")},
                    {"decoder", ref("decoder")}, {"head", ref("head")}, {"sampler", ref("mask_sampler")},
                    {"regularizers", {ref("area")}}, {"data", ref("data")}, {"epochs", 3}, {"batch_size", 16},
                    {"lr", 1e-3}, {"metrics_images", 16}}},
      {"interp", {{"type", "RbfParamDistance"}, {"weight", 10.0}, {"mode", "raw"}}},
      {"flops", {{"type", "FlopsBudget"}, {"target", 0.5}}},
      {"gates", {{"type", "FreeLogitGates"}}},
      {"prune", {{"type", "PruneChannels"}, {"classifier", ref("classifier")}, {"selector", ref("selector")},
                 {"pruner", ref("gates")}, {"data", ref("data")}, {"regularizers", {ref("interp"), ref("flops")}},
                 {"subset_fraction", 0.5}, {"epochs", 8}, {"batch_size", 16}, {"lr", 0.2}, {"eval_every", 2}}},
      {"finetune", {{"type", "Finetune"}, {"pruned", ref("prune")}, {"data", ref("data")}, {"epochs", 4},
                    {"batch_size", 16}, {"lr", 0.01}, {"milestones", json::array()}}},
      {"export", {{"type", "Export"}, {"model", ref("finetune")}, {"selector", ref("selector")}, {"data", ref("data")},
                  {"agreement_images", 24}, {"metrics_images", 16}}}};
  return {{"seed", 9},
          {"runtime", {{"threads", 1}, {"device", "cpu"}}},
          {"nodes", nodes},
          {"stages", {ref("classifier"), ref("predictor"), ref("selector"), ref("prune"), ref("finetune"),
                      ref("export")}}};
}

// Starts `isp run` (stdout and stderr appended to `log`), with extra environment entries.
pid_t start_isp(const fs::path& recipe, const fs::path& work, bool resume, const std::vector<std::string>& env,
                const fs::path& log) {
  std::vector<std::string> args{"run", recipe.string(), "--work-dir", work.string()};
  if (resume) args.push_back("--resume");
  return isp_test::spawn_logged(ISP_TEST_BINARY, args, env, log);
}

using isp_test::exit_status;
int wait_for(pid_t pid) { return exit_status(pid); }  // exit code, or -signal

double seconds_since(std::chrono::steady_clock::time_point t) {
  return std::chrono::duration<double>(std::chrono::steady_clock::now() - t).count();
}

// How far a run has got: (stages state.json lists as completed, bytes of metrics.jsonl). Both files only grow
// or are replaced atomically, so reading them while the run writes is safe.
using Progress = std::pair<std::size_t, std::uintmax_t>;
Progress progress_of(const fs::path& run) {
  std::size_t completed = 0;
  if (fs::exists(run / "state.json"))
    completed = json::parse(isp::read_text_file((run / "state.json").string())).value("completed", json::array()).size();
  std::error_code ec;
  const auto metrics_size = fs::file_size(run / "metrics.jsonl", ec);
  return {completed, ec ? 0 : metrics_size};
}

// Waits until `run` has made progress beyond `since` (an epoch logged, a stage completed), then kills `pid` after
// `delay` seconds; returns the exit code, or -signal. A process that ends by itself first is not killed.
int kill_after_progress(pid_t pid, const fs::path& run, const Progress& since, double delay) {
  for (;;) {
    int status = 0;
    const pid_t r = ::waitpid(pid, &status, WNOHANG);
    REQUIRE(r >= 0);
    if (r == pid) return WIFEXITED(status) ? WEXITSTATUS(status) : -WTERMSIG(status);
    if (progress_of(run) != since) break;
    std::this_thread::sleep_for(std::chrono::milliseconds(10));
  }
  std::this_thread::sleep_for(std::chrono::duration<double>(delay));
  ::kill(pid, SIGKILL);
  return exit_status(pid);
}

std::string tail_of(const fs::path& log) {
  std::string s = isp::read_text_file(log.string());
  return s.size() > 1500 ? s.substr(s.size() - 1500) : s;
}

// Numbers of the summary that must agree: everything but times, rates and paths.
void compare_numbers(const json& a, const json& b, const std::string& where) {
  if (a.is_object() && b.is_object()) {
    for (auto it = a.begin(); it != a.end(); ++it) {
      const std::string& k = it.key();
      if (k.find("second") != std::string::npos || k.find("per_s") != std::string::npos || k == "wall_seconds" ||
          k.find("reused") != std::string::npos)
        continue;
      if (b.contains(k)) compare_numbers(it.value(), b[k], where + "/" + k);
    }
  } else if (a.is_number() && b.is_number()) {
    CHECK_MESSAGE(a.get<double>() == b.get<double>(), where);
  }
}

}  // namespace

TEST_CASE("kill -9 at 20+ random moments across every stage, halfway through checkpoint writes too: "
          "the resumed run ends bit-identical to an uninterrupted one" *
          doctest::test_suite("kernel_independent")) {
  const auto dir = isp_test::temp_dir("kill9");
  std::ofstream(dir / "r.json") << kill_recipe().dump(2);
  const fs::path log = dir / "log.txt";

  const auto t0 = std::chrono::steady_clock::now();
  REQUIRE(wait_for(start_isp(dir / "r.json", dir / "ref", false, {}, log)) == 0);
  const double full = seconds_since(t0);
  {
    // Each stage's share, so a failure below can be read against this machine's proportions.
    const json ref_stages = json::parse(isp::read_text_file((dir / "ref" / "summary.json").string()))["stages"];
    std::ostringstream shares;
    shares << std::fixed << std::setprecision(2);
    for (const char* stage : {"classifier", "predictor", "selector", "prune", "finetune", "export"})
      shares << " " << ref_stages[stage].value("wall_seconds", 0.0);
    MESSAGE("uninterrupted run: " << full << " s; stage wall seconds (classifier .. export):" << shares.str());
  }

  // How long a start takes before the run writes its first file (plugins loaded, recipe built): a kill before
  // that moment makes no progress. Measured, since it differs tenfold between machines and sanitizer builds.
  double startup = 0;
  {
    const auto ts = std::chrono::steady_clock::now();
    const pid_t pid = start_isp(dir / "r.json", dir / "probe", false, {}, log);
    while (!fs::exists(dir / "probe" / "state.json") && seconds_since(ts) < full)
      std::this_thread::sleep_for(std::chrono::milliseconds(10));
    startup = seconds_since(ts);
    ::kill(pid, SIGKILL);
    wait_for(pid);
  }
  MESSAGE("a start takes " << startup << " s until its first file");

  std::mt19937 rng(20261126);
  int kills = 0, write_kills = 0, attempts = 0, rounds = 0;
  std::vector<int> kills_per_stage(6, 0);  // classifier, predictor, selector, prune, finetune, export
  std::vector<fs::path> finished;
  auto stages_hit = [&] { return std::count_if(kills_per_stage.begin(), kills_per_stage.end(), [](int k) { return k > 0; }); };
  // Rounds until 24 kills over 5 stages: how many a round gets depends on the machine's speed, the total must not.
  while ((kills < 24 || stages_hit() < 5) && rounds < 6) {
    const fs::path run = dir / ("run" + std::to_string(++rounds));
    bool done = false;
    int starts = 0, stuck = 0;
    Progress last_progress{SIZE_MAX, 0};
    while (!done && starts < 200) {
      const bool resume = starts++ > 0;
      ++attempts;
      int rc;
      if (stuck >= 2) {
        // Two kills in a row without progress: this stage's epochs (or export, which keeps no mid-stage checkpoint)
        // take longer than the random delays on this machine. Kill only once it has logged an epoch or finished
        // the stage, so the run moves on and the later stages are still hit -- on a slow machine too.
        const pid_t pid = start_isp(dir / "r.json", run, resume, {}, log);
        // Progress is measured from the state the last kill left, read before this start could add to it.
        rc = kill_after_progress(pid, run, last_progress,
                                 std::uniform_real_distribution<double>(0.0, 0.05 * full)(rng));
      } else if (attempts % 4 == 0) {
        // The process kills itself halfway through its N-th atomic write (a checkpoint, best.pt, a report ...).
        const int n = std::uniform_int_distribution<int>(1, 8)(rng);
        rc = wait_for(start_isp(dir / "r.json", run, resume, {"ISP_KILL_DURING_WRITE=" + std::to_string(n)}, log));
        if (rc == -SIGKILL) ++write_kills;
      } else {
        const double delay = startup + std::uniform_real_distribution<double>(0.0, 0.15 * full)(rng);
        const pid_t pid = start_isp(dir / "r.json", run, resume, {}, log);
        std::this_thread::sleep_for(std::chrono::duration<double>(delay));
        ::kill(pid, SIGKILL);
        rc = wait_for(pid);
      }
      if (rc == -SIGKILL) {
        ++kills;
        // Which stage the kill interrupted: the first one state.json does not list as completed.
        const Progress progress = progress_of(run);
        ++kills_per_stage[std::min<std::size_t>(progress.first, kills_per_stage.size() - 1)];
        stuck = progress == last_progress ? stuck + 1 : 0;
        last_progress = progress;
        continue;
      }
      // Not killed: it must have finished cleanly, never failed on what a kill left behind.
      REQUIRE_MESSAGE(rc == 0, "start " << starts << " of " << run << " exited with " << rc << ":\n" << tail_of(log));
      done = true;
    }
    REQUIRE(done);
    finished.push_back(run);
  }
  std::string per_stage;
  for (int k : kills_per_stage) per_stage += " " + std::to_string(k);
  MESSAGE(kills << " kills (" << write_kills << " inside a write) over " << attempts << " starts in " << rounds
                << " resumed runs; per stage (classifier predictor selector prune finetune export):" << per_stage);
  CHECK(kills >= 20);
  CHECK(write_kills >= 3);
  CHECK(stages_hit() >= 5);

  // Bit for bit, for every resumed run: the last epoch's state of every training stage, and what each stage
  // selected.
  const json sa = json::parse(isp::read_text_file((dir / "ref" / "summary.json").string()));
  for (const fs::path& run : finished) {
    INFO(run.string());
    int compared = 0;
    for (const char* stage : {"classifier", "predictor", "selector", "prune", "finetune"}) {
      for (const char* file : {"checkpoint.pt", "final.pt", "gates.pt"}) {
        const fs::path a = dir / "ref" / stage / file, b = run / stage / file;
        if (!fs::exists(a)) continue;
        INFO(stage << "/" << file);
        REQUIRE(fs::exists(b));
        auto ta = isp::CheckpointReader(a.string()).all_tensors();
        auto tb = isp::CheckpointReader(b.string()).all_tensors();
        CHECK(ta.size() == tb.size());
        CHECK(ta.size() > 0);
        for (const auto& [name, t] : ta) {
          INFO(name);
          REQUIRE(tb.count(name));
          CHECK(at::equal(t, tb[name]));
          ++compared;
        }
      }
    }
    MESSAGE(compared << " tensors compared in " << run.filename().string());
    CHECK(compared > 100);
    const json sb = json::parse(isp::read_text_file((run / "summary.json").string()));
    compare_numbers(sa["stages"], sb["stages"], "summary.json/stages");
    CHECK(fs::exists(run / "export" / "weights.pt"));
  }
}

TEST_CASE("a truncated or missing best.pt is named in a clear error as soon as the run resumes") {
  const auto dir = isp_test::temp_dir("bad_best");
  json recipe = kill_recipe();
  recipe["stages"] = {ref("classifier")};
  std::ofstream(dir / "r.json") << recipe.dump(2);
  const fs::path log = dir / "log.txt";
  // Ctrl-C (simulated) in epoch 2: best.pt of epoch 1 exists, the run stops with a checkpoint.
  REQUIRE(wait_for(start_isp(dir / "r.json", dir / "run", false, {"ISP_INTERRUPT_AFTER_STEPS=12"}, log)) == 130);
  const fs::path best = dir / "run" / "classifier" / "best.pt";
  REQUIRE(fs::exists(best));
  fs::resize_file(best, fs::file_size(best) / 2);
  const auto ckpt_time = fs::last_write_time(dir / "run" / "classifier" / "checkpoint.pt");
  CHECK(wait_for(start_isp(dir / "r.json", dir / "run", true, {}, log)) == 2);
  CHECK(tail_of(log).find(best.string() + ": not a readable isp checkpoint") != std::string::npos);
  CHECK(fs::last_write_time(dir / "run" / "classifier" / "checkpoint.pt") == ckpt_time);  // nothing trained
  fs::remove(best);
  CHECK(wait_for(start_isp(dir / "r.json", dir / "run", true, {}, log)) == 2);
  CHECK(tail_of(log).find(best.string() + ": missing, but") != std::string::npos);
}
