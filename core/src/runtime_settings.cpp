// The recipe's "plugins" and "runtime" sections applied (isp/runner.h: load_recipe_plugins, apply_runtime):
// plugins loaded, torch threads set, the device chosen, the speed and data-parallel settings checked.
#include <ATen/Context.h>
#include <ATen/Parallel.h>
#include <torch/cuda.h>

#include <algorithm>
#include <cstdlib>
#include <filesystem>
#include <set>
#include <thread>

#include "isp/accel.h"
#include "isp/distributed.h"
#include "isp/interfaces/backbone.h"
#include "isp/runner.h"
#include "run_folder.h"

namespace fs = std::filesystem;

namespace isp {

void load_recipe_plugins(Registry& reg, const Recipe& r) {
  auto it = r.doc.find("plugins");
  if (it == r.doc.end()) return;
  if (!it->is_array()) throw RecipeError(r.where("/plugins"), "expected a list of plugin files or folders");
  for (std::size_t i = 0; i < it->size(); ++i) {
    const std::string ptr = "/plugins/" + std::to_string(i);
    if (!(*it)[i].is_string()) throw RecipeError(r.where(ptr), "expected a path string, got " + (*it)[i].dump());
    fs::path p = detail::plugin_path(r, i);
    try {
      if (fs::is_directory(p)) reg.scan_directory(p.string());
      else if (fs::exists(p)) reg.load_library(p.string());
      else throw Error("plugin file or folder not found: " + p.string());
    } catch (const RecipeError&) {
      throw;
    } catch (const Error& err) {
      throw RecipeError(r.where(ptr), err.what());
    }
  }
}

Runtime apply_runtime(const Recipe& r) {
  json rt = r.doc.value("runtime", json::object());
  if (!rt.is_object()) throw RecipeError(r.where("/runtime"), "expected an object");
  static const std::set<std::string> known = {"threads", "device", "deterministic", "precision", "channels_last",
                                               "cuda_graphs", "fold_batchnorm", "dist_backend", "dist_timeout_s",
                                               "dist_allow_reshard", "dist_sync_batchnorm"};
  for (auto it = rt.begin(); it != rt.end(); ++it)
    if (!known.count(it.key()))
      throw RecipeError(r.where("/runtime/" + it.key()),
                        "unknown runtime setting (known: threads, device, deterministic, precision, channels_last, "
                        "cuda_graphs, fold_batchnorm, dist_backend, dist_timeout_s, dist_allow_reshard, "
                        "dist_sync_batchnorm)");
  Runtime out;
  out.threads = 0;
  if (rt.contains("threads")) {
    if (!rt["threads"].is_number_integer() || rt["threads"].get<int>() < 0)
      throw RecipeError(r.where("/runtime/threads"), "expected an integer >= 0 (0 = all cores), got " + rt["threads"].dump());
    out.threads = rt["threads"];
  }
  if (out.threads == 0) {
    // All cores, shared by the processes of this node in a data-parallel run (LOCAL_WORLD_SIZE, as torchrun sets).
    const char* local_world = std::getenv("LOCAL_WORLD_SIZE");
    const int procs = local_world ? std::max(1, std::atoi(local_world)) : 1;
    out.threads = std::max(1, static_cast<int>(std::max(1u, std::thread::hardware_concurrency())) / procs);
  }
  // The default intra-op pool starts with 1 thread on small VMs: always set it.
  at::set_num_threads(out.threads);
  std::string dev = rt.value("device", std::string("auto"));
  if (dev == "auto") dev = torch::cuda::is_available() ? "cuda" : "cpu";
  try {
    out.device = c10::Device(dev);
  } catch (const std::exception&) {
    throw RecipeError(r.where("/runtime/device"), "expected auto, cpu, cuda or cuda:N, got \"" + dev + "\"");
  }
  if (out.device.is_cuda() && !torch::cuda::is_available())
    throw RecipeError(r.where("/runtime/device"), "CUDA requested but this LibTorch sees no CUDA device");
  bool deterministic = false;
  if (rt.contains("deterministic")) {
    if (!rt["deterministic"].is_boolean())
      throw RecipeError(r.where("/runtime/deterministic"), "expected true or false, got " + rt["deterministic"].dump());
    deterministic = rt["deterministic"];
  }
  // Speed settings (docs/performance.md). "auto" = what bench/gpu_phases.sh measured fastest at the same
  // accuracy (bench/gpu_session.sh, part "accuracy"): on CUDA channels_last, CUDA graphs and bf16 autocast, on the
  // CPU none of them (but NHWC for depthwise networks, and with bf16: below).
  const bool cuda = out.device.is_cuda();
  auto on_off_auto = [&](const char* key, bool auto_value) {
    if (!rt.contains(key)) return auto_value;
    const json& v = rt[key];
    if (v.is_boolean()) return v.get<bool>();
    if (v.is_string() && v.get<std::string>() == "auto") return auto_value;
    throw RecipeError(r.where(std::string("/runtime/") + key), "expected true, false or \"auto\", got " + v.dump());
  };
  // Data-parallel runs (isp/distributed.h). Their gradient allreduces start from hooks inside the backward pass,
  // which a captured CUDA graph would not replay: CUDA graphs are off there.
  const bool data_parallel = dist::world_from_env().world_size > 1;
  out.dist.backend = rt.value("dist_backend", std::string("auto"));
  if (out.dist.backend != "auto" && out.dist.backend != "gloo" && out.dist.backend != "nccl")
    throw RecipeError(r.where("/runtime/dist_backend"), "expected \"auto\", \"gloo\" or \"nccl\", got \"" + out.dist.backend + "\"");
  if (rt.contains("dist_timeout_s") && (!rt["dist_timeout_s"].is_number() || rt["dist_timeout_s"].get<double>() < 1))
    throw RecipeError(r.where("/runtime/dist_timeout_s"), "expected a number of seconds >= 1, got " + rt["dist_timeout_s"].dump());
  out.dist.timeout_s = rt.value("dist_timeout_s", out.dist.timeout_s);
  if (rt.contains("dist_allow_reshard") && !rt["dist_allow_reshard"].is_boolean())
    throw RecipeError(r.where("/runtime/dist_allow_reshard"), "expected true or false, got " + rt["dist_allow_reshard"].dump());
  out.dist.allow_reshard = rt.value("dist_allow_reshard", false);
  if (rt.contains("dist_sync_batchnorm") && !rt["dist_sync_batchnorm"].is_boolean())
    throw RecipeError(r.where("/runtime/dist_sync_batchnorm"), "expected true or false, got " + rt["dist_sync_batchnorm"].dump());
  out.dist.sync_batchnorm = rt.value("dist_sync_batchnorm", false);
  if (data_parallel && rt.value("cuda_graphs", json("auto")) == json(true))
    throw RecipeError(r.where("/runtime/cuda_graphs"), "CUDA graphs cannot capture a data-parallel step (its gradient "
                                                         "allreduces start inside the backward pass); use \"auto\" or false");
  out.speed.cuda_graphs = on_off_auto("cuda_graphs", cuda && cuda_graphs_supported() && !deterministic && !data_parallel);
  if (out.speed.cuda_graphs && !cuda)
    throw RecipeError(r.where("/runtime/cuda_graphs"), "CUDA graphs need runtime.device cuda; the device is " +
                                                           out.device.str());
  if (out.speed.cuda_graphs && !cuda_graphs_supported())
    throw RecipeError(r.where("/runtime/cuda_graphs"), "this build of isp has no CUDA support");
  const json precision = rt.value("precision", json("auto"));
  if (precision != "fp32" && precision != "bf16" && precision != "auto" && precision != "bf16_if_native")
    throw RecipeError(r.where("/runtime/precision"),
                      "expected \"fp32\", \"bf16\", \"bf16_if_native\" or \"auto\", got " + precision.dump());
  // "bf16_if_native": bf16 where it is fast (CUDA, or a CPU with AVX512-BF16 or AMX), fp32 elsewhere, so one
  // recipe (configs/isp/quick_fmnist_fast.json) runs on any machine at the speed that machine allows.
  out.speed.bf16 = precision == "bf16" || (precision == "auto" && cuda) ||
                   (precision == "bf16_if_native" && (cuda || cpu_has_native_bf16()));
  if (out.speed.bf16 && !cuda && !cpu_has_native_bf16())
    throw RecipeError(r.where("/runtime/precision"),
                      "bf16 autocast on the CPU needs AVX512-BF16 or AMX, which this CPU lacks (oneDNN would emulate "
                      "bfloat16, slower than fp32); use \"fp32\", or \"bf16_if_native\" for bf16 only where it is "
                      "native");
  // "auto" on the CPU: NHWC with bf16 (oneDNN's NHWC bfloat16 kernels: 1.15-1.24x bf16 in NCHW in four of the five
  // phases, docs/performance.md); in fp32 NCHW (the layout the quality tables were measured in), except for
  // networks with depthwise convolutions, whose NCHW kernels in LibTorch 1.13 are 4-5x slower than oneDNN's NHWC
  // ones (MobileNetV2's classifier phase 1.9x faster in NHWC).
  out.speed.channels_last = on_off_auto("channels_last", cuda || out.speed.bf16);
  out.speed.channels_last_if_grouped =
      !cuda && !out.speed.channels_last && rt.value("channels_last", json("auto")) == json("auto");
  // Frozen networks run each conv + eval-mode BN as one folded convolution (isp/interfaces/backbone.h); off
  // for comparisons (bench/cpu_phases.sh).
  if (rt.contains("fold_batchnorm") && !rt["fold_batchnorm"].is_boolean())
    throw RecipeError(r.where("/runtime/fold_batchnorm"), "expected true or false, got " + rt["fold_batchnorm"].dump());
  out.speed.fold_batchnorm = rt.value("fold_batchnorm", true);
  set_batchnorm_folding(out.speed.fold_batchnorm);
  if (cuda) {
    // cuDNN autotuning picks the fastest convolution algorithms; its choice can differ run to run.
    at::globalContext().setBenchmarkCuDNN(!deterministic);
    at::globalContext().setDeterministicCuDNN(deterministic);
  }
  return out;
}

}  // namespace isp
