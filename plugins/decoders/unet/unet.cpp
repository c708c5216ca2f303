// Decoder "UNetDecoder": the selector's U-Net decoder (docs/method.md §2.3). For encoder scales s_1..s_K (finest
// first), the up blocks run from the deepest: uplayerK(s_K, s_{K-1}), ..., uplayer2(., s_1).
// UpSampleBlock(in, out, pass): conv3x3(in -> 4*out, pad 1, no bias) -> BN -> ReLU -> PixelShuffle(2) -> ReLU
//   -> concat([upsampled, passthrough]) -> residual block(s):
//   conv3x3 -> BN -> ReLU -> conv3x3 -> BN, + shortcut (conv1x1, no bias -> BN when channels differ), -> ReLU.
// The first residual block maps out+pass -> out, further ones out -> out (identity shortcut).
// Default widths: each block outputs the channels of the skip it joins (ResNet: 64->32->16, MBV2: 1280->96->32).
#include <torch/torch.h>

#include <memory>
#include <string>
#include <vector>

#include "isp/interfaces/aem.h"
#include "isp/interfaces/backbone.h"
#include "isp/registry/plugin.h"

namespace {

struct UNetDecoderOptions {
  isp::NodeRef encoder;
  int64_t residual_blocks = 1;
  std::vector<int64_t> channels;
  template <class V> void visit(V& v) {
    v("encoder", encoder, "the backbone whose scales are decoded (gives the channels of every scale)",
      isp::required(), isp::of_kind("backbone"));
    v("residual_blocks", residual_blocks,
      "residual blocks after each concatenation (the official code: 1; the supplement says 3)", isp::at_least(1));
    v("channels", channels,
      "output channels of each up block, deepest first (one per scale but the deepest); empty = the channels "
      "of the skip each block joins");
  }
};

std::string shape_str(const at::Tensor& t) {
  std::string s = "[";
  for (int64_t d = 0; d < t.dim(); ++d) s += (d ? "," : "") + std::to_string(t.size(d));
  return s + "]";
}

class ResidualBlockImpl : public torch::nn::Module {
 public:
  ResidualBlockImpl(int64_t in, int64_t out) {
    conv1 = register_module("conv1", torch::nn::Conv2d(torch::nn::Conv2dOptions(in, out, 3).padding(1).bias(false)));
    bn1 = register_module("bn1", torch::nn::BatchNorm2d(out));
    conv2 = register_module("conv2", torch::nn::Conv2d(torch::nn::Conv2dOptions(out, out, 3).padding(1).bias(false)));
    bn2 = register_module("bn2", torch::nn::BatchNorm2d(out));
    if (in != out) {
      shortcut = register_module(
          "shortcut", torch::nn::Sequential(torch::nn::Conv2d(torch::nn::Conv2dOptions(in, out, 1).bias(false)),
                                            torch::nn::BatchNorm2d(out)));
    }
  }
  at::Tensor forward(const at::Tensor& x) {
    at::Tensor o = bn2->forward(conv2->forward(torch::relu(bn1->forward(conv1->forward(x)))));
    return torch::relu(o + (shortcut.is_empty() ? x : shortcut->forward(x)));
  }
  torch::nn::Conv2d conv1{nullptr}, conv2{nullptr};
  torch::nn::BatchNorm2d bn1{nullptr}, bn2{nullptr};
  torch::nn::Sequential shortcut{nullptr};
};
TORCH_MODULE(ResidualBlock);

class UpSampleBlockImpl : public torch::nn::Module {
 public:
  UpSampleBlockImpl(int64_t in, int64_t out, int64_t pass, int64_t n_blocks) : in_(in), out_(out), pass_(pass) {
    conv = register_module("conv", torch::nn::Conv2d(torch::nn::Conv2dOptions(in, 4 * out, 3).padding(1).bias(false)));
    bn = register_module("bn", torch::nn::BatchNorm2d(4 * out));
    blocks = register_module("blocks", torch::nn::ModuleList());
    for (int64_t b = 0; b < n_blocks; ++b) blocks->push_back(ResidualBlock(b == 0 ? out + pass : out, out));
  }
  at::Tensor forward(const at::Tensor& x, const at::Tensor& skip) {
    if (x.dim() != 4 || x.size(1) != in_ || skip.dim() != 4 || skip.size(1) != pass_)
      throw isp::Error("UNetDecoder: up block (" + std::to_string(in_) + " -> " + std::to_string(out_) + ", pass " +
                       std::to_string(pass_) + ") got input " + shape_str(x) + " and skip " + shape_str(skip));
    at::Tensor up = torch::relu(torch::pixel_shuffle(torch::relu(bn->forward(conv->forward(x))), 2));
    if (up.size(2) != skip.size(2) || up.size(3) != skip.size(3))
      throw isp::Error("UNetDecoder: the upsampled map " + shape_str(up) + " (2x of " + shape_str(x) +
                       ") does not match the spatial size of the skip connection " + shape_str(skip) +
                       "; every scale must be half the resolution of the next finer one");
    at::Tensor h = torch::cat({up, skip}, 1);
    for (const auto& b : *blocks) h = b->as<ResidualBlock>()->forward(h);
    return h;
  }
  torch::nn::Conv2d conv{nullptr};
  torch::nn::BatchNorm2d bn{nullptr};
  torch::nn::ModuleList blocks{nullptr};

 private:
  int64_t in_, out_, pass_;
};
TORCH_MODULE(UpSampleBlock);

class UNetDecoder : public isp::Decoder {
 public:
  UNetDecoder(const std::vector<int64_t>& scale_channels, const UNetDecoderOptions& o, const isp::Where& where)
      : num_scales_(static_cast<int64_t>(scale_channels.size())) {
    if (num_scales_ < 2) throw isp::RecipeError(where, "UNetDecoder needs an encoder with at least 2 scales");
    std::vector<int64_t> outs = o.channels;
    if (outs.empty()) {
      for (int64_t k = num_scales_ - 2; k >= 0; --k) outs.push_back(scale_channels[k]);
    }
    if (static_cast<int64_t>(outs.size()) != num_scales_ - 1)
      throw isp::RecipeError(where.child("channels"),
                             "expected " + std::to_string(num_scales_ - 1) + " widths (one per up block), got " +
                                 std::to_string(outs.size()));
    int64_t in = scale_channels.back();
    for (int64_t k = num_scales_ - 1, b = 0; k >= 1; --k, ++b) {
      if (outs[b] < 1) throw isp::RecipeError(where.child("channels"), "widths must be positive");
      // Named as the official code: uplayer3 joins scale 3 with scale 2, uplayer2 scale 2 with scale 1.
      ups_.push_back(register_module("uplayer" + std::to_string(k + 1),
                                     UpSampleBlock(in, outs[b], scale_channels[k - 1], o.residual_blocks)));
      in = outs[b];
    }
    out_channels_ = in;
  }

  at::Tensor forward(const std::vector<at::Tensor>& scales) override {
    if (static_cast<int64_t>(scales.size()) != num_scales_)
      throw isp::Error("UNetDecoder: expected " + std::to_string(num_scales_) + " encoder scales, got " +
                       std::to_string(scales.size()));
    at::Tensor h = scales.back();
    for (std::size_t b = 0; b < ups_.size(); ++b) h = ups_[b]->forward(h, scales[scales.size() - 2 - b]);
    return h;
  }

  int64_t out_channels() const override { return out_channels_; }

 private:
  int64_t num_scales_;
  int64_t out_channels_ = 0;
  std::vector<UpSampleBlock> ups_;
};

std::shared_ptr<isp::Decoder> make_unet(const UNetDecoderOptions& o, isp::BuildContext& ctx) {
  auto enc = ctx.get<isp::Backbone>(o.encoder);
  // o.encoder.where points at "<node>/encoder"; report errors against the node itself.
  isp::Where where = o.encoder.where;
  const auto slash = where.pointer.rfind('/');
  if (slash != std::string::npos) where.pointer = where.pointer.substr(0, slash);
  return std::make_shared<UNetDecoder>(enc->feature_channels(), o, where);
}

}  // namespace

ISP_PLUGIN("0.1.0");
ISP_REGISTER(isp::Decoder, "UNetDecoder", 1, UNetDecoderOptions, make_unet,
             "U-Net decoder: conv + PixelShuffle(2) up blocks joined with the encoder skips, residual blocks");
