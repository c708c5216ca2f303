#pragma once
// kind "backbone": a classifier trunk that exposes multi-scale features and per-channel gate slots.
#include <string>
#include <vector>

#include <torch/nn/module.h>

#include "isp/options.h"

namespace isp {

// One gated layer: a per-channel multiplier after an activation (isp-spec §3.4). Fixed to 1 until pruning.
struct GatedLayer {
  std::string name;
  int64_t width = 0;
};

struct BackboneFeatures {
  std::vector<at::Tensor> scales;  // finest first, e.g. ResNet-56: 16@32x32, 32@16x16, 64@8x8
  at::Tensor logits;
};

class ISP_API Backbone : public torch::nn::Module {
 public:
  static constexpr const char* kKind = "backbone";
  ~Backbone() override;
  virtual at::Tensor forward(const at::Tensor& x) = 0;
  virtual BackboneFeatures forward_features(const at::Tensor& x) = 0;
  virtual std::vector<int64_t> feature_channels() const = 0;
  virtual std::vector<GatedLayer> gated_layers() const = 0;
  // gates: [sum of widths] (shared by the batch) or [N, sum of widths]; an undefined tensor restores all-ones.
  virtual void set_gates(const at::Tensor& gates) = 0;
  virtual int64_t num_classes() const = 0;
  virtual int64_t input_size() const = 0;
  // Width configuration that rebuilds this exact architecture (after pruning: the kept widths).
  virtual json structure() const = 0;
  int64_t total_gate_width() const;
};

}  // namespace isp
