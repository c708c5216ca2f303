// "MobileNetV2": the ImageNet MobileNetV2 in torchvision's layout and names (width multiplier included), so
// `torch.save(torchvision.models.mobilenet_v2().state_dict())` loads by name (init_from).
//
// features.0: conv3x3/2 (in_channels -> 32·w) + BN + ReLU6; features.1-17: inverted residuals from the table
// (t, c, n, s) = (1,16,1,1) (6,24,2,2) (6,32,3,2) (6,64,4,2) (6,96,3,1) (6,160,3,2) (6,320,1,1) (expansion conv
// 1x1 + BN + ReLU6 unless t = 1, depthwise 3x3 + BN + ReLU6, projection 1x1 + BN; residual when stride 1 and
// in = out); features.18: conv1x1 (-> 1280·max(1, w)) + BN + ReLU6; global average pool; dropout; classifier.1.
// Channel counts are rounded to multiples of 8 as torchvision's _make_divisible does. One gate per expansion
// block on its hidden channels, after both hidden ReLU6s (the same vector twice, as the official ImageNet code;
// the t = 1 block has none). Encoder scales: the outputs of features.3, .6, .13 and .18 (24/32/96/1280 channels
// at strides 4/8/16/32), the official ImageNet selector's.
#include <torch/torch.h>

#include <algorithm>
#include <functional>
#include <memory>
#include <string>
#include <vector>

#include "isp/interfaces/backbone.h"
#include "isp/registry/plugin.h"

namespace {

struct MobileNetV2Options {
  int64_t num_classes = 1000;
  int64_t in_channels = 3;
  int64_t input_size = 224;
  double width_mult = 1.0;
  double dropout = 0.2;
  std::vector<int64_t> widths;

  template <class V> void visit(V& v) {
    v("num_classes", num_classes, "number of output classes", isp::at_least(2));
    v("in_channels", in_channels, "input image channels", isp::at_least(1));
    v("input_size", input_size, "input height = width in pixels (a multiple of 32)", isp::at_least(32));
    v("width_mult", width_mult, "torchvision's width multiplier (channels rounded to multiples of 8)",
      isp::between(0.1, 4.0));
    v("dropout", dropout, "dropout before the classifier in training (torchvision: 0.2)", isp::between(0.0, 0.99));
    v("widths", widths,
      "hidden (gated) width of each of the 16 expansion blocks in forward order; empty = full widths. Used to "
      "rebuild a pruned network");
  }
};

struct StageCfg {
  int64_t expansion, channels, blocks, stride;
};
constexpr StageCfg kStages[] = {{1, 16, 1, 1}, {6, 24, 2, 2},  {6, 32, 3, 2}, {6, 64, 4, 2},
                                {6, 96, 3, 1}, {6, 160, 3, 2}, {6, 320, 1, 1}};
constexpr int64_t kGatedBlocks = 16;
// features.<i> whose output is an encoder scale (1-based feature index; 18 is the last 1x1 conv).
constexpr int kScaleFeatures[] = {3, 6, 13, 18};

// torchvision's _make_divisible(v, 8): the nearest multiple of 8, never more than 10 % below v.
int64_t divisible(double v) {
  int64_t n = std::max<int64_t>(8, static_cast<int64_t>(v + 4) / 8 * 8);
  if (n < 0.9 * v) n += 8;
  return n;
}

using GateFn = std::function<at::Tensor(const at::Tensor&)>;

torch::nn::Conv2d conv(int64_t in, int64_t out, int64_t k, int64_t stride, int64_t groups = 1) {
  return torch::nn::Conv2d(
      torch::nn::Conv2dOptions(in, out, k).stride(stride).padding(k / 2).groups(groups).bias(false));
}
at::Tensor clip6(const at::Tensor& x) { return at::hardtanh(x, 0.0, 6.0); }  // ReLU6

// Conv + BN as torchvision's Conv2dNormActivation: a Sequential whose children "0" and "1" name the tensors.
struct ConvBn {
  torch::nn::Sequential seq{nullptr};
  torch::nn::Conv2d c{nullptr};
  torch::nn::BatchNorm2d bn{nullptr};
  isp::ConvBatchNorm fused;
  ConvBn() = default;
  ConvBn(int64_t in, int64_t out, int64_t k, int64_t stride, int64_t groups = 1)
      : seq(torch::nn::Sequential()), c(conv(in, out, k, stride, groups)), bn(torch::nn::BatchNorm2d(out)) {
    seq->push_back(c);
    seq->push_back(bn);
  }
  at::Tensor operator()(const at::Tensor& x) { return fused(*c, *bn, x); }
};

class InvertedResidualImpl : public torch::nn::Module {
 public:
  InvertedResidualImpl(int64_t in, int64_t out, int64_t hidden, int64_t stride, bool expand)
      : expand_(expand), residual_(stride == 1 && in == out) {
    auto body = torch::nn::ModuleList();  // named like torchvision's Sequential: conv.0, conv.1, ...
    if (expand) {
      expand_conv = ConvBn(in, hidden, 1, 1);
      body->push_back(expand_conv.seq);
    }
    dw = ConvBn(hidden, hidden, 3, stride, hidden);
    body->push_back(dw.seq);
    project = conv(hidden, out, 1, 1);
    project_bn = torch::nn::BatchNorm2d(out);
    body->push_back(project);
    body->push_back(project_bn);
    register_module("conv", body);
  }

  at::Tensor forward(const at::Tensor& x, const GateFn& gate) {
    at::Tensor h = expand_ ? gate(clip6(expand_conv(x))) : x;
    h = gate(clip6(dw(h)));
    h = project_fused(*project, *project_bn, h);
    return residual_ ? h + x : h;
  }

  bool expand_, residual_;
  ConvBn expand_conv, dw;
  torch::nn::Conv2d project{nullptr};
  torch::nn::BatchNorm2d project_bn{nullptr};
  isp::ConvBatchNorm project_fused;
};
TORCH_MODULE(InvertedResidual);

const MobileNetV2Options& checked(const MobileNetV2Options& o) {
  if (o.input_size % 32 != 0)
    throw isp::OptionError("input_size", "MobileNetV2: input_size must be a multiple of 32 (five stride-2 steps), got " +
                            std::to_string(o.input_size));
  if (!o.widths.empty()) {
    if (static_cast<int64_t>(o.widths.size()) != kGatedBlocks)
      throw isp::Error("MobileNetV2: widths must list one hidden width per expansion block, expected " +
                       std::to_string(kGatedBlocks) + " values, got " + std::to_string(o.widths.size()));
    for (std::size_t i = 0; i < o.widths.size(); ++i)
      if (o.widths[i] < 1)
        throw isp::Error("MobileNetV2: widths[" + std::to_string(i) + "] must be >= 1, got " + std::to_string(o.widths[i]));
  }
  return o;
}

// The layer table: every conv, BN and ReLU6 module torchvision's model has, its pooling as AvgPool, the
// classifier; the residual add is functional. Conv and linear rows alone are torchvision's multiply-accumulates
// (300,774,272 at 224, width 1.0).
class MobileNetV2 : public isp::Backbone {
 public:
  explicit MobileNetV2(const MobileNetV2Options& o) : opt_(checked(o)) {
    using isp::LayerOp;
    const int64_t s = o.input_size;
    int64_t in = divisible(32 * o.width_mult), hw = s / 2;
    auto features = torch::nn::ModuleList();  // features.0 ... features.18, as torchvision names them
    stem_ = ConvBn(o.in_channels, in, 3, 2);
    features->push_back(stem_.seq);
    declare_conv("features.0.0", o.in_channels, in, 3, s, hw);
    declare_bn("features.0.1", in, hw);
    declare_op("features.0.2", LayerOp::Relu, in, hw, hw);
    int index = 1, gated = 0;
    for (const auto& st : kStages) {
      const int64_t out = divisible(st.channels * o.width_mult);
      for (int64_t b = 0; b < st.blocks; ++b, ++index) {
        const int64_t stride = b == 0 ? st.stride : 1, out_hw = hw / stride;
        const bool expand = st.expansion != 1;
        const int64_t hidden = !expand ? in : o.widths.empty() ? in * st.expansion : o.widths[gated];
        InvertedResidual block(in, out, hidden, stride, expand);
        features->push_back(block);
        blocks_.push_back(block);
        const std::string p = "features." + std::to_string(index) + ".conv.";
        int k = 0;  // child index inside .conv
        const int g = expand ? declare_gate("features." + std::to_string(index) + ".gate", hidden) : -1;
        if (expand) {
          declare_conv(p + "0.0", in, hidden, 1, hw, hw, -1, g);
          declare_bn(p + "0.1", hidden, hw, g);
          declare_op(p + "0.2", LayerOp::Relu, hidden, hw, hw, g);
          ++k, ++gated;
        }
        const std::string dw = p + std::to_string(k) + ".";
        declare_conv(dw + "0", hidden, hidden, 3, hw, out_hw, g, g, hidden);
        declare_bn(dw + "1", hidden, out_hw, g);
        declare_op(dw + "2", LayerOp::Relu, hidden, out_hw, out_hw, g);
        declare_conv(p + std::to_string(k + 1), hidden, out, 1, out_hw, out_hw, g);
        declare_bn(p + std::to_string(k + 2), out, out_hw);
        if (stride == 1 && in == out) declare_op(p + "add", LayerOp::Add, out, out_hw, out_hw);
        in = out;
        hw = out_hw;
      }
    }
    last_channels_ = divisible(1280 * std::max(1.0, o.width_mult));
    head_ = ConvBn(in, last_channels_, 1, 1);
    features->push_back(head_.seq);
    declare_conv("features.18.0", in, last_channels_, 1, hw, hw);
    declare_bn("features.18.1", last_channels_, hw);
    declare_op("features.18.2", LayerOp::Relu, last_channels_, hw, hw);
    register_module("features", features);
    fc_ = torch::nn::Linear(last_channels_, o.num_classes);
    auto classifier = torch::nn::Sequential(torch::nn::Dropout(o.dropout), fc_);
    register_module("classifier", classifier);
    declare_op("avgpool", LayerOp::AvgPool, last_channels_, hw, 1);
    declare_linear("classifier.1", last_channels_, o.num_classes);
    init_weights();
  }

  at::Tensor forward(const at::Tensor& x) override { return forward_features(x).logits; }

  isp::BackboneFeatures forward_features(const at::Tensor& x) override {
    isp::BackboneFeatures f;
    at::Tensor out = clip6(stem_(x));
    int gated = 0;
    for (std::size_t i = 0; i < blocks_.size(); ++i) {
      const int feature = static_cast<int>(i) + 1;
      const int g = blocks_[i]->expand_ ? gated++ : -1;
      const at::Tensor gv = g >= 0 ? gate(g) : at::Tensor();
      out = blocks_[i]->forward(out, [&gv](const at::Tensor& h) { return apply_gate(h, gv); });
      if (std::find(std::begin(kScaleFeatures), std::end(kScaleFeatures), feature) != std::end(kScaleFeatures))
        f.scales.push_back(out);
    }
    out = clip6(head_(out));
    f.scales.push_back(out);
    f.logits = fc_->forward(at::dropout(out.mean({2, 3}), opt_.dropout, is_training()));
    return f;
  }

  isp::InferenceGraph inference_graph() const override {
    isp::InferenceGraph g;
    std::string out = g.relu6(g.conv("features.0.0", g.input(), 2, 1));
    for (std::size_t i = 0; i < blocks_.size(); ++i) {
      const auto& b = *blocks_[i];
      const std::string p = "features." + std::to_string(i + 1) + ".conv.";
      const int64_t stride = b.dw.c->options.stride()->at(0), hidden = b.dw.c->options.in_channels();
      std::string h = out;
      int k = 0;
      if (b.expand_) h = g.relu6(g.conv(p + std::to_string(k++) + ".0", h, 1, 0));
      h = g.relu6(g.conv(p + std::to_string(k) + ".0", h, stride, 1, hidden));
      h = g.conv(p + std::to_string(k + 1), h, 1, 0);
      out = b.residual_ ? g.add(h, out) : h;
    }
    out = g.relu6(g.conv("features.18.0", out, 1, 0));
    g.linear("classifier.1", g.global_mean(out));
    return g;
  }

  std::vector<int64_t> feature_channels() const override {
    return {divisible(24 * opt_.width_mult), divisible(32 * opt_.width_mult), divisible(96 * opt_.width_mult),
            last_channels_};
  }
  int64_t num_classes() const override { return opt_.num_classes; }
  int64_t input_size() const override { return opt_.input_size; }

  isp::json structure() const override {
    MobileNetV2Options o = opt_;
    o.widths = widths();
    return isp::options_to_json(o);
  }

  std::shared_ptr<isp::Backbone> with_widths(const std::vector<int64_t>& widths) const override {
    MobileNetV2Options o = opt_;
    o.widths = widths.empty() ? this->widths() : widths;
    return std::make_shared<MobileNetV2>(o);
  }

 private:
  // torchvision's initialisation: Kaiming normal (fan_out) for convs, BN 1/0, the classifier N(0, 0.01) and 0.
  void init_weights() {
    torch::NoGradGuard no_grad;
    for (auto& m : modules(/*include_self=*/false)) {
      if (auto* c = m->as<torch::nn::Conv2d>()) {
        torch::nn::init::kaiming_normal_(c->weight, 0.0, torch::kFanOut);
      } else if (auto* b = m->as<torch::nn::BatchNorm2d>()) {
        b->weight.fill_(1.0);
        b->bias.zero_();
      } else if (auto* l = m->as<torch::nn::Linear>()) {
        l->weight.normal_(0.0, 0.01);
        l->bias.zero_();
      }
    }
  }

  MobileNetV2Options opt_;
  ConvBn stem_, head_;
  std::vector<InvertedResidual> blocks_;
  torch::nn::Linear fc_{nullptr};
  int64_t last_channels_ = 1280;
};

std::shared_ptr<isp::Backbone> make_mobilenetv2(const MobileNetV2Options& o, isp::BuildContext&) {
  return std::make_shared<MobileNetV2>(o);
}

}  // namespace

ISP_REGISTER(isp::Backbone, "MobileNetV2", 1, MobileNetV2Options, make_mobilenetv2,
             "ImageNet MobileNetV2 in torchvision's layout and names (width multiplier), one channel gate per "
             "expansion block on its hidden channels");
ISP_PLUGIN("0.1.0");
