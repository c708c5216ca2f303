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
  // float32 eps as torch.distributions.RelaxedBernoulli clamps (docs/method.md §3.2).
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

}  // namespace isp
