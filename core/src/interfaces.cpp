// Key functions and default behaviour of the AEM / pruning interfaces, and the selector assembly.
#include <torch/nn/module.h>
#include <ATen/ATen.h>
#include <torch/utils.h>

#include "isp/interfaces/aem.h"
#include "isp/interfaces/pruner.h"
#include "isp/interfaces/regularizer.h"
#include "isp/selector.h"

namespace isp {

MaskSampler::~MaskSampler() = default;
MaskSource::~MaskSource() = default;
FeatureFilter::~FeatureFilter() = default;
Decoder::~Decoder() = default;
MaskHead::~MaskHead() = default;
Regularizer::~Regularizer() = default;
Pruner::~Pruner() = default;

at::Tensor MaskSampler::sample(const at::Tensor& probs) {
  // float32 eps as torch.distributions.RelaxedBernoulli clamps (isp-spec §3.2).
  constexpr double eps = 1.1920928955078125e-07;
  at::Tensor p = probs.clamp(eps, 1.0 - eps);
  return sample_logits(at::log(p) - at::log1p(-p));
}

at::Tensor MaskSampler::deterministic_logits(const at::Tensor& logits) { return logits.ge(0).to(logits.scalar_type()); }

at::Tensor Pruner::soft_gates() { throw Error("this pruner does not learn gates (soft_gates)"); }
at::Tensor Pruner::hard_gates() { throw Error("this pruner does not learn gates (hard_gates)"); }

const at::Tensor& require_input(const at::Tensor& t, const std::string& term, const std::string& what) {
  if (!t.defined()) throw Error("regularizer '" + term + "' needs " + what + ", which this stage does not provide");
  return t;
}

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
  scales.back() = filter->forward(scales.back(), labels);
  return head->forward(decoder->forward(scales));
}

void add_layer(std::vector<LayerShape>& layers, std::string name, std::string op, int64_t in_channels,
               int64_t out_channels, int64_t kernel, int64_t in_hw, int64_t out_hw, int in_gate, int out_gate,
               int64_t groups) {
  LayerShape l;
  l.name = std::move(name);
  l.op = std::move(op);
  l.in_channels = in_channels;
  l.out_channels = out_channels;
  l.kernel = kernel;
  l.groups = groups;
  l.in_h = l.in_w = in_hw;
  l.out_h = l.out_w = out_hw;
  l.in_gate = in_gate;
  l.out_gate = out_gate;
  layers.push_back(std::move(l));
}

void check_gate_shape(const at::Tensor& gates, const std::vector<int64_t>& widths, const std::string& who) {
  int64_t total = 0;
  for (int64_t w : widths) total += w;
  if ((gates.dim() == 1 && gates.size(0) == total) || (gates.dim() == 2 && gates.size(1) == total)) return;
  throw Error(who + "::set_gates: expected a gate tensor of shape [" + std::to_string(total) + "] or [N, " +
              std::to_string(total) + "], got " + c10::str(gates.sizes()));
}

}  // namespace isp
