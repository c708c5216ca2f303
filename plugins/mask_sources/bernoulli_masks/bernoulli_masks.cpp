// Mask source "BernoulliMasks": REAL-X style masks (docs/method.md §1b, §2.5): every pixel independently
// RelaxedBernoulli(temperature, probs = p) (default 0.1, 0.5), or a hard Bernoulli(p) sample when
// `relaxed` is false. No gradient; drawn on the requested device.
#include <ATen/ATen.h>
#include <torch/utils.h>

#include <algorithm>
#include <cmath>
#include <memory>

#include "isp/interfaces/aem.h"
#include "isp/registry/plugin.h"

namespace {

constexpr double kFloatEps = 1.1920928955078125e-07;  // torch.finfo(torch.float32).eps

struct BernoulliMasksOptions {
  double p = 0.5;
  double temperature = 0.1;
  bool relaxed = true;
  template <class V> void visit(V& v) {
    v("p", p, "keep probability of every pixel", isp::between(0.0, 1.0));
    v("temperature", temperature, "RelaxedBernoulli temperature (relaxed masks only)", isp::greater_than(0.0));
    v("relaxed", relaxed, "RelaxedBernoulli samples (REAL-X); false: hard Bernoulli samples in {0,1}");
  }
};

class BernoulliMasks : public isp::MaskSource {
 public:
  explicit BernoulliMasks(const BernoulliMasksOptions& o) : opt_(o) {}

  at::Tensor sample(int64_t n, int64_t height, int64_t width, const at::TensorOptions& options) override {
    torch::NoGradGuard ng;
    at::TensorOptions o = options.requires_grad(false);
    if (!o.has_dtype() || !at::isFloatingType(o.dtype().toScalarType())) o = o.dtype(at::kFloat);
    at::Tensor u = at::rand({n, 1, height, width}, o);
    if (!opt_.relaxed) return u.lt(opt_.p).to(o.dtype());
    const double pc = std::min(std::max(opt_.p, kFloatEps), 1.0 - kFloatEps);
    const double logit = std::log(pc) - std::log1p(-pc);
    u.clamp_(kFloatEps, 1.0 - kFloatEps);
    return at::sigmoid((at::log(u) - at::log1p(-u) + logit) / opt_.temperature);
  }

 private:
  BernoulliMasksOptions opt_;
};

std::shared_ptr<isp::MaskSource> make_bernoulli_masks(const BernoulliMasksOptions& o, isp::BuildContext&) {
  return std::make_shared<BernoulliMasks>(o);
}

}  // namespace

ISP_PLUGIN("0.1.0");
ISP_REGISTER(isp::MaskSource, "BernoulliMasks", 1, BernoulliMasksOptions, make_bernoulli_masks,
             "i.i.d. per-pixel RelaxedBernoulli(T, p) (REAL-X) or hard Bernoulli(p) masks");
