// Mask head "RbfMaskHead" (docs/method.md §2.3): a spatially-full convolution Conv2d(C -> 3, kernel K, no padding,
// bias) on the K x K decoder map gives u = (u_row, u_col, u_sigma) per image; bias[2] starts at initial_sigma.
//   c_row = a*tanh(u_0/a) + b,  c_col = a*tanh(u_1/a) + b,  b = S/2, a = S/2 - margin  (32: 14, 16)
//   sigma = softplus(u_2) + min_sigma + 1e-8   (min_sigma = 0 in the official head)
// and the map on the S x S integer grid (i = row, j = column), D_ij = (i - c_row)^2 + (j - c_col)^2:
//   quirk (official): g = exp(-D/(2 sigma^2)) / (2 pi sigma^2),  P = g / (stopgrad(max g) + 1e-8)
//                     (forward ~ normalised Gaussian; dP/dsigma = P (D/sigma^3 - 2/sigma))
//   no quirk:         P = exp(-(D - D_min)/(2 sigma^2))   (exact max 1, gradient of the normalised map)
// Option centre = "soft_argmax" (isp's, not the paper's): a 1x1 convolution scores every decoder cell, the centre is
// the softmax-weighted mean cell position, and only sigma comes from the full convolution.
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
  std::string centre = "regression";
  double min_sigma = 0.0;
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
    v("centre", centre,
      "how the centre is found: regression = the official spatially-full convolution (u_row, u_col) through "
      "a*tanh(u/a)+S/2; soft_argmax = a 1x1 convolution scores every decoder cell and the centre is the "
      "softmax-weighted mean cell position (image-specific by construction; isp's option, docs/method.md §9)",
      isp::one_of({"regression", "soft_argmax"}));
    v("min_sigma", min_sigma,
      "sigma = softplus(u) + min_sigma (+1e-8): a floor on the width in pixels, so a strong area term cannot shrink "
      "the mask to nothing (0 = the official head)", isp::at_least(0.0));
  }
};

class RbfMaskHead : public isp::MaskHead {
 public:
  RbfMaskHead(int64_t channels, int64_t grid, const RbfMaskHeadOptions& o)
      : grid_(grid), kernel_(o.kernel_size > 0 ? o.kernel_size : grid), quirk_(o.sigma_gradient_quirk),
        soft_argmax_(o.centre == "soft_argmax"), min_sigma_(o.min_sigma) {
    const double margin = o.center_margin >= 0 ? o.center_margin : (grid >= 224 ? 4.0 : 2.0);
    b_ = grid / 2.0;
    a_ = grid / 2.0 - margin;
    if (a_ <= 0) throw isp::OptionError("center_margin", "RbfMaskHead: center_margin leaves no room for the centre");
    conv = register_module("conv", torch::nn::Conv2d(torch::nn::Conv2dOptions(channels, 3, kernel_).bias(true)));
    if (soft_argmax_) {
      heat = register_module("heat", torch::nn::Conv2d(torch::nn::Conv2dOptions(channels, 1, 1).bias(false)));
      // Centre of decoder cell k on the S-pixel grid.
      cell_pos_ = (at::arange(kernel_, at::kFloat) + 0.5) * (static_cast<double>(grid_) / kernel_) - 0.5;
    }
    const double sigma0 = o.initial_sigma >= 0 ? o.initial_sigma : grid * 10.0 / 32.0;
    torch::NoGradGuard ng;
    conv->bias[2].fill_(sigma0);  // the bias of u_sigma (softplus(10) = 10.00005: the initial width, in pixels)
  }

  isp::MaskDistribution forward(const at::Tensor& features) override {
    if (features.dim() != 4 || features.size(2) != kernel_ || features.size(3) != kernel_)
      throw isp::Error("RbfMaskHead: expected a decoder map [n,C," + std::to_string(kernel_) + "," +
                       std::to_string(kernel_) + "], got a " + std::to_string(features.dim()) + "-d tensor" +
                       (features.dim() == 4 ? " of " + std::to_string(features.size(2)) + "x" +
                                                  std::to_string(features.size(3))
                                            : std::string()));
    const int64_t n = features.size(0);
    // The map and everything sampled from it are computed in fp32 even under bf16 autocast: bfloat16's 8-bit
    // mantissa turns probabilities near 0 and 1 into exact 0 and 1, whose logits are infinite (NaN gradients).
    at::Tensor u = conv->forward(features).flatten(1);  // [n,3]
    if (u.scalar_type() == at::kBFloat16 || u.scalar_type() == at::kHalf) u = u.to(at::kFloat);
    at::Tensor c_row, c_col;
    if (soft_argmax_) {
      // Softmax over the decoder cells; the centre is the expected cell position. u's first two entries become the
      // centre relative to the middle, so the pruning loss compares the same quantities as in regression mode.
      const at::Tensor w = at::softmax(heat->forward(features).flatten(1).to(at::kFloat), 1).view({n, kernel_, kernel_});
      const at::Tensor pos = cell_pos_.to(w.device());
      c_row = (w.sum(2) * pos).sum(1).to(u.scalar_type());
      c_col = (w.sum(1) * pos).sum(1).to(u.scalar_type());
      u = at::stack({c_row - b_, c_col - b_, u.select(1, 2)}, 1);
    } else {
      c_row = a_ * at::tanh(u.select(1, 0) / a_) + b_;
      c_col = a_ * at::tanh(u.select(1, 1) / a_) + b_;
    }
    at::Tensor sigma = at::softplus(u.select(1, 2)) + (min_sigma_ + 1e-8);
    const auto opts = u.options().requires_grad(false);
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
  torch::nn::Conv2d heat{nullptr};  // soft_argmax only: one score per decoder cell

 private:
  int64_t grid_, kernel_;
  bool quirk_, soft_argmax_;
  double min_sigma_;
  at::Tensor cell_pos_;
  double a_ = 14, b_ = 16;
};

std::shared_ptr<isp::MaskHead> make_rbf(const RbfMaskHeadOptions& o, isp::BuildContext& ctx) {
  auto dec = ctx.get<isp::Decoder>(o.decoder);
  auto enc = ctx.get<isp::Backbone>(o.encoder);
  return std::make_shared<RbfMaskHead>(dec->out_channels(), enc->input_size(), o);
}

}  // namespace

ISP_PLUGIN("0.2.0");
ISP_REGISTER(isp::MaskHead, "RbfMaskHead", 1, RbfMaskHeadOptions, make_rbf,
             "one isotropic Gaussian (RBF) keep-probability map per image: centre a*tanh(u/a)+S/2, width "
             "softplus(u)");
