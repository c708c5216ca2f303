// "MobileNetV2Cifar": the gated kuangliu-style CIFAR MobileNetV2 of isp-spec §2.2.
//
// Stem conv3x3(in_channels->32, stride 1)+BN+ReLU; 17 inverted-residual blocks from the stage table
// (t, c, n, s) = (1,16,1,1) (6,24,2,1) (6,32,3,1) (6,64,4,2) (6,96,3,1) (6,160,3,2) (6,320,1,1); plain ReLU;
// the t=1 block keeps its expansion conv; residual whenever stride == 1 (identity if in == out, else
// conv1x1+BN projection); head conv1x1(320->1280)+BN+ReLU, global average pool, Linear(1280->num_classes).
// PyTorch default initialisation. One gate per block on the hidden channels, applied after both hidden ReLUs
// (the same vector twice, isp-spec §3.4). Parameter names follow the Python model: conv1.weight, bn1.*,
// layers.0.conv1.weight, layers.1.shortcut.0.weight, conv2.weight (head), bn2.*, linear.weight.
#include <torch/torch.h>

#include <memory>
#include <string>
#include <vector>

#include "isp/interfaces/backbone.h"
#include "isp/plugin.h"

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
// Encoder scales: outputs of these blocks (0-based), then the post-head-conv map (isp-spec §2.2).
constexpr std::size_t kScaleBlocks[] = {5, 12};

at::Tensor apply_gate(const at::Tensor& x, const at::Tensor& gate) {
  if (!gate.defined()) return x;
  at::Tensor g = gate.to(x.device(), x.scalar_type());
  if (g.dim() == 1) return x * g.view({1, -1, 1, 1});
  return x * g.view({g.size(0), g.size(1), 1, 1});
}

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
  InvertedResidualImpl(int64_t in_planes, int64_t out_planes, int64_t hidden, int64_t stride)
      : in_planes_(in_planes), out_planes_(out_planes), hidden_(hidden), stride_(stride) {
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

  at::Tensor forward(const at::Tensor& x, const at::Tensor& gate) {
    at::Tensor out = apply_gate(torch::relu(bn1->forward(conv1->forward(x))), gate);
    out = apply_gate(torch::relu(bn2->forward(conv2->forward(out))), gate);
    out = bn3->forward(conv3->forward(out));
    if (stride_ == 1) out = out + (shortcut.is_empty() ? x : shortcut->forward(x));
    return out;
  }

  int64_t hidden() const { return hidden_; }
  int64_t in_planes() const { return in_planes_; }
  int64_t out_planes() const { return out_planes_; }
  int64_t stride() const { return stride_; }

  torch::nn::Conv2d conv1{nullptr}, conv2{nullptr}, conv3{nullptr};
  torch::nn::BatchNorm2d bn1{nullptr}, bn2{nullptr}, bn3{nullptr};
  torch::nn::Sequential shortcut{nullptr};

 private:
  int64_t in_planes_, out_planes_, hidden_, stride_;
};
TORCH_MODULE(InvertedResidual);

class MobileNetV2Cifar : public isp::Backbone {
 public:
  explicit MobileNetV2Cifar(const MobileNetV2CifarOptions& o) : opt_(o) {
    using torch::nn::Conv2dOptions;
    widths_ = o.widths.empty() ? full_widths() : o.widths;
    conv1 = register_module("conv1",
                            torch::nn::Conv2d(Conv2dOptions(o.in_channels, 32, 3).stride(1).padding(1).bias(false)));
    bn1 = register_module("bn1", torch::nn::BatchNorm2d(32));
    torch::nn::ModuleList layers;
    int64_t in_planes = 32;
    std::size_t k = 0;
    for (const auto& s : kStages) {
      for (int64_t b = 0; b < s.num_blocks; ++b, ++k) {
        const int64_t stride = b == 0 ? s.stride : 1;
        InvertedResidual block(in_planes, s.out_planes, widths_[k], stride);
        layers->push_back(block);
        blocks_.push_back(block);
        gated_.push_back({"layers." + std::to_string(k) + ".gate", widths_[k]});
        in_planes = s.out_planes;
      }
    }
    layers_ = register_module("layers", layers);
    conv2 = register_module("conv2", torch::nn::Conv2d(Conv2dOptions(320, 1280, 1).bias(false)));
    bn2 = register_module("bn2", torch::nn::BatchNorm2d(1280));
    linear = register_module("linear", torch::nn::Linear(1280, o.num_classes));
  }

  at::Tensor forward(const at::Tensor& x) override { return forward_features(x).logits; }

  isp::BackboneFeatures forward_features(const at::Tensor& x) override {
    isp::BackboneFeatures f;
    at::Tensor out = torch::relu(bn1->forward(conv1->forward(x)));
    int64_t offset = 0;
    std::size_t next_scale = 0;
    for (std::size_t i = 0; i < blocks_.size(); ++i) {
      at::Tensor g;
      const int64_t w = blocks_[i]->hidden();
      if (gates_.defined()) g = gates_.narrow(-1, offset, w);
      offset += w;
      out = blocks_[i]->forward(out, g);
      if (next_scale < std::size(kScaleBlocks) && i == kScaleBlocks[next_scale]) {
        f.scales.push_back(out);
        ++next_scale;
      }
    }
    out = torch::relu(bn2->forward(conv2->forward(out)));
    f.scales.push_back(out);
    f.logits = linear->forward(out.mean({2, 3}));
    return f;
  }

  std::vector<int64_t> feature_channels() const override { return {32, 96, 1280}; }
  std::vector<isp::GatedLayer> gated_layers() const override { return gated_; }

  void set_gates(const at::Tensor& gates) override {
    if (!gates.defined()) {
      gates_ = at::Tensor();
      return;
    }
    isp::check_gate_shape(gates, widths_, "MobileNetV2Cifar");
    gates_ = gates;
  }

  int64_t num_classes() const override { return opt_.num_classes; }
  int64_t input_size() const override { return opt_.input_size; }

  isp::json structure() const override {
    MobileNetV2CifarOptions o = opt_;
    o.widths = widths_;
    return isp::options_to_json(o);
  }

  // Every layer in forward order. The official counter (print_model_param_flops, isp-spec §1e) hooks nn.Module
  // layers only; the kuangliu-style Python model applies ReLU (F.relu), the global pool (F.avg_pool2d) and the
  // residual add functionally, so they are listed as "functional_relu", "functional_avgpool" and "add", which
  // the cost model counts as 0 FLOPs. With this the unpruned network counts 312 877 578 FLOPs (the reference
  // 0.31288 G). The depthwise conv has groups = in = out = hidden width and follows the gate on both sides.
  std::vector<isp::LayerShape> layer_shapes() const override {
    std::vector<isp::LayerShape> v;
    auto add = [&v](auto&&... args) { isp::add_layer(v, std::forward<decltype(args)>(args)...); };
    int64_t hw = opt_.input_size;
    add("conv1", "conv", opt_.in_channels, 32, 3, hw, hw);
    add("bn1", "bn", 32, 32, 1, hw, hw);
    add("relu", "functional_relu", 32, 32, 1, hw, hw);
    for (std::size_t i = 0; i < blocks_.size(); ++i) {
      const auto& b = blocks_[i];
      const int g = static_cast<int>(i);
      const std::string p = "layers." + std::to_string(i) + ".";
      const int64_t h = b->hidden(), out_hw = (hw + b->stride() - 1) / b->stride();
      add(p + "conv1", "conv", b->in_planes(), h, 1, hw, hw, -1, g);
      add(p + "bn1", "bn", h, h, 1, hw, hw, g, g);
      add(p + "relu1", "functional_relu", h, h, 1, hw, hw, g, g);
      add(p + "conv2", "conv", h, h, 3, hw, out_hw, g, g, h);
      add(p + "bn2", "bn", h, h, 1, out_hw, out_hw, g, g);
      add(p + "relu2", "functional_relu", h, h, 1, out_hw, out_hw, g, g);
      add(p + "conv3", "conv", h, b->out_planes(), 1, out_hw, out_hw, g, -1);
      add(p + "bn3", "bn", b->out_planes(), b->out_planes(), 1, out_hw, out_hw);
      if (b->stride() == 1) {
        if (b->in_planes() != b->out_planes()) {
          add(p + "shortcut.0", "conv", b->in_planes(), b->out_planes(), 1, hw, hw);
          add(p + "shortcut.1", "bn", b->out_planes(), b->out_planes(), 1, hw, hw);
        }
        add(p + "add", "add", b->out_planes(), b->out_planes(), 1, out_hw, out_hw);
      }
      hw = out_hw;
    }
    add("conv2", "conv", 320, 1280, 1, hw, hw);
    add("bn2", "bn", 1280, 1280, 1, hw, hw);
    add("relu", "functional_relu", 1280, 1280, 1, hw, hw);
    add("avgpool", "functional_avgpool", 1280, 1280, hw, hw, 1);
    isp::LayerShape fc;
    fc.name = "linear";
    fc.op = "linear";
    fc.in_channels = 1280;
    fc.out_channels = opt_.num_classes;
    fc.bias = true;
    v.push_back(fc);
    return v;
  }

  // Block l: conv1 rows, bn1, depthwise conv2 rows (its weight is [C, 1, 3, 3]), bn2, conv3 columns (isp-spec §1e).
  std::vector<isp::ChannelGroup> channel_groups() const override {
    std::vector<isp::ChannelGroup> v;
    for (std::size_t i = 0; i < blocks_.size(); ++i) {
      const std::string p = "layers." + std::to_string(i) + ".";
      isp::ChannelGroup g;
      g.gate = static_cast<int>(i);
      g.slices.push_back({p + "conv1.weight", 0});
      for (const char* bn : {"bn1", "bn2"})
        for (const char* t : {"weight", "bias", "running_mean", "running_var"})
          g.slices.push_back({p + bn + "." + t, 0});
      g.slices.push_back({p + "conv2.weight", 0});
      g.slices.push_back({p + "conv3.weight", 1});
      v.push_back(std::move(g));
    }
    return v;
  }

 private:
  MobileNetV2CifarOptions opt_;
  std::vector<int64_t> widths_;
  torch::nn::Conv2d conv1{nullptr}, conv2{nullptr};
  torch::nn::BatchNorm2d bn1{nullptr}, bn2{nullptr};
  torch::nn::ModuleList layers_{nullptr};
  std::vector<InvertedResidual> blocks_;
  torch::nn::Linear linear{nullptr};
  std::vector<isp::GatedLayer> gated_;
  at::Tensor gates_;  // plain member, not a parameter or buffer: state_dict is unaffected
};

std::shared_ptr<isp::Backbone> make_mobilenetv2_cifar(const MobileNetV2CifarOptions& o, isp::BuildContext&) {
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
  return std::make_shared<MobileNetV2Cifar>(o);
}

}  // namespace

ISP_REGISTER(isp::Backbone, "MobileNetV2Cifar", 1, MobileNetV2CifarOptions, make_mobilenetv2_cifar,
             "CIFAR MobileNetV2 (kuangliu-style, stride-1 stem) with one channel gate per block (isp-spec §2.2)");
ISP_PLUGIN("0.1.0");
