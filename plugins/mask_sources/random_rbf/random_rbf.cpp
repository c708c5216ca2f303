// Mask source "RandomRbfMasks": the predictor's random masks (docs/method.md §1b, `calculate_rbf`).
// Per image: centre row, centre column ~ U(center_low, center_high), width sigma ~ U(sigma_low, sigma_high);
// probability map P_ij = N(i, j; centre, sigma) / max N on the integer grid (i = row, j = column), i.e.
// P = exp(-(D - D_min) / (2 sigma^2)) with D the squared distance to the centre (max P = 1); then a
// RelaxedBernoulli(temperature, probs = P) sample. No gradient; the whole batch in one vectorised computation on
// the requested device.
#include <ATen/ATen.h>
#include <torch/utils.h>

#include <memory>

#include "isp/interfaces/aem.h"
#include "isp/registry/plugin.h"

namespace {

constexpr double kFloatEps = 1.1920928955078125e-07;  // torch.finfo(torch.float32).eps

struct RandomRbfMasksOptions {
  double center_low = 2.0, center_high = 30.0;
  double sigma_low = 5.0, sigma_high = 11.0;
  double temperature = 0.1;
  bool return_probs = false;
  template <class V> void visit(V& v) {
    v("center_low", center_low, "lower bound of the uniform centre row/column (pixels; ImageNet: 4)");
    v("center_high", center_high, "upper bound of the uniform centre row/column (pixels; ImageNet: 220)");
    v("sigma_low", sigma_low, "lower bound of the uniform RBF width sigma (pixels; ImageNet: 80)",
      isp::greater_than(0.0));
    v("sigma_high", sigma_high, "upper bound of the uniform RBF width sigma (pixels; ImageNet: 100)",
      isp::greater_than(0.0));
    v("temperature", temperature, "RelaxedBernoulli temperature of the mask sample", isp::greater_than(0.0));
    v("return_probs", return_probs,
      "return the probability map P itself instead of a sample (diagnostics, figures)");
  }
};

class RandomRbfMasks : public isp::MaskSource {
 public:
  explicit RandomRbfMasks(const RandomRbfMasksOptions& o) : opt_(o) {
    if (o.center_high < o.center_low || o.sigma_high < o.sigma_low)
      throw isp::Error("RandomRbfMasks: center_high/sigma_high must not be below center_low/sigma_low");
  }

  at::Tensor sample(int64_t n, int64_t height, int64_t width, const at::TensorOptions& options) override {
    torch::NoGradGuard ng;
    at::TensorOptions o = options.requires_grad(false);
    if (!o.has_dtype() || !at::isFloatingType(o.dtype().toScalarType())) o = o.dtype(at::kFloat);
    at::Tensor u = at::rand({n, 3}, o);
    at::Tensor row = (u.select(1, 0) * (opt_.center_high - opt_.center_low) + opt_.center_low).view({n, 1, 1, 1});
    at::Tensor col = (u.select(1, 1) * (opt_.center_high - opt_.center_low) + opt_.center_low).view({n, 1, 1, 1});
    at::Tensor sigma = (u.select(1, 2) * (opt_.sigma_high - opt_.sigma_low) + opt_.sigma_low).view({n, 1, 1, 1});
    at::Tensor i = at::arange(height, o).view({1, 1, height, 1});
    at::Tensor j = at::arange(width, o).view({1, 1, 1, width});
    at::Tensor d = (i - row).pow(2) + (j - col).pow(2);  // [n,1,H,W]
    at::Tensor dmin = std::get<0>(d.view({n, -1}).min(1)).view({n, 1, 1, 1});
    at::Tensor p = at::exp(-(d - dmin) / (2.0 * sigma * sigma));
    if (opt_.return_probs) return p;
    at::Tensor pc = p.clamp(kFloatEps, 1.0 - kFloatEps);
    at::Tensor noise = at::rand_like(p).clamp_(kFloatEps, 1.0 - kFloatEps);
    return at::sigmoid((at::log(pc) - at::log1p(-pc) + at::log(noise) - at::log1p(-noise)) / opt_.temperature);
  }

 private:
  RandomRbfMasksOptions opt_;
};

std::shared_ptr<isp::MaskSource> make_random_rbf(const RandomRbfMasksOptions& o, isp::BuildContext&) {
  return std::make_shared<RandomRbfMasks>(o);
}

}  // namespace

ISP_PLUGIN("0.1.0");
ISP_REGISTER(isp::MaskSource, "RandomRbfMasks", 1, RandomRbfMasksOptions, make_random_rbf,
             "random RBF probability maps (uniform centre and width) sampled with a RelaxedBernoulli "
             "(the ISP predictor's masks)");
