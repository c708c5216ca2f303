#pragma once
// Interfaces of the amortized explanation model (docs/method.md §1b, §1c, §2.3, §2.5, §3.1, §3.2):
// kinds "sampler", "mask_source", "feature_filter", "decoder", "mask_head".
#include <string>
#include <vector>

#include <torch/nn/module.h>

#include "isp/registry/options.h"

namespace isp {

// kind "sampler": Bernoulli-like samples, differentiable where the variant allows. Noise is drawn on the
// tensor's own device (never on the host).
class ISP_API MaskSampler {
 public:
  static constexpr const char* kKind = "sampler";
  virtual ~MaskSampler();
  // Sample given logits (gates: sigma((theta + g + b) / T)).
  virtual at::Tensor sample_logits(const at::Tensor& logits) = 0;
  // Sample given probabilities in [0,1] (masks). Default: sample_logits(logit(clamp(p, eps, 1-eps))).
  virtual at::Tensor sample(const at::Tensor& probs);
  // Noise-free decision (evaluation, final architectures): 1[logits >= 0] by default.
  virtual at::Tensor deterministic_logits(const at::Tensor& logits);
  // Whether a sample carries a gradient back to its logits/probabilities (relaxed or straight-through
  // samples). A stage that learns through the samples (TrainSelector) refuses a sampler that returns false,
  // when it is built.
  virtual bool differentiable() const { return true; }
};

// kind "mask_source": random masks that hide parts of the input while the predictor trains.
class ISP_API MaskSource {
 public:
  static constexpr const char* kKind = "mask_source";
  virtual ~MaskSource();
  // Masks [n, 1, height, width] with values in [0,1], drawn on `options.device()`.
  virtual at::Tensor sample(int64_t n, int64_t height, int64_t width, const at::TensorOptions& options) = 0;
};

// kind "feature_filter": class-conditioned attenuation of the deepest encoder features (Z = X * sigma(X^T C_y)).
class ISP_API FeatureFilter : public torch::nn::Module {
 public:
  static constexpr const char* kKind = "feature_filter";
  ~FeatureFilter() override;
  virtual at::Tensor forward(const at::Tensor& features, const at::Tensor& labels) = 0;
};

// kind "decoder": encoder scales (finest first, the deepest already filtered) -> a full-resolution feature map.
class ISP_API Decoder : public torch::nn::Module {
 public:
  static constexpr const char* kKind = "decoder";
  ~Decoder() override;
  virtual at::Tensor forward(const std::vector<at::Tensor>& scales) = 0;
  virtual int64_t out_channels() const = 0;
};

struct MaskDistribution {
  at::Tensor probs;     // [n, 1, H, W] per-pixel keep probabilities P
  at::Tensor params;    // [n, k] raw head outputs (RBF: u_z, u_t, u_sigma); undefined for pixel heads
  at::Tensor readable;  // [n, k] interpretable parameters (RBF: c_row, c_col, sigma); may be undefined
};

// kind "mask_head": decoder features -> a mask distribution.
class ISP_API MaskHead : public torch::nn::Module {
 public:
  static constexpr const char* kKind = "mask_head";
  ~MaskHead() override;
  virtual MaskDistribution forward(const at::Tensor& features) = 0;
  // Whether forward() fills MaskDistribution::params and ::readable with RBF parameters (u; c_row, c_col,
  // sigma). Pixel heads only give probs.
  virtual bool predicts_rbf_parameters() const { return false; }
};

}  // namespace isp
