// "ResNetCifar": the gated CIFAR ResNet (6n+2) of docs/method.md §2.1 (ResNet-20/32/44/56/110).
//
// Stem conv3x3(in_channels->16)+BN+ReLU; three stages of n = (depth-2)/6 BasicBlocks (16/32/64 channels, the
// first block of stages 2 and 3 has stride 2); option-A shortcuts (AvgPool2d(2,2), then zero channels appended);
// global average pool; Linear(64->num_classes). One gate per block, on the block-internal channels after
// ReLU(BN(conv1)) (docs/method.md §3.4). Parameter names follow the Python model: conv1.weight, bn1.*,
// layer1.0.conv1.weight, layer1.0.bn1.running_mean, ..., fc.weight, fc.bias.
#include <torch/torch.h>

#include <cmath>
#include <functional>
#include <memory>
#include <string>
#include <vector>

#include "isp/interfaces/backbone.h"
#include "isp/registry/plugin.h"

namespace {

struct ResNetCifarOptions {
  int depth = 56;
  int64_t num_classes = 10;
  int64_t in_channels = 3;
  int64_t input_size = 32;
  double bn_init_gamma = 0.5;
  bool detach_shortcut = false;
  std::vector<int64_t> widths;

  template <class V> void visit(V& v) {
    v("depth", depth, "number of layers, 6n+2 (n BasicBlocks per stage)", isp::one_of({20, 32, 44, 56, 110}));
    v("num_classes", num_classes, "number of output classes", isp::at_least(2));
    v("in_channels", in_channels, "input image channels", isp::at_least(1));
    v("input_size", input_size, "input height = width in pixels (a multiple of 4)", isp::at_least(4));
    v("bn_init_gamma", bn_init_gamma, "initial BatchNorm weight (the official code uses 0.5)");
    v("detach_shortcut", detach_shortcut,
      "detach the two option-A downsampling shortcuts as the official code does (docs/method.md §6.10)");
    v("widths", widths,
      "block-internal (gated) width of each of the 3n blocks, in layer order; empty = full widths "
      "(16/32/64). Used to rebuild a pruned network");
  }
};

// The block applies its gate through the backbone (Backbone::apply_gate), which owns the gate vector.
using GateFn = std::function<at::Tensor(const at::Tensor&)>;

class BasicBlockImpl : public torch::nn::Module {
 public:
  BasicBlockImpl(int64_t in_planes, int64_t planes, int64_t mid, int64_t stride, bool detach_shortcut)
      : in_planes_(in_planes), planes_(planes), stride_(stride), detach_(detach_shortcut) {
    conv1 = register_module(
        "conv1", torch::nn::Conv2d(torch::nn::Conv2dOptions(in_planes, mid, 3).stride(stride).padding(1).bias(false)));
    bn1 = register_module("bn1", torch::nn::BatchNorm2d(mid));
    conv2 = register_module(
        "conv2", torch::nn::Conv2d(torch::nn::Conv2dOptions(mid, planes, 3).stride(1).padding(1).bias(false)));
    bn2 = register_module("bn2", torch::nn::BatchNorm2d(planes));
  }

  at::Tensor forward(const at::Tensor& x, const GateFn& gate) {
    at::Tensor out = gate(torch::relu(conv_bn1(*conv1, *bn1, x)));
    out = conv_bn2(*conv2, *bn2, out);
    return torch::relu(out + shortcut(x));
  }

  torch::nn::Conv2d conv1{nullptr}, conv2{nullptr};
  torch::nn::BatchNorm2d bn1{nullptr}, bn2{nullptr};
  isp::ConvBatchNorm conv_bn1, conv_bn2;  // folded where the network is frozen

 private:
  // Option A: identity, or AvgPool2d(2,2) followed by (planes - in_planes) zero channels appended.
  at::Tensor shortcut(const at::Tensor& x) const {
    if (stride_ == 1 && in_planes_ == planes_) return x;
    at::Tensor s = x;
    if (stride_ != 1) s = torch::avg_pool2d(s, {stride_, stride_}, {stride_, stride_});
    if (detach_) s = s.detach();
    if (planes_ > in_planes_) {
      at::Tensor pad = torch::zeros({s.size(0), planes_ - in_planes_, s.size(2), s.size(3)}, s.options());
      s = torch::cat({s, pad}, 1);
    }
    return s;
  }

  int64_t in_planes_, planes_, stride_;
  bool detach_;
};
TORCH_MODULE(BasicBlock);

const ResNetCifarOptions& checked(const ResNetCifarOptions& o) {
  const int64_t n = (o.depth - 2) / 6;
  if (o.depth < 8 || (o.depth - 2) % 6 != 0) {
    throw isp::OptionError("depth", "ResNetCifar: depth must be 6n+2, got " + std::to_string(o.depth));
  }
  if (o.input_size % 4 != 0) {
    throw isp::OptionError("input_size", "ResNetCifar: input_size must be a multiple of 4 (two stride-2 "
                            "stages with option-A shortcuts), got " + std::to_string(o.input_size));
  }
  if (!o.widths.empty()) {
    if (static_cast<int64_t>(o.widths.size()) != 3 * n) {
      throw isp::Error("ResNetCifar: widths must list one width per block, expected " + std::to_string(3 * n) +
                       " values for depth " + std::to_string(o.depth) + ", got " +
                       std::to_string(o.widths.size()));
    }
    for (std::size_t i = 0; i < o.widths.size(); ++i) {
      if (o.widths[i] < 1) {
        throw isp::Error("ResNetCifar: widths[" + std::to_string(i) + "] must be >= 1, got " +
                         std::to_string(o.widths[i]));
      }
    }
  }
  return o;
}

// The layer table is what the official counter (print_model_param_flops, docs/method.md §1e) sees: exactly the
// nn.Module layers of the Python model, i.e. convs, BNs, the block's nn.ReLU module (reused, so hooked twice per
// block), the head nn.AvgPool2d and the FC. The option-A shortcut pools with a fresh nn.AvgPool2d(2,2) built
// inside forward (never hooked) and the residual add is functional: both are declared as FunctionalAvgPool and
// Add, which count 0 FLOPs. With this ResNet-56 counts 127 087 242 FLOPs (the reference 0.12709 G) and 853 018
// parameters.
class ResNetCifar : public isp::Backbone {
 public:
  explicit ResNetCifar(const ResNetCifarOptions& o) : opt_(checked(o)) {
    using isp::LayerOp;
    const int64_t n = (o.depth - 2) / 6;
    const int64_t stage_planes[3] = {16, 32, 64};
    int64_t hw = o.input_size;
    conv1 = register_module(
        "conv1", torch::nn::Conv2d(torch::nn::Conv2dOptions(o.in_channels, 16, 3).stride(1).padding(1).bias(false)));
    bn1 = register_module("bn1", torch::nn::BatchNorm2d(16));
    declare_conv("conv1", o.in_channels, 16, 3, hw, hw);
    declare_bn("bn1", 16, hw);
    declare_op("relu", LayerOp::Relu, 16, hw, hw);
    int64_t in_planes = 16;
    for (int s = 0; s < 3; ++s) {
      torch::nn::ModuleList layer;
      for (int64_t b = 0; b < n; ++b) {
        const int64_t planes = stage_planes[s], stride = (s > 0 && b == 0) ? 2 : 1, out_hw = hw / stride;
        const int64_t mid = o.widths.empty() ? planes : o.widths[blocks_.size()];
        const std::string p = "layer" + std::to_string(s + 1) + "." + std::to_string(b) + ".";
        BasicBlock block(in_planes, planes, mid, stride, o.detach_shortcut);
        layer->push_back(block);
        blocks_.push_back(block);
        // One gate per block, on the block-internal channels: conv1 rows, bn1, conv2 columns (docs/method.md §1e).
        const int g = declare_gate(p + "gate", mid);
        declare_conv(p + "conv1", in_planes, mid, 3, hw, out_hw, -1, g);
        declare_bn(p + "bn1", mid, out_hw, g);
        declare_op(p + "relu1", LayerOp::Relu, mid, out_hw, out_hw, g);
        declare_conv(p + "conv2", mid, planes, 3, out_hw, out_hw, g);
        declare_bn(p + "bn2", planes, out_hw);
        if (stride != 1) declare_op(p + "shortcut", LayerOp::FunctionalAvgPool, in_planes, hw, out_hw);
        declare_op(p + "add", LayerOp::Add, planes, out_hw, out_hw);
        declare_op(p + "relu2", LayerOp::Relu, planes, out_hw, out_hw);
        in_planes = planes;
        hw = out_hw;
      }
      stage_end_.push_back(blocks_.size());
      layers_.push_back(register_module("layer" + std::to_string(s + 1), layer));
    }
    fc = register_module("fc", torch::nn::Linear(64, o.num_classes));
    declare_op("avgpool", LayerOp::AvgPool, 64, hw, 1);
    declare_linear("fc", 64, o.num_classes);
    init_weights();
  }

  at::Tensor forward(const at::Tensor& x) override { return forward_features(x).logits; }

  isp::BackboneFeatures forward_features(const at::Tensor& x) override {
    isp::BackboneFeatures f;
    at::Tensor out = torch::relu(conv_bn1_(*conv1, *bn1, x));
    std::size_t next_stage = 0;
    for (std::size_t i = 0; i < blocks_.size(); ++i) {
      const at::Tensor g = gate(static_cast<int>(i));
      out = blocks_[i]->forward(out, [&g](const at::Tensor& h) { return apply_gate(h, g); });
      if (i + 1 == stage_end_[next_stage]) {
        f.scales.push_back(out);
        ++next_stage;
      }
    }
    out = out.mean({2, 3});
    f.logits = fc->forward(out);
    return f;
  }

  isp::InferenceGraph inference_graph() const override {
    isp::InferenceGraph g;
    std::string out = g.relu(g.conv("conv1", g.input(), 1, 1));
    const int64_t n = (opt_.depth - 2) / 6, stage_planes[3] = {16, 32, 64};
    int64_t in_planes = 16;
    for (int s = 0; s < 3; ++s)
      for (int64_t b = 0; b < n; ++b) {
        const int64_t planes = stage_planes[s], stride = (s > 0 && b == 0) ? 2 : 1;
        const std::string p = "layer" + std::to_string(s + 1) + "." + std::to_string(b) + ".";
        const std::string h = g.conv(p + "conv2", g.relu(g.conv(p + "conv1", out, stride, 1)), 1, 1);
        std::string shortcut = out;  // option A: pooled, then zero channels appended
        if (stride != 1) shortcut = g.avg_pool(shortcut, stride);
        if (planes > in_planes) shortcut = g.pad_channels(shortcut, planes - in_planes);
        out = g.relu(g.add(h, shortcut));
        in_planes = planes;
      }
    g.linear("fc", g.global_mean(out));
    return g;
  }

  std::vector<int64_t> feature_channels() const override { return {16, 32, 64}; }
  int64_t num_classes() const override { return opt_.num_classes; }
  int64_t input_size() const override { return opt_.input_size; }

  isp::json structure() const override {
    ResNetCifarOptions o = opt_;
    o.widths = widths();
    return isp::options_to_json(o);
  }

  std::shared_ptr<isp::Backbone> with_widths(const std::vector<int64_t>& widths) const override {
    ResNetCifarOptions o = opt_;
    o.widths = widths.empty() ? this->widths() : widths;
    return std::make_shared<ResNetCifar>(o);
  }

 private:
  void init_weights() {
    torch::NoGradGuard no_grad;
    for (auto& m : modules(/*include_self=*/false)) {
      if (auto* c = m->as<torch::nn::Conv2d>()) {
        // n = k*k*C_out (docs/method.md §2.1); weight is [C_out, C_in/g, k, k].
        const double n = static_cast<double>(c->weight.size(0) * c->weight.size(2) * c->weight.size(3));
        c->weight.normal_(0.0, std::sqrt(2.0 / n));
      } else if (auto* b = m->as<torch::nn::BatchNorm2d>()) {
        b->weight.fill_(opt_.bn_init_gamma);
        b->bias.zero_();
      } else if (auto* l = m->as<torch::nn::Linear>()) {
        l->weight.normal_(0.0, 0.01);
        l->bias.zero_();
      }
    }
  }

  ResNetCifarOptions opt_;
  torch::nn::Conv2d conv1{nullptr};
  torch::nn::BatchNorm2d bn1{nullptr};
  isp::ConvBatchNorm conv_bn1_;
  std::vector<torch::nn::ModuleList> layers_;
  std::vector<BasicBlock> blocks_;
  std::vector<std::size_t> stage_end_;
  torch::nn::Linear fc{nullptr};
};

std::shared_ptr<isp::Backbone> make_resnet_cifar(const ResNetCifarOptions& o, isp::BuildContext&) {
  return std::make_shared<ResNetCifar>(o);
}

}  // namespace

ISP_REGISTER(isp::Backbone, "ResNetCifar", 1, ResNetCifarOptions, make_resnet_cifar,
             "CIFAR ResNet (6n+2, option-A shortcuts) with one channel gate per BasicBlock (docs/method.md §2.1)");
ISP_PLUGIN("0.1.0");
