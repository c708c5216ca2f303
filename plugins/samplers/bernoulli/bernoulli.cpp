// Sampler "Bernoulli": exact Bernoulli(p) samples in {0,1}. Without `straight_through` the sample carries no
// gradient; with it the forward value is the hard sample and the gradient is the identity to p
// (sample(p) = b + p - stopgrad(p)). sample_logits(theta) samples Bernoulli(sigmoid(theta)), the gradient
// (straight-through) flowing to sigmoid(theta).
#include <ATen/ATen.h>

#include <memory>

#include "isp/interfaces/aem.h"
#include "isp/registry/plugin.h"

namespace {

struct BernoulliOptions {
  bool straight_through = false;
  template <class V> void visit(V& v) {
    v("straight_through", straight_through,
      "forward the hard sample, backward the identity to p (otherwise the sample has no gradient)");
  }
};

class Bernoulli : public isp::MaskSampler {
 public:
  explicit Bernoulli(const BernoulliOptions& o) : opt_(o) {}

  at::Tensor sample_logits(const at::Tensor& logits) override { return sample(at::sigmoid(logits)); }

  at::Tensor sample(const at::Tensor& probs) override {
    at::Tensor b = at::rand_like(probs).lt(probs.detach()).to(probs.scalar_type());
    if (!opt_.straight_through) return b;
    return b + (probs - probs.detach());
  }

  bool differentiable() const override { return opt_.straight_through; }

 private:
  BernoulliOptions opt_;
};

std::shared_ptr<isp::MaskSampler> make_bernoulli(const BernoulliOptions& o, isp::BuildContext&) {
  return std::make_shared<Bernoulli>(o);
}

}  // namespace

ISP_PLUGIN("0.1.0");
ISP_REGISTER(isp::MaskSampler, "Bernoulli", 1, BernoulliOptions, make_bernoulli,
             "hard Bernoulli(p) samples; optional straight-through gradient (identity to p)");
