// An out-of-tree mask head: one soft axis-aligned box per image instead of the built-in Gaussian (RBF).
// Registered as "mylab::SoftBoxHead" (the scope comes from isp_add_plugin(... SCOPE mylab)).
//
// The MaskHead contract (docs/writing-a-plugin.md): forward() receives the decoder's map [n, C, H, W] and
// returns per-pixel keep probabilities `probs` [n, 1, S, S] in [0, 1], S = the backbone's input size, plus
// optional per-image parameters: `params` (raw, what a parameter-distance term compares) and `readable`
// (interpretable). This head's are [n, 4]: centre row/column and half height/width in pixels. They are not
// RBF parameters, so predicts_rbf_parameters() stays false and pruning compares maps (RbfParamDistance "map").
#include <torch/torch.h>

#include "isp/interfaces/aem.h"
#include "isp/interfaces/backbone.h"
#include "isp/registry/plugin.h"

namespace {

struct SoftBoxHeadOptions {
  isp::NodeRef decoder, encoder;
  double edge = 1.5;  // softness of the box border in pixels
  template <class V> void visit(V& v) {
    v("decoder", decoder, "the decoder whose map the head reads (gives its channels)", isp::required(),
      isp::of_kind("decoder"));
    v("encoder", encoder, "the backbone (its input size is the side of the mask)", isp::required(),
      isp::of_kind("backbone"));
    v("edge", edge, "softness of the box border in pixels", isp::greater_than(0));
  }
};

class SoftBoxHead : public isp::MaskHead {
 public:
  SoftBoxHead(int64_t channels, int64_t side, double edge) : side_(side), edge_(edge) {
    fc = register_module("fc", torch::nn::Linear(channels, 4));
  }

  isp::MaskDistribution forward(const at::Tensor& features) override {
    const int64_t n = features.size(0);
    const double half = side_ / 2.0;
    at::Tensor u = fc->forward(features.mean({2, 3}));                     // [n, 4], pooled over the map
    at::Tensor centre = half + half * torch::tanh(u.narrow(1, 0, 2));       // inside the image
    at::Tensor size = 1.0 + (half - 1.0) * torch::sigmoid(u.narrow(1, 2, 2));  // half sides in [1, S/2]
    at::Tensor grid = torch::arange(side_, features.options()).add(0.5);
    auto inside = [&](int d) {  // [n, S]: how far each row (column) lies inside the box, squashed
      at::Tensor dist = (grid.view({1, -1}) - centre.select(1, d).view({n, 1})).abs();
      return torch::sigmoid((size.select(1, d).view({n, 1}) - dist) / edge_);
    };
    isp::MaskDistribution out;
    out.probs = (inside(0).view({n, 1, side_, 1}) * inside(1).view({n, 1, 1, side_}));
    out.params = u;
    out.readable = torch::cat({centre, size}, 1);
    return out;
  }

  torch::nn::Linear fc{nullptr};

 private:
  int64_t side_;
  double edge_;
};

std::shared_ptr<isp::MaskHead> make_soft_box(const SoftBoxHeadOptions& o, isp::BuildContext& ctx) {
  auto decoder = ctx.get<isp::Decoder>(o.decoder);
  auto encoder = ctx.get<isp::Backbone>(o.encoder);
  return std::make_shared<SoftBoxHead>(decoder->out_channels(), encoder->input_size(), o.edge);
}

}  // namespace

ISP_PLUGIN("1.0.0");
ISP_REGISTER(isp::MaskHead, "SoftBoxHead", 1, SoftBoxHeadOptions, make_soft_box,
             "one soft axis-aligned box per image (centre and half sides from the pooled decoder map)");
