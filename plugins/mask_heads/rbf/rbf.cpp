// Mask head "RbfMaskHead" (docs/method.md §2.3): a spatially-full convolution Conv2d(C -> 3, kernel K, no padding,
// bias) on the K x K decoder map gives u = (u_row, u_col, u_sigma) per image; bias[2] starts at initial_sigma.
//   c_row = a*tanh(u_0/a) + b,  c_col = a*tanh(u_1/a) + b,  b = S/2, a = S/2 - margin  (32: 14, 16)
//   sigma = softplus(u_2) + 1e-8
// and the map on the S x S integer grid (i = row, j = column), D_ij = (i - c_row)^2 + (j - c_col)^2:
//   quirk (official): g = exp(-D/(2 sigma^2)) / (2 pi sigma^2),  P = g / (stopgrad(max g) + 1e-8)
//                     (forward ~ normalised Gaussian; dP/dsigma = P (D/sigma^3 - 2/sigma))
//   no quirk:         P = exp(-(D - D_min)/(2 sigma^2))   (exact max 1, gradient of the normalised map)
// Whole batch in one vectorised computation; no host synchronisation.
#include <torch/torch.h>

#include <cmath>
#include <memory>
#include <string>

#include "isp/interfaces/aem.h"
#include "isp/interfaces/backbone.h"
#include "isp/registry/plugin.h"

namespace {

struct RbfMaskHeadOptions {
  isp::NodeRef decoder, encoder;
  double initial_sigma = -1.0;
  bool sigma_gradient_quirk = true;
  int64_t kernel_size = -1;
  double center_margin = -1.0;
  template <class V> void visit(V& v) {
    v("decoder", decoder, "the decoder whose map the head reads (gives its channels)", isp::required(),
      isp::of_kind("decoder"));
    v("encoder", encoder, "the backbone (its input_size() S is the side of the mask grid)", isp::required(),
      isp::of_kind("backbone"));
    v("initial_sigma", initial_sigma,
      "initial bias of the sigma channel (softplus(bias) = initial width); -1 = S*10/32 (10 for 32x32)");
    v("sigma_gradient_quirk", sigma_gradient_quirk,
      "official backward: keep the 1/(2 pi sigma^2) prefactor and divide by the detached max + 1e-8 "
      "(docs/method.md §2.3); false = exact normalisation exp(-(D - D_min)/(2 sigma^2))");
    v("kernel_size", kernel_size,
      "side of the decoder map = kernel of the head convolution; -1 = S (CIFAR; ImageNet uses 56 on 224)");
    v("center_margin", center_margin,
      "centres lie in (margin, S - margin): a = S/2 - margin; -1 = 2 (4 when S >= 224, the official ImageNet "
      "108*tanh(u/108)+112)");
  }
};

class RbfMaskHead : public isp::MaskHead {
 public:
  RbfMaskHead(int64_t channels, int64_t grid, const RbfMaskHeadOptions& o)
      : grid_(grid), kernel_(o.kernel_size > 0 ? o.kernel_size : grid), quirk_(o.sigma_gradient_quirk) {
    const double margin = o.center_margin >= 0 ? o.center_margin : (grid >= 224 ? 4.0 : 2.0);
    b_ = grid / 2.0;
    a_ = grid / 2.0 - margin;
    if (a_ <= 0) throw isp::Error("RbfMaskHead: center_margin leaves no room for the centre");
    conv = register_module("conv", torch::nn::Conv2d(torch::nn::Conv2dOptions(channels, 3, kernel_).bias(true)));
    const double sigma0 = o.initial_sigma >= 0 ? o.initial_sigma : grid * 10.0 / 32.0;
    torch::NoGradGuard ng;
    conv->bias[2].fill_(sigma0);
  }

  isp::MaskDistribution forward(const at::Tensor& features) override {
    if (features.dim() != 4 || features.size(2) != kernel_ || features.size(3) != kernel_)
      throw isp::Error("RbfMaskHead: expected a decoder map [n,C," + std::to_string(kernel_) + "," +
                       std::to_string(kernel_) + "], got a " + std::to_string(features.dim()) + "-d tensor" +
                       (features.dim() == 4 ? " of " + std::to_string(features.size(2)) + "x" +
                                                  std::to_string(features.size(3))
                                            : std::string()));
    const int64_t n = features.size(0);
    at::Tensor u = conv->forward(features).flatten(1);  // [n,3]
    at::Tensor c_row = a_ * at::tanh(u.select(1, 0) / a_) + b_;
    at::Tensor c_col = a_ * at::tanh(u.select(1, 1) / a_) + b_;
    at::Tensor sigma = at::softplus(u.select(1, 2)) + 1e-8;
    const auto opts = features.options().requires_grad(false);
    at::Tensor i = at::arange(grid_, opts).view({1, 1, grid_, 1});
    at::Tensor j = at::arange(grid_, opts).view({1, 1, 1, grid_});
    at::Tensor s = sigma.view({n, 1, 1, 1});
    at::Tensor d = (i - c_row.view({n, 1, 1, 1})).pow(2) + (j - c_col.view({n, 1, 1, 1})).pow(2);
    at::Tensor two_s2 = 2.0 * s * s;
    at::Tensor probs;
    if (quirk_) {
      at::Tensor g = at::exp(-d / two_s2) / (M_PI * two_s2);
      at::Tensor gmax = std::get<0>(g.detach().view({n, -1}).max(1)).view({n, 1, 1, 1});
      probs = g / (gmax + 1e-8);
    } else {
      at::Tensor dmin = std::get<0>(d.view({n, -1}).min(1)).view({n, 1, 1, 1});
      probs = at::exp(-(d - dmin) / two_s2);
    }
    isp::MaskDistribution out;
    out.probs = probs;
    out.params = u;
    out.readable = at::stack({c_row, c_col, sigma}, 1);
    return out;
  }

  bool predicts_rbf_parameters() const override { return true; }

  torch::nn::Conv2d conv{nullptr};

 private:
  int64_t grid_, kernel_;
  bool quirk_;
  double a_ = 14, b_ = 16;
};

std::shared_ptr<isp::MaskHead> make_rbf(const RbfMaskHeadOptions& o, isp::BuildContext& ctx) {
  auto dec = ctx.get<isp::Decoder>(o.decoder);
  auto enc = ctx.get<isp::Backbone>(o.encoder);
  return std::make_shared<RbfMaskHead>(dec->out_channels(), enc->input_size(), o);
}

}  // namespace

ISP_PLUGIN("0.1.0");
ISP_REGISTER(isp::MaskHead, "RbfMaskHead", 1, RbfMaskHeadOptions, make_rbf,
             "one isotropic Gaussian (RBF) keep-probability map per image: centre a*tanh(u/a)+S/2, width "
             "softplus(u)");
