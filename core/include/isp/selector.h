#pragma once
// The AEM selector (docs/method.md §2.3): encoder (the classifier backbone; frozen while the selector trains, gated
// while pruning) -> feature filter on the deepest scale -> U-Net decoder -> mask head.
#include <memory>

#include "isp/interfaces/aem.h"
#include "isp/interfaces/backbone.h"

namespace isp {

class ISP_API SelectorNet : public torch::nn::Module {
 public:
  SelectorNet(std::shared_ptr<Backbone> encoder, std::shared_ptr<FeatureFilter> filter,
              std::shared_ptr<Decoder> decoder, std::shared_ptr<MaskHead> head, std::shared_ptr<MaskSampler> sampler);
  ~SelectorNet() override;
  // labels: the class that conditions the feature filter (ground truth in training; predicted optionally).
  // When `encoder_grad` is false the encoder runs under NoGradGuard (selector training).
  MaskDistribution forward(const at::Tensor& x, const at::Tensor& labels, bool encoder_grad = false);
  // The part after the encoder: filter the deepest scale, decode, predict the mask (pruning runs the encoder
  // itself, gated, and decodes its features).
  MaskDistribution decode(std::vector<at::Tensor> scales, const at::Tensor& labels);
  // Trainable selector parameters: filter + decoder + head (the encoder is not a registered submodule).
  std::shared_ptr<Backbone> encoder;
  std::shared_ptr<FeatureFilter> filter;
  std::shared_ptr<Decoder> decoder;
  std::shared_ptr<MaskHead> head;
  std::shared_ptr<MaskSampler> sampler;  // used to draw masks from P (training, figures)
};

}  // namespace isp
