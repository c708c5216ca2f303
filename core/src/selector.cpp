// The AEM selector assembled from its parts (docs/method.md §2.3).
#include "isp/selector.h"

#include <torch/torch.h>

namespace isp {

SelectorNet::SelectorNet(std::shared_ptr<Backbone> enc, std::shared_ptr<FeatureFilter> f, std::shared_ptr<Decoder> d,
                         std::shared_ptr<MaskHead> h, std::shared_ptr<MaskSampler> s)
    : encoder(std::move(enc)), filter(std::move(f)), decoder(std::move(d)), head(std::move(h)), sampler(std::move(s)) {
  register_module("filter", filter);
  register_module("decoder", decoder);
  register_module("head", head);
}
SelectorNet::~SelectorNet() = default;

MaskDistribution SelectorNet::forward(const at::Tensor& x, const at::Tensor& labels, bool encoder_grad) {
  std::vector<at::Tensor> scales;
  {
    std::unique_ptr<torch::NoGradGuard> ng;
    if (!encoder_grad) ng = std::make_unique<torch::NoGradGuard>();
    scales = encoder->forward_features(x).scales;
  }
  return decode(std::move(scales), labels);
}

MaskDistribution SelectorNet::decode(std::vector<at::Tensor> scales, const at::Tensor& labels) {
  scales.back() = filter->forward(scales.back(), labels);
  return head->forward(decoder->forward(scales));
}

}  // namespace isp
