#pragma once
// Where a training step's time goes, per ATen operator and autograd node (docs/performance.md): self time
// (a node's time less that of the operators it calls), summed over every call while an OpProfile is alive.
// Built on LibTorch's RecordFunction callbacks, so it needs no profiler build and sees what perf cannot name
// (oneDNN's JIT kernels, Debian's stripped libtorch). The training loop profiles the steps after its warm-up
// when ISP_PROFILE_STEPS=N is set, and writes <stage>/op_profile.txt.
#include <memory>
#include <string>

#include "isp/registry/options.h"

namespace isp {

class ISP_API OpProfile {
 public:
  OpProfile();  // starts recording on every thread
  ~OpProfile();  // stops
  OpProfile(const OpProfile&) = delete;
  OpProfile& operator=(const OpProfile&) = delete;
  // The `top` operators by self time: calls, self ms per `per` (e.g. per step), share of the recorded time.
  std::string table(int top = 30, double per = 1.0) const;

  struct State;  // the totals, shared with the callbacks

 private:
  std::shared_ptr<State> state_;
  uint64_t handle_ = 0;
};

}  // namespace isp
