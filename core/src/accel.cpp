// Speed settings of training steps: channels_last, bfloat16 autocast and CUDA-graph capture (isp/accel.h).
#include "isp/accel.h"
#include "autocast_internal.h"

#include <torch/nn/module.h>
#include <torch/nn/modules/conv.h>
#include <torch/version.h>

#include <ATen/ATen.h>
#include <c10/core/GradMode.h>

#include <ATen/autocast_mode.h>

#include <cstdio>
#include <cstdlib>
#include <fstream>
#if defined(__GLIBC__)
#include <malloc.h>
#endif
#include <sstream>
#include <string>

#if ISP_TORCH_WITH_CUDA
#include <ATen/cuda/CUDAGraph.h>
#include <c10/cuda/CUDAGuard.h>
#include <c10/cuda/CUDAStream.h>
#endif

#include "isp/registry/error.h"

namespace isp {

bool uses_channels_last(const torch::nn::Module& m, const SpeedSettings& speed) {
  if (speed.channels_last) return true;
  if (!speed.channels_last_if_grouped) return false;
  for (const auto& sub : m.modules(/*include_self=*/true))
    if (const auto* conv = sub->as<torch::nn::Conv2d>(); conv && conv->options.groups() > 1) return true;
  return false;
}

void apply_memory_format(torch::nn::Module& m, const SpeedSettings& speed) {
  if (!uses_channels_last(m, speed)) return;
  c10::NoGradGuard ng;
  for (auto& p : m.parameters())
    if (p.dim() == 4) p.set_data(p.detach().contiguous(at::MemoryFormat::ChannelsLast));
  for (auto& b : m.buffers())
    if (b.dim() == 4) b.set_data(b.contiguous(at::MemoryFormat::ChannelsLast));
}

at::Tensor apply_memory_format(const at::Tensor& x, const SpeedSettings& speed) {
  return speed.channels_last && x.dim() == 4 ? x.contiguous(at::MemoryFormat::ChannelsLast) : x;
}

namespace {
struct AutocastState {
  bool enabled;
  at::ScalarType dtype;
};
// LibTorch 2.4 made autocast's state per device type; older versions have separate CUDA ("gpu") and CPU calls.
AutocastState autocast_state(bool cuda) {
#if TORCH_VERSION_MAJOR > 2 || (TORCH_VERSION_MAJOR == 2 && TORCH_VERSION_MINOR >= 4)
  const c10::DeviceType d = cuda ? at::kCUDA : at::kCPU;
  return {at::autocast::is_autocast_enabled(d), at::autocast::get_autocast_dtype(d)};
#else
  return cuda ? AutocastState{at::autocast::is_enabled(), at::autocast::get_autocast_gpu_dtype()}
              : AutocastState{at::autocast::is_cpu_enabled(), at::autocast::get_autocast_cpu_dtype()};
#endif
}
void set_autocast_state(bool cuda, AutocastState st) {
#if TORCH_VERSION_MAJOR > 2 || (TORCH_VERSION_MAJOR == 2 && TORCH_VERSION_MINOR >= 4)
  const c10::DeviceType d = cuda ? at::kCUDA : at::kCPU;
  at::autocast::set_autocast_enabled(d, st.enabled);
  at::autocast::set_autocast_dtype(d, st.dtype);
#else
  if (cuda) {
    at::autocast::set_enabled(st.enabled);
    at::autocast::set_autocast_gpu_dtype(st.dtype);
  } else {
    at::autocast::set_cpu_enabled(st.enabled);
    at::autocast::set_autocast_cpu_dtype(st.dtype);
  }
#endif
}

}  // namespace

at::ScalarType autocast_dtype_for(c10::DeviceType device) {
  if (device != c10::DeviceType::CUDA && device != c10::DeviceType::CPU) return at::ScalarType::Undefined;
  const AutocastState st = autocast_state(device == c10::DeviceType::CUDA);
  return st.enabled ? st.dtype : at::ScalarType::Undefined;
}

namespace {
// bfloat16 autocast for a scope on CUDA or on the CPU. The cast cache is off under CUDA-graph capture: cached
// casts would live outside the graph's memory pool.
class Bf16Autocast {
 public:
  Bf16Autocast(bool on, c10::DeviceType device, bool cache) : on_(on), cuda_(device == c10::DeviceType::CUDA) {
    if (!on_) return;
    prev_ = autocast_state(cuda_);
    set_autocast_state(cuda_, {true, at::kBFloat16});
    prev_cache_ = at::autocast::is_autocast_cache_enabled();
    at::autocast::set_autocast_cache_enabled(cache);
    at::autocast::increment_nesting();
  }
  ~Bf16Autocast() {
    if (!on_) return;
    if (at::autocast::decrement_nesting() == 0) at::autocast::clear_cache();
    at::autocast::set_autocast_cache_enabled(prev_cache_);
    set_autocast_state(cuda_, prev_);
  }
  Bf16Autocast(const Bf16Autocast&) = delete;
  Bf16Autocast& operator=(const Bf16Autocast&) = delete;

 private:
  bool on_, cuda_;
  AutocastState prev_{false, at::kHalf};
  bool prev_cache_ = true;
};
}  // namespace

bool cpu_has_native_bf16() {
  // oneDNN runs bfloat16 convolutions natively with AVX512-BF16 or AMX; without them it emulates them, slower
  // than fp32. Linux names the features in /proc/cpuinfo; elsewhere this answers no.
  static const bool has = [] {
    std::ifstream in("/proc/cpuinfo");
    std::string line;
    while (std::getline(in, line)) {
      if (line.rfind("flags", 0) != 0) continue;
      std::istringstream words(line);
      std::string w;
      while (words >> w)
        if (w == "avx512_bf16" || w == "amx_bf16") return true;
      return false;
    }
    return false;
  }();
  return has;
}

bool keep_freed_memory_in_process() {
#if defined(__GLIBC__)
  // Benchmarks compare with glibc's defaults (bench/cpu_phases.sh, the "before" columns).
  if (const char* keep_defaults = std::getenv("ISP_GLIBC_MALLOC_DEFAULTS"); keep_defaults && std::string(keep_defaults) == "1")
    return false;
  // A fixed mmap threshold also stops glibc's own adaptation, which would otherwise raise it only after the
  // first large block had been unmapped. 32 MiB is the largest value glibc accepts on 64-bit systems.
  const bool mmap_ok = mallopt(M_MMAP_THRESHOLD, 32 << 20) == 1;
  const bool trim_ok = mallopt(M_TRIM_THRESHOLD, 1 << 30) == 1;
  return mmap_ok && trim_ok;
#else
  return false;
#endif
}

#if ISP_TORCH_WITH_CUDA

bool cuda_graphs_supported() { return true; }

struct TrainStep::Graph {
  explicit Graph(c10::DeviceIndex index) : side(c10::cuda::getStreamFromPool(false, index)) {}
  at::cuda::CUDAGraph graph;
  c10::cuda::CUDAStream side;  // warm-up and capture run here (CUDA cannot capture the legacy default stream)
  std::vector<int64_t> shape;  // the batch shape the graph is for
  Batch statics;               // the graph reads its inputs from these tensors ...
  at::Tensor out;              // ... and writes its metrics here
  int calls = 0;
  bool captured = false;
};

TrainStep::TrainStep(const RunContext& ctx, Body body)
    : speed_(ctx.speed), device_(ctx.device), body_(std::move(body)) {
  if (speed_.cuda_graphs && device_.is_cuda()) graph_ = std::make_unique<Graph>(device_.index());
}

at::Tensor TrainStep::operator()(const Batch& batch) {
  const Batch in{apply_memory_format(batch.x, speed_), batch.y, batch.index};
  if (!graph_) {
    Bf16Autocast autocast(speed_.bf16, device_.type(), /*cache=*/true);
    return body_(in);
  }
  Graph& g = *graph_;
  const std::vector<int64_t> shape = in.x.sizes().vec();
  if (g.shape.empty()) g.shape = shape;
  if (shape != g.shape) {  // another batch shape (an epoch's last batch): eagerly
    Bf16Autocast autocast(speed_.bf16, c10::DeviceType::CUDA, /*cache=*/true);
    return body_(in);
  }
  c10::cuda::CUDAStream current = c10::cuda::getCurrentCUDAStream(device_.index());
  if (!g.captured && g.calls < kWarmupCalls) {
    ++g.calls;
    current.synchronize();
    at::Tensor out;
    {
      c10::cuda::CUDAStreamGuard on_side(g.side);
      Bf16Autocast autocast(speed_.bf16, c10::DeviceType::CUDA, /*cache=*/false);
      out = body_(in);
    }
    g.side.synchronize();
    return out;
  }
  if (!g.captured) {
    g.statics = Batch{in.x.clone(), in.y.clone(), in.index.clone()};
    current.synchronize();
    std::string failure;
    {
      c10::cuda::CUDAStreamGuard on_side(g.side);
      Bf16Autocast autocast(speed_.bf16, c10::DeviceType::CUDA, /*cache=*/false);
      g.graph.capture_begin();
      try {
        g.out = body_(g.statics);
      } catch (const std::exception& e) {
        failure = e.what();
      }
      try {
        g.graph.capture_end();  // also ends an invalidated capture (and then throws)
      } catch (const std::exception& e) {
        if (failure.empty()) failure = e.what();
      }
    }
    if (!failure.empty()) {
      // A body that cannot be captured (a plugin that reads a value back, say) still trains, eagerly.
      (void)cudaGetLastError();
      graph_.reset();
      std::fprintf(stderr, "WARNING: CUDA graph capture of the training step failed (%s); steps run eagerly\n",
                   failure.substr(0, failure.find('\n')).c_str());
      Bf16Autocast autocast(speed_.bf16, c10::DeviceType::CUDA, /*cache=*/true);
      return body_(in);
    }
    g.side.synchronize();
    g.captured = true;
    g.graph.replay();  // capture records the work without running it: run it for this batch
    return g.out.clone();
  }
  g.statics.x.copy_(in.x);
  g.statics.y.copy_(in.y);
  g.statics.index.copy_(in.index);
  g.graph.replay();
  return g.out.clone();
}

bool TrainStep::captured() const { return graph_ && graph_->captured; }

#else  // LibTorch without CUDA

bool cuda_graphs_supported() { return false; }

struct TrainStep::Graph {};

TrainStep::TrainStep(const RunContext& ctx, Body body)
    : speed_(ctx.speed), device_(ctx.device), body_(std::move(body)) {
  if (speed_.cuda_graphs && device_.is_cuda())
    throw Error("runtime.cuda_graphs: this build of isp has no CUDA support");
}

at::Tensor TrainStep::operator()(const Batch& batch) {
  Bf16Autocast autocast(speed_.bf16, device_.type(), /*cache=*/true);
  return body_(Batch{apply_memory_format(batch.x, speed_), batch.y, batch.index});
}

bool TrainStep::captured() const { return false; }

#endif

TrainStep::~TrainStep() = default;

}  // namespace isp
