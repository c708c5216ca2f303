#pragma once
// Optimizers over flat buffers (SGD as torch.optim.SGD, Adam and AdamW as torch.optim.Adam/AdamW).
//
// Why not torch::optim: its C++ optimizers loop over every parameter tensor (hundreds of small kernels per step
// for a ResNet-56), keep the step count and learning rate on the host (a captured CUDA graph would freeze
// them at their capture-time values), and zero gradients by dropping them. Here every parameter and its
// gradient become views into one contiguous buffer each, so an update is a dozen kernels whatever the number
// of tensors; the learning rate and Adam's step count are device tensors, so a step can be captured once and
// replayed; and the state is a few named tensors for checkpoints.
//
// The arithmetic is torch.optim's: coupled weight decay (g + wd·p) for SGD and Adam, decoupled
// (p·(1 − lr·wd)) for AdamW; momentum buffer initialised with the first gradient (dampening 0); Adam's bias
// corrections 1 − βᵗ. One difference: torch.optim skips a parameter whose gradient is None in a step, here
// every gradient is defined (zero when unused), so such a parameter still decays.
#include <memory>
#include <string>
#include <utility>
#include <vector>

#include <ATen/core/Tensor.h>

#include "isp/registry/api.h"

namespace isp {

namespace dist { class GradientBuckets; }

class ISP_API FlatOptimizer {
 public:
  virtual ~FlatOptimizer();
  FlatOptimizer(const FlatOptimizer&) = delete;
  FlatOptimizer& operator=(const FlatOptimizer&) = delete;

  void zero_grad();        // one kernel; gradients stay views into the flat buffer
  virtual void step() = 0;
  void set_lr(double lr);  // a device write, no host synchronisation
  double lr() const { return lr_value_; }
  // After something replaced the parameters' storage (Module::load, set_data): copies their values back into
  // the flat buffer and makes them views again. Cheap when nothing changed.
  void relink();
  int64_t numel() const { return flat_param_.numel(); }
  // Data-parallel runs (isp/distributed.h): the gradient buckets of this optimizer (nullptr in one process).
  const dist::GradientBuckets* gradient_buckets() const { return buckets_.get(); }
  // The optimizer's state, by name (momentum buffers, Adam moments, step, lr): what a checkpoint saves.
  std::vector<std::pair<std::string, at::Tensor>> state() const;
  // Copies saved state in place (throws isp::Error naming the entry when shapes differ).
  void load_state(const std::vector<std::pair<std::string, at::Tensor>>& saved);

 protected:
  FlatOptimizer(std::vector<at::Tensor> params, double lr);
  void add_state(const std::string& name, at::Tensor t) { state_.emplace_back(name, std::move(t)); }
  // In a data-parallel run: waits for the gradient allreduces (started during backward) and averages; every
  // step() begins with it. Nothing in one process.
  void sync_gradients();
  std::vector<at::Tensor> params_;
  std::vector<int64_t> offsets_;
  std::vector<std::vector<int64_t>> strides_;
  at::Tensor flat_param_, flat_grad_;
  at::Tensor lr_;  // 0-dim, double, on the parameters' device
  double lr_value_;

 private:
  std::vector<std::pair<std::string, at::Tensor>> state_;
  std::unique_ptr<dist::GradientBuckets> buckets_;
};

struct FlatSgdOptions {
  double lr = 0.1, momentum = 0.9, weight_decay = 0.0;
  bool nesterov = false;
};
class ISP_API FlatSgd : public FlatOptimizer {
 public:
  FlatSgd(std::vector<at::Tensor> params, const FlatSgdOptions& o);
  void step() override;
 private:
  FlatSgdOptions o_;
  at::Tensor momentum_;
};

struct FlatAdamOptions {
  double lr = 1e-3, beta1 = 0.9, beta2 = 0.999, eps = 1e-8, weight_decay = 0.0;
  bool decoupled_weight_decay = false;  // true = AdamW
};
class ISP_API FlatAdam : public FlatOptimizer {
 public:
  FlatAdam(std::vector<at::Tensor> params, const FlatAdamOptions& o);
  void step() override;
 private:
  FlatAdamOptions o_;
  at::Tensor exp_avg_, exp_avg_sq_, step_;
};

}  // namespace isp
