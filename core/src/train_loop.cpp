// The epoch/step training loop every stage shares, and the progress line.
#include <torch/torch.h>

#include <unistd.h>

#include <algorithm>
#include <chrono>
#include <cmath>
#include <cstdio>
#include <cstdlib>
#include <filesystem>
#include <fstream>
#include <limits>
#include <memory>
#include <sstream>

#include "isp/checkpoint.h"
#include "isp/data.h"
#include "isp/distributed.h"
#include "isp/op_profile.h"
#include "isp/optim.h"
#include "isp/registry/recipe.h"
#include "isp/train.h"

namespace fs = std::filesystem;

namespace isp {

// --------------------------------------------------------------------------------------------- progress

double now_seconds() {
  using namespace std::chrono;
  return duration<double>(steady_clock::now().time_since_epoch()).count();
}

Progress::Progress(std::string label)
    : label_(std::move(label)), tty_(::isatty(STDERR_FILENO) != 0), last_(now_seconds()) {}
void Progress::update(const std::string& text, bool force) {
  if (dist::rank() != 0) return;  // data-parallel: rank 0 reports the global figures
  double t = now_seconds();
  if (tty_) {
    if (!force && t - last_ < 0.25) return;
    std::fprintf(stderr, "\r\x1b[K[%s] %s", label_.c_str(), text.c_str());
    std::fflush(stderr);
  } else {
    // Logs and pipes (a sweep's point logs): a plain line every 30 s inside a long epoch -- step, metrics, img/s,
    // ETA -- besides the line per epoch, so a log shows where a long stage is.
    if (!force && t - last_ < 30.0) return;
    std::fprintf(stderr, "[%s] %s\n", label_.c_str(), text.c_str());
  }
  last_ = t;
}
void Progress::finish(const std::string& text) {
  if (dist::rank() != 0) return;
  if (tty_) std::fprintf(stderr, "\r\x1b[K");
  std::fprintf(stderr, "[%s] %s\n", label_.c_str(), text.c_str());
  last_ = now_seconds();  // in logs, the next step line comes 30 s after any line, an epoch's included
}

static std::string fmt_duration(double s) {
  char buf[32];
  if (s >= 3600) std::snprintf(buf, sizeof buf, "%dh%02dm", static_cast<int>(s / 3600), static_cast<int>(s / 60) % 60);
  else std::snprintf(buf, sizeof buf, "%dm%02ds", static_cast<int>(s / 60), static_cast<int>(s) % 60);
  return buf;
}

namespace {
// "loss 0.4321 top1 85.20%": accuracies and agreements as percentages, the rest with 4 decimals.
std::string describe_metric(const std::string& name, double v) {
  char b[64];
  const bool pct = name.find("top1") != std::string::npos || name.find("agreement") != std::string::npos;
  if (pct) std::snprintf(b, sizeof b, "%s %.2f%%", name.c_str(), 100.0 * v);
  else std::snprintf(b, sizeof b, "%s %.4f", name.c_str(), v);
  return b;
}
// Steps before the timed windows start (CUDA-graph capture, cuDNN autotuning, the allocator's first growth).
// ISP_TIMING_WARMUP_STEPS=N overrides the 20 for benchmarks of networks whose steps take seconds on the CPU.
int64_t timing_warmup_steps() {
  static const int64_t n = [] {
    const char* env = std::getenv("ISP_TIMING_WARMUP_STEPS");
    return env ? std::max<int64_t>(1, std::atoll(env)) : int64_t{20};
  }();
  return n;
}

double median_of(std::vector<double> v) {
  std::sort(v.begin(), v.end());
  const std::size_t n = v.size();
  return n % 2 ? v[n / 2] : 0.5 * (v[n / 2 - 1] + v[n / 2]);
}
}  // namespace

void TrainLoopHooks::checkpoint(torch::nn::Module& module, torch::optim::Optimizer& optimizer, const std::string& name) {
  save = [&module, &optimizer, name](CheckpointWriter& w) {
    w.module(name, module);
    w.optimizer("optimizer", optimizer);
  };
  load = [&module, &optimizer, name](CheckpointReader& r) {
    r.module(name, module);
    r.optimizer("optimizer", optimizer);
  };
  save_best = [&module, name](CheckpointWriter& w) { w.module(name, module); };
  replicas = {&module};
}

void TrainLoopHooks::checkpoint(torch::nn::Module& module, FlatOptimizer& optimizer, const std::string& name) {
  save = [&module, &optimizer, name](CheckpointWriter& w) {
    w.module(name, module);
    w.optimizer("optimizer", optimizer);
  };
  load = [&module, &optimizer, name](CheckpointReader& r) {
    r.module(name, module);  // copies into the parameters' own storage; relink is for code that replaced it
    optimizer.relink();
    r.optimizer("optimizer", optimizer);
  };
  save_best = [&module, name](CheckpointWriter& w) { w.module(name, module); };
  replicas = {&module};
}

TrainLoopResult run_train_loop(const TrainLoopSpec& spec, const TrainLoopHooks& h, BatchLoader& loader, RunContext& ctx) {
  if (!h.step || !h.save || !h.load) throw Error("run_train_loop: step, save and load hooks are required");
  if (h.score && !h.save_best) throw Error("run_train_loop: a score hook needs save_best");
  fs::create_directories(ctx.stage_dir);
  const std::string ckpt_path = ctx.stage_dir + "/checkpoint.pt";
  const double no_score = -std::numeric_limits<double>::infinity();
  TrainLoopResult res;
  res.best_path = ctx.stage_dir + "/best.pt";
  res.best_score = no_score;
  const std::size_t k = spec.metrics.size();
  std::vector<double> sums(k, 0.0);  // host copies of this epoch's running sums (batch-size weighted)
  int64_t start_epoch = 0, start_step = 0, seen_in_epoch = 0;

  // The previous checkpoint is kept as checkpoint.prev.pt: a damaged (or, after a crash between the two
  // renames, missing) checkpoint.pt falls back to it, and replaying from there gives the same result.
  const std::string prev_path = ctx.stage_dir + "/checkpoint.prev.pt";
  std::unique_ptr<CheckpointReader> resumed;
  if (ctx.resume && (fs::exists(ckpt_path) || fs::exists(prev_path))) {
    try {
      resumed = std::make_unique<CheckpointReader>(ckpt_path);
    } catch (const Error& e) {
      if (!fs::exists(prev_path)) throw;
      std::fprintf(stderr, "[%s] WARNING: %s; resuming from the previous checkpoint %s\n", ctx.stage_name.c_str(),
                   e.what(), prev_path.c_str());
      resumed = std::make_unique<CheckpointReader>(prev_path);
      if (writes_files()) fs::remove(ckpt_path);  // so the next save does not rotate the damaged file over the good one
    }
  }
  // Data-parallel: this rank's slice of every global batch; its own noise stream (rank 0 keeps the one-process
  // stream, so a world of one is the single-process run).
  const int world = dist::world_size(), rank = dist::rank();
  if (world > 1) loader.shard(rank, world);
  auto seed_rank_streams = [&] {
    if (rank == 0) return;
    const uint64_t s = mix_seed(ctx.seed, static_cast<uint64_t>(rank), 0xD157);
    at::Generator(at::detail::getDefaultCPUGenerator()).set_current_seed(s);
    if (!ctx.device.is_cpu()) at::Generator(at::globalContext().defaultGenerator(ctx.device)).set_current_seed(s);
  };
  auto sync_replica_buffers = [&](const char* what) {
    for (auto* m : h.replicas) dist::broadcast_module(*m, /*parameters=*/false, /*buffers=*/true, what);
  };
  if (!resumed) seed_rank_streams();
  if (resumed) {
    CheckpointReader& r = *resumed;
    const int64_t saved_world = r.meta().value("world_size", int64_t{1});
    if (saved_world != world && !dist::settings().allow_reshard)
      throw Error(r.path() + ": this checkpoint was written by a run of " + std::to_string(saved_world) +
                  " process(es), and this run has " + std::to_string(world) + "; resume with the same world size, or "
                  "set runtime.dist_allow_reshard to continue with the data split anew (the epoch's remaining "
                  "batches are then not exactly the ones the original run would have taken)");
    h.load(r);
    const json& m = r.meta();
    start_epoch = m.at("epoch");
    start_step = m.at("step");
    res.best_epoch = m.value("best_epoch", int64_t{-1});
    if (m.contains("best_score") && m["best_score"].is_number()) res.best_score = m["best_score"];
    seen_in_epoch = m.value("seen_in_epoch", int64_t{0});
    res.images_seen = m.value("images_seen", int64_t{0});
    res.train_seconds = m.value("train_seconds", 0.0);
    std::vector<double> saved = m.value("sums", std::vector<double>{});
    if (saved.size() == k) sums = saved;
    const std::string sfx = rank == 0 ? "" : "_rank" + std::to_string(rank);
    if (r.has("rng" + sfx)) at::Generator(at::detail::getDefaultCPUGenerator()).set_state(r.tensor("rng" + sfx));
    else seed_rank_streams();  // re-sharded: this rank had no stream in the saved run
    if (!ctx.device.is_cpu() && r.has("rng_device" + sfx))
      at::Generator(at::globalContext().defaultGenerator(ctx.device)).set_state(r.tensor("rng_device" + sfx));
    // The selected weights so far must still be readable: find out now, not at model selection after the
    // remaining epochs (CheckpointReader names the file and what is wrong with it).
    if (res.best_epoch > 0) {
      if (!fs::exists(res.best_path))
        throw Error(res.best_path + ": missing, but " + r.path() + " records epoch " + std::to_string(res.best_epoch) +
                    " as the best so far; restore the file or rerun the stage (--resume --force after a recipe change)");
      CheckpointReader check(res.best_path);
      res.best_line = check.meta().value("metrics", json());
    }
    std::fprintf(stderr, "[%s] resuming from %s at epoch %lld step %lld\n", ctx.stage_name.c_str(), r.path().c_str(),
                 static_cast<long long>(start_epoch), static_cast<long long>(start_step));
  }

  auto save_checkpoint = [&](int64_t epoch, int64_t step) {
    CheckpointWriter w;
    h.save(w);
    // Every rank's noise streams go into rank 0's one checkpoint: a resumed run continues each of them.
    const at::Tensor cpu_rng = at::detail::getDefaultCPUGenerator().get_state();
    const std::vector<at::Tensor> cpu_rngs = dist::allgather(cpu_rng, "checkpoint RNG states");
    for (int q = 0; q < world; ++q)
      w.tensor(q == 0 ? "rng" : "rng_rank" + std::to_string(q), cpu_rngs[static_cast<std::size_t>(q)]);
    if (!ctx.device.is_cpu()) {
      const at::Tensor dev_rng = at::Generator(at::globalContext().defaultGenerator(ctx.device)).get_state();
      const std::vector<at::Tensor> dev_rngs = dist::allgather(dev_rng, "checkpoint RNG states");
      for (int q = 0; q < world; ++q)
        w.tensor(q == 0 ? "rng_device" : "rng_device_rank" + std::to_string(q), dev_rngs[static_cast<std::size_t>(q)]);
    }
    w.meta({{"epoch", epoch}, {"step", step}, {"best_epoch", res.best_epoch},
            {"best_score", std::isfinite(res.best_score) ? json(res.best_score) : json(nullptr)}, {"sums", sums},
            {"seen_in_epoch", seen_in_epoch}, {"images_seen", res.images_seen}, {"train_seconds", res.train_seconds},
            {"recipe", ctx.resolved_recipe}, {"stage", ctx.stage_name}, {"world_size", world}});
    if (!writes_files()) return;  // rank > 0
    if (fs::exists(ckpt_path)) fs::rename(ckpt_path, prev_path);
    w.save_atomic(ckpt_path);
  };

  Progress progress(ctx.stage_name);
  int64_t steps_per_epoch = loader.num_batches();
  if (spec.max_steps_per_epoch > 0) steps_per_epoch = std::min(steps_per_epoch, spec.max_steps_per_epoch);
  const int64_t total_steps = steps_per_epoch * spec.epochs;
  const char* inject = std::getenv("ISP_INTERRUPT_AFTER_STEPS");
  const int64_t interrupt_after = inject ? std::atoll(inject) : -1;
  int64_t steps_this_process = 0;
  const double t_process = now_seconds();
  // ISP_PROFILE_STEPS=N: self time per operator over the N steps after the warm-up, to <stage>/op_profile.txt.
  const char* profile_env = std::getenv("ISP_PROFILE_STEPS");
  const int64_t profile_steps = profile_env ? std::max<int64_t>(0, std::atoll(profile_env)) : 0;
  std::unique_ptr<OpProfile> op_profile;
  const auto dopt = torch::TensorOptions().dtype(torch::kDouble).device(ctx.device);
  for (int64_t epoch = start_epoch; epoch < spec.epochs; ++epoch) {
    json line = {{"epoch", epoch + 1}};
    if (h.start_epoch) line.update(h.start_epoch(epoch));
    loader.start_epoch(ctx.seed, epoch);
    const double t_epoch = now_seconds();
    at::Tensor dev_sums = torch::zeros({static_cast<int64_t>(k)}, dopt);
    // Step timing between progress reads (each one a host synchronisation): windows that start after the
    // process's first timing_warmup_steps() steps (CUDA-graph capture, cuDNN autotuning) give the medians.
    double t_window = -1;
    int64_t window_steps = 0, window_images = 0, window_first_step = 0;
    std::vector<double> window_step_ms, window_images_per_s;
    int64_t timed_steps = 0;
    for (int64_t step = (epoch == start_epoch ? start_step : 0); step < steps_per_epoch; ++step) {
      if (profile_steps > 0 && steps_this_process == timing_warmup_steps()) op_profile = std::make_unique<OpProfile>();
      Batch b = loader.get(step);
      dev_sums += h.step(b).detach().to(torch::kDouble).reshape({static_cast<int64_t>(k)}) * static_cast<double>(b.size());
      seen_in_epoch += b.size() * world;  // the global batch (every rank's slice has the same size)
      res.images_seen += b.size() * world;
      if (++steps_this_process == interrupt_after && ctx.interrupted) ctx.interrupted->store(true);
      // Ctrl-C reaches the ranks at different steps: they agree to stop at the same one, decided here once.
      bool stop_now = ctx.stop_requested();
      if (world > 1) stop_now = dist::allreduce_max(stop_now ? 1.0 : 0.0, "stop flag") > 0;
      if (stop_now && ctx.interrupted) ctx.interrupted->store(true);
      if (op_profile && steps_this_process == timing_warmup_steps() + profile_steps) {
        if (!ctx.device.is_cpu()) dev_sums.cpu();  // the steps' queued kernels finish inside the profile
        const std::string table = op_profile->table(30, static_cast<double>(profile_steps));
        op_profile.reset();
        if (writes_files())
          std::ofstream(fs::path(ctx.stage_dir) / "op_profile.txt")
            << ctx.stage_name << ": self time per step over " << profile_steps << " steps after "
            << timing_warmup_steps() << " warm-up steps\n" << table;
        std::fprintf(stderr, "[%s] operator profile per step (%lld steps):\n%s", ctx.stage_name.c_str(),
                     static_cast<long long>(profile_steps), table.c_str());
      }
      const bool last_step = step + 1 == steps_per_epoch;
      ++window_steps;
      window_images += b.size() * world;
      if (last_step || step % spec.progress_every == 0 || stop_now) {
        dist::allreduce_sum(dev_sums, "step metrics");  // every rank's sums: the global batch's means
        at::Tensor host = dev_sums.cpu();
        for (std::size_t j = 0; j < k; ++j) sums[j] += host[static_cast<int64_t>(j)].item<double>();
        dev_sums.zero_();
        const double t_now = now_seconds();
        if (t_window >= 0 && window_first_step >= timing_warmup_steps() && window_steps > 0) {
          window_step_ms.push_back(1000.0 * (t_now - t_window) / static_cast<double>(window_steps));
          window_images_per_s.push_back(static_cast<double>(window_images) / std::max(1e-9, t_now - t_window));
          timed_steps += window_steps;
        }
        t_window = t_now;
        window_steps = window_images = 0;
        window_first_step = steps_this_process;
        const int64_t done = epoch * steps_per_epoch + step + 1;
        const double per_step = (now_seconds() - t_process) /
                                static_cast<double>(std::max<int64_t>(1, done - start_epoch * steps_per_epoch - start_step));
        std::string text = "epoch " + std::to_string(epoch + 1) + "/" + std::to_string(spec.epochs) + " step " +
                           std::to_string(step + 1) + "/" + std::to_string(steps_per_epoch);
        for (std::size_t j = 0; j < k; ++j)
          text += " " + describe_metric(spec.metrics[j], sums[j] / static_cast<double>(std::max<int64_t>(1, seen_in_epoch)));
        char buf[96];
        std::snprintf(buf, sizeof buf, " %.0f img/s ETA %s",
                      static_cast<double>(seen_in_epoch) / std::max(1e-9, now_seconds() - t_epoch),
                      fmt_duration(per_step * static_cast<double>(total_steps - done)).c_str());
        progress.update(text + buf);
      }
      if (stop_now) {
        res.train_seconds += now_seconds() - t_epoch;
        save_checkpoint(epoch, step + 1);
        progress.finish("interrupted: checkpoint written to " + ckpt_path);
        throw Interrupted("interrupted at epoch " + std::to_string(epoch + 1) + " step " + std::to_string(step + 1) +
                          "; continue with --resume");
      }
    }
    const double epoch_seconds = now_seconds() - t_epoch;
    res.train_seconds += epoch_seconds;
    const double denom = static_cast<double>(std::max<int64_t>(1, seen_in_epoch));
    std::string text = "epoch " + std::to_string(epoch + 1) + "/" + std::to_string(spec.epochs);
    for (std::size_t j = 0; j < k; ++j) {
      line["train_" + spec.metrics[j]] = sums[j] / denom;
      text += " " + describe_metric(spec.metrics[j], sums[j] / denom);
    }
    line["images_per_s"] = static_cast<double>(seen_in_epoch) / std::max(1e-9, epoch_seconds);
    if (!window_step_ms.empty()) {
      line["step_ms_median"] = median_of(window_step_ms);
      line["images_per_s_median"] = median_of(window_images_per_s);
      line["timed_steps"] = timed_steps;
    }
    const bool eval_now = (epoch + 1) % spec.eval_every == 0 || epoch + 1 == spec.epochs;
    if (eval_now && h.evaluate) {
      sync_replica_buffers("BatchNorm statistics before evaluation");
      json val = h.evaluate(epoch);
      // Rank 0's figures decide (model selection): every rank takes the same decision.
      if (world > 1) val = json::parse(dist::broadcast_string(val.dump(), "evaluation metrics"));
      for (auto it = val.begin(); it != val.end(); ++it) {
        line[it.key()] = it.value();
        if (it.value().is_number()) text += " " + describe_metric(it.key(), it.value().get<double>());
      }
      const double score = h.score ? h.score(line, epoch) : no_score;
      if (score > res.best_score) {
        res.best_score = score;
        res.best_epoch = epoch + 1;
        CheckpointWriter w;
        h.save_best(w);
        w.meta({{"epoch", epoch + 1}, {"score", score}, {"metrics", line}, {"recipe", ctx.resolved_recipe}});
        w.save_atomic(res.best_path);
        res.best_line = line;
      }
    }
    char buf[64];
    std::snprintf(buf, sizeof buf, " %.0f img/s (%.1fs)", line["images_per_s"].get<double>(), epoch_seconds);
    progress.finish(text + buf);
    if (ctx.log_metrics) ctx.log_metrics(line);
    res.last_line = line;
    std::fill(sums.begin(), sums.end(), 0.0);
    seen_in_epoch = 0;
    save_checkpoint(epoch + 1, 0);
  }
  sync_replica_buffers("BatchNorm statistics at the end of training");
  // best.pt and checkpoint.pt are complete before any rank reads them.
  dist::barrier("end of " + ctx.stage_name + "'s training loop");
  return res;
}

}  // namespace isp
