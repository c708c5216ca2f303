#pragma once
// kind "pruner": decides which channels of each gated layer survive.
// Learned pruners (free logits, GRU hypernetwork) emit Gumbel-sigmoid gates during the pruning stage;
// one-shot pruners (L1-norm, random) compute the architecture directly in attach().
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
  // Training-time soft gates [sum widths] (noisy); learned pruners only.
  virtual at::Tensor soft_gates();
  // Hard straight-through sample [sum widths] (values {0,1}, gradient of the soft gate); learned pruners only.
  virtual at::Tensor hard_gates();
  // The final architecture: {0,1} per channel, deterministic (no noise), at least one channel per layer.
  virtual at::Tensor final_gates() = 0;
};

}  // namespace isp
