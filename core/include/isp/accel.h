#pragma once
// The speed path of training steps (docs/performance.md): channels_last layout, bfloat16 autocast and CUDA
// graphs. Each is a runtime setting (RunContext::speed); on the CPU channels_last and (where the CPU computes
// bfloat16 natively) bf16 autocast apply.
#include <cstdint>
#include <functional>
#include <memory>

#include <ATen/core/Tensor.h>

#include "isp/data.h"
#include "isp/interfaces/stage.h"

namespace torch { namespace nn { class Module; } }

namespace isp {

// Whether `m` runs channels_last (NHWC) under `speed`: always with speed.channels_last; with
// speed.channels_last_if_grouped when `m` holds a grouped convolution (MobileNetV2's depthwise layers).
ISP_API bool uses_channels_last(const torch::nn::Module& m, const SpeedSettings& speed);
// Makes the 4-D parameters and buffers of `m` channels_last when uses_channels_last(m, speed); otherwise does
// nothing. Call before building an optimizer over `m` (FlatOptimizer keeps the layout it finds). In the "if
// grouped" case inputs stay NCHW: a convolution with NHWC weights gives NHWC outputs, so the layout follows
// from the first layer whose weights are unambiguously NHWC.
ISP_API void apply_memory_format(torch::nn::Module& m, const SpeedSettings& speed);
// The input layout that goes with it.
ISP_API at::Tensor apply_memory_format(const at::Tensor& x, const SpeedSettings& speed);

// One training step: forward, backward and optimizer update, returning detached metrics on the device.
//
// Eager by default. With speed.cuda_graphs on a CUDA device the body runs eagerly for a few warm-up calls on a
// side stream (cuDNN picks its algorithms, optimizer state and autocast caches exist), is then captured once
// into a CUDA graph over static input tensors, and every later call copies the batch into those tensors and
// replays the graph: one launch instead of a thousand. A batch of another shape (the last, smaller batch of
// an epoch) runs eagerly. The body must therefore be capturable: no host reads (.item(), .cpu()), no tensors
// made from host data, random numbers only from the device generator, learning rates held in device tensors
// (FlatOptimizer). With speed.bf16 the body runs under bfloat16 autocast (CUDA or CPU).
class ISP_API TrainStep {
 public:
  using Body = std::function<at::Tensor(const Batch&)>;
  TrainStep(const RunContext& ctx, Body body);
  ~TrainStep();
  TrainStep(const TrainStep&) = delete;
  TrainStep& operator=(const TrainStep&) = delete;
  at::Tensor operator()(const Batch& b);
  bool captured() const;
  // Number of calls that ran eagerly before capture.
  static constexpr int kWarmupCalls = 3;

  struct Graph;  // CUDA only (accel_cuda.cpp)
 private:
  SpeedSettings speed_;
  c10::Device device_;
  Body body_;
  std::unique_ptr<Graph> graph_;
};

// Whether this build can capture CUDA graphs (LibTorch with CUDA).
ISP_API bool cuda_graphs_supported();
// Whether this CPU computes bfloat16 natively (AVX512-BF16 or AMX), which bf16 autocast on the CPU needs.
ISP_API bool cpu_has_native_bf16();

// Tells glibc's allocator to keep freed memory in the process instead of handing it back to the kernel after
// every large free. Training frees and reallocates the same activation-sized blocks every step; with glibc's
// defaults each of them is returned (trimmed) and faulted in again page by page: the quick classifier took 5.9
// million page faults and 10 s of system time in 61 s (docs/performance.md). Blocks of 32 MiB and more are
// still mapped and unmapped one by one. Call once at process start, before threads exist; returns false where
// the C library is not glibc, or ISP_GLIBC_MALLOC_DEFAULTS=1 (benchmarks' "before"): nothing changed.
ISP_API bool keep_freed_memory_in_process();

}  // namespace isp
