// Sampler "RelaxedBernoulli": the binary Concrete relaxation as torch.distributions.RelaxedBernoulli.rsample
// computes it (docs/method.md §3.2):
//   s = sigma((logit + log U - log(1 - U)) / temperature),  U ~ U(0,1) clamped to (eps, 1 - eps),
// eps = float32 machine epsilon. sample(probs) (the base-class default) clamps p to (eps, 1 - eps) and uses
// logit = log p - log(1 - p), exactly as PyTorch does. With `hard` the forward value is 1[s >= 0.5] and the
// gradient is that of the relaxed sample (straight-through).
#include <ATen/ATen.h>

#include <memory>

#include "isp/interfaces/aem.h"
#include "isp/registry/plugin.h"

namespace {

constexpr double kFloatEps = 1.1920928955078125e-07;  // torch.finfo(torch.float32).eps

struct RelaxedBernoulliOptions {
  double temperature = 1.0;
  bool hard = false;
  template <class V> void visit(V& v) {
    v("temperature", temperature, "relaxation temperature tau (the selector uses 1; predictor masks 0.1)",
      isp::greater_than(0.0));
    v("hard", hard, "straight-through: forward 1[s >= 0.5], backward the gradient of the relaxed sample s");
  }
};

class RelaxedBernoulli : public isp::MaskSampler {
 public:
  explicit RelaxedBernoulli(const RelaxedBernoulliOptions& o) : opt_(o) {}

  at::Tensor sample_logits(const at::Tensor& logits) override {
    at::Tensor u = at::rand_like(logits).clamp_(kFloatEps, 1.0 - kFloatEps);
    at::Tensor s = at::sigmoid((logits + at::log(u) - at::log1p(-u)) / opt_.temperature);
    if (!opt_.hard) return s;
    return s.ge(0.5).to(s.scalar_type()) + (s - s.detach());
  }

 private:
  RelaxedBernoulliOptions opt_;
};

std::shared_ptr<isp::MaskSampler> make_relaxed_bernoulli(const RelaxedBernoulliOptions& o, isp::BuildContext&) {
  return std::make_shared<RelaxedBernoulli>(o);
}

}  // namespace

ISP_PLUGIN("0.1.0");
ISP_REGISTER(isp::MaskSampler, "RelaxedBernoulli", 1, RelaxedBernoulliOptions, make_relaxed_bernoulli,
             "binary Concrete sample sigma((logit + logistic noise)/T), as torch RelaxedBernoulli.rsample; "
             "optional straight-through hard samples");
