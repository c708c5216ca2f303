// Mask head "RealXPixelHead" (docs/method.md §2.5, REAL-X comparison): conv1x1(C -> 2, no bias) giving (a, b) per
// pixel; P = |a| / (|a| + |b| + 1e-8). params and readable are undefined.
#include <torch/torch.h>

#include <memory>

#include "isp/interfaces/aem.h"
#include "isp/registry/plugin.h"

namespace {

struct RealXPixelHeadOptions {
  isp::NodeRef decoder;
  template <class V> void visit(V& v) {
    v("decoder", decoder, "the decoder whose map the head reads (gives its channels)", isp::required(),
      isp::of_kind("decoder"));
  }
};

class RealXPixelHead : public isp::MaskHead {
 public:
  explicit RealXPixelHead(int64_t channels) {
    conv = register_module("conv", torch::nn::Conv2d(torch::nn::Conv2dOptions(channels, 2, 1).bias(false)));
  }
  isp::MaskDistribution forward(const at::Tensor& features) override {
    at::Tensor ab = conv->forward(features).abs();
    at::Tensor a = ab.narrow(1, 0, 1), b = ab.narrow(1, 1, 1);
    isp::MaskDistribution out;
    out.probs = a / (a + b + 1e-8);
    return out;
  }
  torch::nn::Conv2d conv{nullptr};
};

std::shared_ptr<isp::MaskHead> make_realx(const RealXPixelHeadOptions& o, isp::BuildContext& ctx) {
  return std::make_shared<RealXPixelHead>(ctx.get<isp::Decoder>(o.decoder)->out_channels());
}

}  // namespace

ISP_PLUGIN("0.1.0");
ISP_REGISTER(isp::MaskHead, "RealXPixelHead", 1, RealXPixelHeadOptions, make_realx,
             "REAL-X per-pixel mask |a|/(|a|+|b|+1e-8) from a 1x1 convolution");
