// Sampler "GumbelSigmoid": one Gumbel draw per element (docs/method.md §2.4, supplement Eq. 14-15).
//   g = -log(-log(U + 1e-20) + 1e-20),  U ~ U(0,1)
//   sample_logits(theta) = sigma((theta + g + offset) / temperature)          (gates, Eq. 15: b = 3, T = 0.4)
//   sample(p)            = sigma((log p + g) / temperature)                   (masks, Eq. 14; no offset)
//   deterministic_logits(theta) = 1[theta + offset >= 0]
// With `hard` the forward value is 1[v >= 0.5] and the backward pass is the relaxed gradient (hard_concrete).
// Note: P(v >= 0.5) = P(g >= -(theta + offset)) = 1 - exp(-exp(theta + offset)).
#include <ATen/ATen.h>

#include <memory>

#include "isp/interfaces/aem.h"
#include "isp/registry/plugin.h"

namespace {

struct GumbelSigmoidOptions {
  double temperature = 0.4;
  double offset = 3.0;
  bool hard = false;
  template <class V> void visit(V& v) {
    v("temperature", temperature, "temperature T (gates: 0.4; the supplement's masks: 1)", isp::greater_than(0.0));
    v("offset", offset,
      "constant b added to the logits in sample_logits and deterministic_logits (3 starts pruning from the "
      "whole network); not applied by sample(probs)");
    v("hard", hard, "straight-through: forward 1[v >= 0.5], backward the gradient of the relaxed v");
  }
};

class GumbelSigmoid : public isp::MaskSampler {
 public:
  explicit GumbelSigmoid(const GumbelSigmoidOptions& o) : opt_(o) {}

  at::Tensor sample_logits(const at::Tensor& logits) override {
    return finish(at::sigmoid((logits + gumbel(logits) + opt_.offset) / opt_.temperature));
  }

  at::Tensor sample(const at::Tensor& probs) override {
    // log(0) would give -inf and NaN gradients: clamp p at 1e-20 (the constant the Gumbel draw uses too).
    return finish(at::sigmoid((at::log(probs.clamp_min(1e-20)) + gumbel(probs)) / opt_.temperature));
  }

  at::Tensor deterministic_logits(const at::Tensor& logits) override {
    return (logits + opt_.offset).ge(0).to(logits.scalar_type());
  }

 private:
  static at::Tensor gumbel(const at::Tensor& like) {
    at::Tensor u = at::rand_like(like);
    return -at::log(-at::log(u + 1e-20) + 1e-20);
  }
  at::Tensor finish(const at::Tensor& v) const {
    if (!opt_.hard) return v;
    return v.ge(0.5).to(v.scalar_type()) + (v - v.detach());
  }
  GumbelSigmoidOptions opt_;
};

std::shared_ptr<isp::MaskSampler> make_gumbel_sigmoid(const GumbelSigmoidOptions& o, isp::BuildContext&) {
  return std::make_shared<GumbelSigmoid>(o);
}

}  // namespace

ISP_PLUGIN("0.1.0");
ISP_REGISTER(isp::MaskSampler, "GumbelSigmoid", 1, GumbelSigmoidOptions, make_gumbel_sigmoid,
             "single-Gumbel sigmoid relaxation sigma((theta + g + b)/T) (supplement Eq. 14-15); optional "
             "straight-through hard samples");
