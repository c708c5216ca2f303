#pragma once
// FLOPs and parameter counting (docs/method.md §1e, §3.3, §8) from the layer list a backbone declares, and the
// channel surgery that turns a gated network into a physically smaller one (docs/method.md §1e).
#include <memory>
#include <string>
#include <vector>

#include <ATen/core/Tensor.h>

#include "isp/interfaces/backbone.h"

namespace isp {


// FLOPs convention (the official print_model_param_flops, multiply_adds=False, which only sees nn modules):
// conv k*k*(Cin/g)*Cout*Hout*Wout (+Cout*Hout*Wout with bias), linear in*out (+out), BN 2*numel(out),
// ReLU module numel(out), pooling module numel(in); ops the official models run inline (FunctionalRelu,
// FunctionalAvgPool, residual Add) count 0. This reproduces 0.12709 GFLOPs (ResNet-56) and 0.31288
// GFLOPs (MobileNetV2-CIFAR) exactly. Params: weights + biases (+ BN affine 2*C; running stats excluded).
struct LayerCostBreakdown {
  std::string name, op;  // op: to_string(LayerOp)
  double flops = 0, params = 0;
};

struct CostSummary {
  double flops = 0, params = 0;
  std::vector<LayerCostBreakdown> layers;
};

class ISP_API CostModel {
 public:
  explicit CostModel(std::vector<LayerShape> layers, std::vector<GatedLayer> gated);
  ~CostModel();
  CostModel(const CostModel& o);  // copies the layer list; coefficient caches are rebuilt on use
  CostModel& operator=(const CostModel&) = delete;
  // Exact counts when gated layer l keeps widths[l] channels (empty = full widths).
  CostSummary count(const std::vector<int64_t>& widths = {}) const;
  // Differentiable whole-network FLOPs: `kept` is [L] (float; kept channels per gated layer, e.g. the sum of
  // hard straight-through gates). Every layer whose cost depends on a gated layer's width is counted.
  at::Tensor flops(const at::Tensor& kept) const;
  double full_flops() const { return full_.flops; }
  double full_params() const { return full_.params; }
  // The official code's numerator (docs/method.md §3.3): ResNet conv1 of each block only, MobileNetV2 with the
  // quadratic depthwise term, over the sum of gated-block FLOPs. Returns the ratio r directly.
  at::Tensor official_flops_ratio(const at::Tensor& kept) const;
  const std::vector<LayerShape>& layers() const { return layers_; }
  const std::vector<GatedLayer>& gated() const { return gated_; }
  // Kept channels per gated layer from a gate vector [sum widths].
  at::Tensor kept_per_layer(const at::Tensor& gates) const;

 private:
  std::vector<LayerShape> layers_;
  std::vector<GatedLayer> gated_;
  CostSummary full_;
  struct QuadraticForm;
  mutable std::unique_ptr<QuadraticForm> flops_form_, official_form_;  // built on first use, per device
};

// Builds the smaller network: gated.with_widths(kept counts), every channel group sliced to the kept indices,
// everything else copied; device, dtype and train mode follow `gated`. `gates` is a {0,1} vector [sum widths];
// a layer with no kept channel keeps its single strongest gate index (never zero channels).
struct ExtractedNetwork {
  std::shared_ptr<Backbone> model;
  std::vector<std::vector<int64_t>> kept_indices;  // per gated layer
  json spec;                                       // model->structure(): the options (no "type") that rebuild it
};
ISP_API ExtractedNetwork extract_pruned(const Backbone& gated, const at::Tensor& gates);

// Same, given explicit kept indices (used to reload an export).
ISP_API void copy_pruned_weights(const Backbone& from, Backbone& to, const std::vector<std::vector<int64_t>>& kept);

}  // namespace isp
