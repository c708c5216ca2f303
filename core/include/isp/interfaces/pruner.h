#pragma once
// kind "pruner": decides which channels of each gated layer survive.
// Learned pruners (free logits, GRU hypernetwork) emit Gumbel-sigmoid gates during the pruning stage;
// one-shot pruners (L1-norm, random) compute the architecture directly in attach().
#include <optional>
#include <vector>

#include <torch/nn/module.h>

#include "isp/interfaces/backbone.h"

namespace isp {

class CostModel;

class ISP_API Pruner : public torch::nn::Module {
 public:
  static constexpr const char* kKind = "pruner";
  ~Pruner() override;
  // Called once with the network to prune and its cost model, before any gate is requested.
  virtual void attach(Backbone& model, const CostModel& cost) = 0;
  virtual bool learns_gates() const = 0;
  // One-shot pruners that aim at a whole-network FLOPs ratio say which (PruneChannels reports whether the
  // architecture met it); learned pruners get their budget from a FLOPs-budget regularizer.
  virtual std::optional<double> flops_target() const { return std::nullopt; }
  // Training-time soft gates [sum widths] (noisy); learned pruners only.
  virtual at::Tensor soft_gates();
  // Hard straight-through sample [sum widths] (values {0,1}, gradient of the soft gate); learned pruners only.
  virtual at::Tensor hard_gates();
  // The final architecture: {0,1} per channel, deterministic (no noise), at least one channel per layer.
  // For learned pruners this is keep_scores() >= 0 (with each layer's best channel forced on).
  virtual at::Tensor final_gates() = 0;
  // Learned pruners: a score per channel [sum widths] such that the final rule keeps a channel iff its score
  // is >= 0, and a higher score means "keep first". Required of learned pruners (PruneChannels reads it every step). PruneChannels ranks channels by it to project the
  // architecture onto a FLOPs budget. Differentiable or not; callers detach. Undefined: not supported.
  virtual at::Tensor keep_scores() { return at::Tensor(); }
  // Learned pruners: the probability that each channel is kept under the training noise [sum widths]; its
  // per-layer sums give the expected widths of the noisy gates. Undefined: not supported.
  virtual at::Tensor keep_probabilities() { return at::Tensor(); }
};

}  // namespace isp
