// "MobileNetV2Cifar": the gated kuangliu-style CIFAR MobileNetV2 of docs/method.md §2.2.
//
// Stem conv3x3(in_channels->32, stride 1)+BN+ReLU; 17 inverted-residual blocks from the stage table
// (t, c, n, s) = (1,16,1,1) (6,24,2,1) (6,32,3,1) (6,64,4,2) (6,96,3,1) (6,160,3,2) (6,320,1,1); plain ReLU;
// the t=1 block keeps its expansion conv; residual whenever stride == 1 (identity if in == out, else
// conv1x1+BN projection); head conv1x1(320->1280)+BN+ReLU, global average pool, Linear(1280->num_classes).
// PyTorch default initialisation. One gate per block on the hidden channels, applied after both hidden ReLUs
// (the same vector twice, docs/method.md §3.4). Parameter names follow the Python model: conv1.weight, bn1.*,
// layers.0.conv1.weight, layers.1.shortcut.0.weight, conv2.weight (head), bn2.*, linear.weight.
#include <torch/torch.h>

#include <functional>
#include <memory>
#include <string>
#include <vector>

#include "isp/interfaces/backbone.h"
#include "isp/registry/plugin.h"

namespace {

struct MobileNetV2CifarOptions {
  int64_t num_classes = 10;
  int64_t in_channels = 3;
  int64_t input_size = 32;
  std::vector<int64_t> widths;

  template <class V> void visit(V& v) {
    v("num_classes", num_classes, "number of output classes", isp::at_least(2));
    v("in_channels", in_channels, "input image channels", isp::at_least(1));
    v("input_size", input_size, "input height = width in pixels", isp::at_least(4));
    v("widths", widths,
      "hidden (gated) width of each of the 17 blocks, in layer order; empty = full widths (expansion x input "
      "channels). Used to rebuild a pruned network");
  }
};

struct StageCfg {
  int64_t expansion, out_planes, num_blocks, stride;
};
constexpr StageCfg kStages[] = {{1, 16, 1, 1},  {6, 24, 2, 1},  {6, 32, 3, 1}, {6, 64, 4, 2},
                                {6, 96, 3, 1},  {6, 160, 3, 2}, {6, 320, 1, 1}};
constexpr int64_t kNumBlocks = 17;
// Encoder scales: outputs of these blocks (0-based), then the post-head-conv map (docs/method.md §2.2).
constexpr std::size_t kScaleBlocks[] = {5, 12};

// The block applies its gate through the backbone (Backbone::apply_gate), which owns the gate vector.
using GateFn = std::function<at::Tensor(const at::Tensor&)>;

// Full hidden widths: expansion x block input channels.
std::vector<int64_t> full_widths() {
  std::vector<int64_t> w;
  int64_t in_planes = 32;
  for (const auto& s : kStages) {
    for (int64_t b = 0; b < s.num_blocks; ++b) {
      w.push_back(s.expansion * in_planes);
      in_planes = s.out_planes;
    }
  }
  return w;
}

class InvertedResidualImpl : public torch::nn::Module {
 public:
  InvertedResidualImpl(int64_t in_planes, int64_t out_planes, int64_t hidden, int64_t stride) : stride_(stride) {
    using torch::nn::Conv2dOptions;
    conv1 = register_module("conv1", torch::nn::Conv2d(Conv2dOptions(in_planes, hidden, 1).bias(false)));
    bn1 = register_module("bn1", torch::nn::BatchNorm2d(hidden));
    conv2 = register_module(
        "conv2",
        torch::nn::Conv2d(Conv2dOptions(hidden, hidden, 3).stride(stride).padding(1).groups(hidden).bias(false)));
    bn2 = register_module("bn2", torch::nn::BatchNorm2d(hidden));
    conv3 = register_module("conv3", torch::nn::Conv2d(Conv2dOptions(hidden, out_planes, 1).bias(false)));
    bn3 = register_module("bn3", torch::nn::BatchNorm2d(out_planes));
    if (stride == 1 && in_planes != out_planes) {
      shortcut = register_module(
          "shortcut", torch::nn::Sequential(torch::nn::Conv2d(Conv2dOptions(in_planes, out_planes, 1).bias(false)),
                                            torch::nn::BatchNorm2d(out_planes)));
    }
  }

  at::Tensor forward(const at::Tensor& x, const GateFn& gate) {
    at::Tensor out = gate(torch::relu(conv_bn1(*conv1, *bn1, x)));
    out = gate(torch::relu(conv_bn2(*conv2, *bn2, out)));
    out = conv_bn3(*conv3, *bn3, out);
    if (stride_ == 1)
      out = out + (shortcut.is_empty() ? x
                                       : conv_bn_shortcut(*shortcut[0]->as<torch::nn::Conv2d>(),
                                                          *shortcut[1]->as<torch::nn::BatchNorm2d>(), x));
    return out;
  }
  isp::ConvBatchNorm conv_bn1, conv_bn2, conv_bn3, conv_bn_shortcut;  // folded where the network is frozen

  torch::nn::Conv2d conv1{nullptr}, conv2{nullptr}, conv3{nullptr};
  torch::nn::BatchNorm2d bn1{nullptr}, bn2{nullptr}, bn3{nullptr};
  torch::nn::Sequential shortcut{nullptr};

 private:
  int64_t stride_;
};
TORCH_MODULE(InvertedResidual);

const MobileNetV2CifarOptions& checked(const MobileNetV2CifarOptions& o) {
  if (!o.widths.empty()) {
    if (static_cast<int64_t>(o.widths.size()) != kNumBlocks) {
      throw isp::Error("MobileNetV2Cifar: widths must list one hidden width per block, expected " +
                       std::to_string(kNumBlocks) + " values, got " + std::to_string(o.widths.size()));
    }
    for (std::size_t i = 0; i < o.widths.size(); ++i) {
      if (o.widths[i] < 1) {
        throw isp::Error("MobileNetV2Cifar: widths[" + std::to_string(i) + "] must be >= 1, got " +
                         std::to_string(o.widths[i]));
      }
    }
  }
  return o;
}

// The official counter (print_model_param_flops, docs/method.md §1e) hooks nn.Module layers only; the kuangliu-style
// Python model applies ReLU (F.relu), the global pool (F.avg_pool2d) and the residual add functionally, so the
// layer table declares them as FunctionalRelu, FunctionalAvgPool and Add, which count 0 FLOPs. With this the
// unpruned network counts 312 877 578 FLOPs (the reference 0.31288 G).
class MobileNetV2Cifar : public isp::Backbone {
 public:
  explicit MobileNetV2Cifar(const MobileNetV2CifarOptions& o) : opt_(checked(o)) {
    using isp::LayerOp;
    using torch::nn::Conv2dOptions;
    const std::vector<int64_t> widths = o.widths.empty() ? full_widths() : o.widths;
    int64_t hw = o.input_size;
    conv1 = register_module("conv1",
                            torch::nn::Conv2d(Conv2dOptions(o.in_channels, 32, 3).stride(1).padding(1).bias(false)));
    bn1 = register_module("bn1", torch::nn::BatchNorm2d(32));
    declare_conv("conv1", o.in_channels, 32, 3, hw, hw);
    declare_bn("bn1", 32, hw);
    declare_op("relu", LayerOp::FunctionalRelu, 32, hw, hw);
    torch::nn::ModuleList layers;
    int64_t in_planes = 32;
    std::size_t k = 0;
    for (const auto& s : kStages) {
      for (int64_t b = 0; b < s.num_blocks; ++b, ++k) {
        const int64_t stride = b == 0 ? s.stride : 1, h = widths[k], out = s.out_planes;
        const int64_t out_hw = (hw + stride - 1) / stride;
        InvertedResidual block(in_planes, out, h, stride);
        layers->push_back(block);
        blocks_.push_back(block);
        // One gate per block on the hidden channels; the depthwise conv (groups = hidden) follows it on both sides.
        const std::string p = "layers." + std::to_string(k) + ".";
        const int g = declare_gate(p + "gate", h);
        declare_conv(p + "conv1", in_planes, h, 1, hw, hw, -1, g);
        declare_bn(p + "bn1", h, hw, g);
        declare_op(p + "relu1", LayerOp::FunctionalRelu, h, hw, hw, g);
        declare_conv(p + "conv2", h, h, 3, hw, out_hw, g, g, h);
        declare_bn(p + "bn2", h, out_hw, g);
        declare_op(p + "relu2", LayerOp::FunctionalRelu, h, out_hw, out_hw, g);
        declare_conv(p + "conv3", h, out, 1, out_hw, out_hw, g);
        declare_bn(p + "bn3", out, out_hw);
        if (stride == 1) {
          if (in_planes != out) {
            declare_conv(p + "shortcut.0", in_planes, out, 1, hw, hw);
            declare_bn(p + "shortcut.1", out, hw);
          }
          declare_op(p + "add", LayerOp::Add, out, out_hw, out_hw);
        }
        in_planes = out;
        hw = out_hw;
      }
    }
    layers_ = register_module("layers", layers);
    conv2 = register_module("conv2", torch::nn::Conv2d(Conv2dOptions(320, 1280, 1).bias(false)));
    bn2 = register_module("bn2", torch::nn::BatchNorm2d(1280));
    linear = register_module("linear", torch::nn::Linear(1280, o.num_classes));
    declare_conv("conv2", 320, 1280, 1, hw, hw);
    declare_bn("bn2", 1280, hw);
    declare_op("relu", LayerOp::FunctionalRelu, 1280, hw, hw);
    declare_op("avgpool", LayerOp::FunctionalAvgPool, 1280, hw, 1);
    declare_linear("linear", 1280, o.num_classes);
  }

  at::Tensor forward(const at::Tensor& x) override { return forward_features(x).logits; }

  isp::BackboneFeatures forward_features(const at::Tensor& x) override {
    isp::BackboneFeatures f;
    at::Tensor out = torch::relu(conv_bn1_(*conv1, *bn1, x));
    std::size_t next_scale = 0;
    for (std::size_t i = 0; i < blocks_.size(); ++i) {
      const at::Tensor g = gate(static_cast<int>(i));
      out = blocks_[i]->forward(out, [&g](const at::Tensor& h) { return apply_gate(h, g); });
      if (next_scale < std::size(kScaleBlocks) && i == kScaleBlocks[next_scale]) {
        f.scales.push_back(out);
        ++next_scale;
      }
    }
    out = torch::relu(conv_bn2_(*conv2, *bn2, out));
    f.scales.push_back(out);
    f.logits = linear->forward(out.mean({2, 3}));
    return f;
  }

  isp::InferenceGraph inference_graph() const override {
    const std::vector<int64_t> widths = opt_.widths.empty() ? full_widths() : opt_.widths;
    isp::InferenceGraph g;
    std::string out = g.relu(g.conv("conv1", g.input(), 1, 1));
    int64_t in_planes = 32;
    std::size_t k = 0;
    for (const auto& s : kStages)
      for (int64_t b = 0; b < s.num_blocks; ++b, ++k) {
        const int64_t stride = b == 0 ? s.stride : 1;
        const std::string p = "layers." + std::to_string(k) + ".";
        std::string h = g.relu(g.conv(p + "conv1", out, 1, 0));
        h = g.relu(g.conv(p + "conv2", h, stride, 1, widths[k]));  // depthwise
        h = g.conv(p + "conv3", h, 1, 0);
        if (stride == 1) h = g.add(h, in_planes == s.out_planes ? out : g.conv(p + "shortcut.0", out, 1, 0));
        out = h;
        in_planes = s.out_planes;
      }
    out = g.relu(g.conv("conv2", out, 1, 0));
    g.linear("linear", g.global_mean(out));
    return g;
  }

  std::vector<int64_t> feature_channels() const override { return {32, 96, 1280}; }
  int64_t num_classes() const override { return opt_.num_classes; }
  int64_t input_size() const override { return opt_.input_size; }

  isp::json structure() const override {
    MobileNetV2CifarOptions o = opt_;
    o.widths = widths();
    return isp::options_to_json(o);
  }

  std::shared_ptr<isp::Backbone> with_widths(const std::vector<int64_t>& widths) const override {
    MobileNetV2CifarOptions o = opt_;
    o.widths = widths.empty() ? this->widths() : widths;
    return std::make_shared<MobileNetV2Cifar>(o);
  }

 private:
  MobileNetV2CifarOptions opt_;
  torch::nn::Conv2d conv1{nullptr}, conv2{nullptr};
  torch::nn::BatchNorm2d bn1{nullptr}, bn2{nullptr};
  isp::ConvBatchNorm conv_bn1_, conv_bn2_;
  torch::nn::ModuleList layers_{nullptr};
  std::vector<InvertedResidual> blocks_;
  torch::nn::Linear linear{nullptr};
};

std::shared_ptr<isp::Backbone> make_mobilenetv2_cifar(const MobileNetV2CifarOptions& o, isp::BuildContext&) {
  return std::make_shared<MobileNetV2Cifar>(o);
}

}  // namespace

ISP_REGISTER(isp::Backbone, "MobileNetV2Cifar", 1, MobileNetV2CifarOptions, make_mobilenetv2_cifar,
             "CIFAR MobileNetV2 (kuangliu-style, stride-1 stem) with one channel gate per block (docs/method.md §2.2)");
ISP_PLUGIN("0.1.0");
