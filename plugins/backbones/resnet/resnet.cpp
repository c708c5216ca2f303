// "ResNet": the ImageNet ResNets (18/34 with BasicBlocks, 50/101/152 with Bottlenecks) in torchvision's layout and
// names, so `torch.save(torchvision.models.resnet50().state_dict())` loads by name (init_from).
//
// Stem conv7x7/2 (in_channels -> 64) + BN + ReLU + MaxPool3x3/2 (padding 1); four stages of 64/128/256/512 planes
// (x4 channels out of a Bottleneck), the first block of stages 2-4 with stride 2 (on the 3x3 conv: torchvision's
// "ResNet v1.5"), a 1x1/stride conv + BN "downsample" wherever the shape changes; global average pool; fc.
// Gates on the block-internal channels: one per BasicBlock (after ReLU(BN(conv1))), two per Bottleneck (after
// ReLU(BN(conv1)) and ReLU(BN(conv2))). The residual stream is not gated. Names: conv1.weight, bn1.*,
// layer1.0.conv1.weight, layer1.0.downsample.0.weight, layer1.0.downsample.1.running_mean, ..., fc.weight.
#include <torch/torch.h>

#include <cmath>
#include <functional>
#include <memory>
#include <string>
#include <vector>

#include "isp/interfaces/backbone.h"
#include "isp/registry/plugin.h"

namespace {

struct ResNetOptions {
  int depth = 50;
  int64_t num_classes = 1000;
  int64_t in_channels = 3;
  int64_t input_size = 224;
  bool zero_init_residual = false;
  bool gate_residual = false;
  std::vector<int64_t> widths;

  template <class V> void visit(V& v) {
    v("depth", depth, "18 or 34 (BasicBlocks), 50, 101 or 152 (Bottlenecks)", isp::one_of({18, 34, 50, 101, 152}));
    v("num_classes", num_classes, "number of output classes", isp::at_least(2));
    v("in_channels", in_channels, "input image channels", isp::at_least(1));
    v("input_size", input_size, "input height = width in pixels (a multiple of 32)", isp::at_least(32));
    v("zero_init_residual", zero_init_residual,
      "start each block's last BatchNorm weight at 0 (torchvision's option of that name)");
    v("gate_residual", gate_residual,
      "also gate each stage's residual stream, one gate per stage: the channels every block of the stage adds "
      "to (and the stem's, where stage 1 has no downsample)");
    v("widths", widths,
      "gated widths in gate order: with gate_residual the 4 residual streams first, then each block-internal "
      "layer in forward order (one per BasicBlock, two per Bottleneck); empty = full widths. Used to rebuild a "
      "pruned network");
  }
};

struct Arch {
  bool bottleneck;
  std::vector<int64_t> blocks;
};
Arch arch_of(int depth) {
  switch (depth) {
    case 18: return {false, {2, 2, 2, 2}};
    case 34: return {false, {3, 4, 6, 3}};
    case 50: return {true, {3, 4, 6, 3}};
    case 101: return {true, {3, 4, 23, 3}};
    default: return {true, {3, 8, 36, 3}};
  }
}
int64_t gates_per_block(const Arch& a) { return a.bottleneck ? 2 : 1; }

using GateFn = std::function<at::Tensor(const at::Tensor&, int)>;  // (activation, which gate of the block)

torch::nn::Conv2d conv(int64_t in, int64_t out, int64_t k, int64_t stride) {
  return torch::nn::Conv2d(torch::nn::Conv2dOptions(in, out, k).stride(stride).padding(k / 2).bias(false));
}

// One block, basic or bottleneck: conv1..conv3 with their BNs, and the downsample pair where the shape changes.
class BlockImpl : public torch::nn::Module {
 public:
  BlockImpl(bool bottleneck, int64_t in, int64_t out, int64_t stride, const std::vector<int64_t>& mid, bool has_downsample)
      : bottleneck_(bottleneck) {
    if (bottleneck) {
      conv1 = register_module("conv1", conv(in, mid[0], 1, 1));
      bn1 = register_module("bn1", torch::nn::BatchNorm2d(mid[0]));
      conv2 = register_module("conv2", conv(mid[0], mid[1], 3, stride));
      bn2 = register_module("bn2", torch::nn::BatchNorm2d(mid[1]));
      conv3 = register_module("conv3", conv(mid[1], out, 1, 1));
      bn3 = register_module("bn3", torch::nn::BatchNorm2d(out));
    } else {
      conv1 = register_module("conv1", conv(in, mid[0], 3, stride));
      bn1 = register_module("bn1", torch::nn::BatchNorm2d(mid[0]));
      conv2 = register_module("conv2", conv(mid[0], out, 3, 1));
      bn2 = register_module("bn2", torch::nn::BatchNorm2d(out));
    }
    if (has_downsample) {  // decided on the full widths: a pruned stream keeps its projection
      down_conv = conv(in, out, 1, stride);
      down_bn = torch::nn::BatchNorm2d(out);
      downsample = register_module("downsample", torch::nn::Sequential(down_conv, down_bn));
    }
  }

  at::Tensor forward(const at::Tensor& x, const GateFn& gate) {
    at::Tensor h = gate(torch::relu(cb1(*conv1, *bn1, x)), 0);
    if (bottleneck_) {
      h = gate(torch::relu(cb2(*conv2, *bn2, h)), 1);
      h = cb3(*conv3, *bn3, h);
    } else {
      h = cb2(*conv2, *bn2, h);
    }
    const at::Tensor identity = downsample ? cbd(*down_conv, *down_bn, x) : x;
    return torch::relu(h + identity);
  }

  // The BN whose output joins the residual sum (zero_init_residual).
  torch::nn::BatchNorm2d& last_bn() { return bottleneck_ ? bn3 : bn2; }

  torch::nn::Conv2d conv1{nullptr}, conv2{nullptr}, conv3{nullptr}, down_conv{nullptr};
  torch::nn::BatchNorm2d bn1{nullptr}, bn2{nullptr}, bn3{nullptr}, down_bn{nullptr};
  torch::nn::Sequential downsample{nullptr};
  isp::ConvBatchNorm cb1, cb2, cb3, cbd;  // folded where the network is frozen

 private:
  bool bottleneck_;
};
TORCH_MODULE(Block);

const ResNetOptions& checked(const ResNetOptions& o) {
  if (o.input_size % 32 != 0)
    throw isp::OptionError("input_size", "ResNet: input_size must be a multiple of 32 (five stride-2 steps), got " +
                            std::to_string(o.input_size));
  const Arch a = arch_of(o.depth);
  int64_t n = o.gate_residual ? 4 : 0;
  for (int64_t b : a.blocks) n += b * gates_per_block(a);
  if (!o.widths.empty()) {
    if (static_cast<int64_t>(o.widths.size()) != n)
      throw isp::Error("ResNet: widths must list " + std::to_string(n) + " values for depth " +
                       std::to_string(o.depth) + " (" + (o.gate_residual ? "4 residual streams, then " : "") +
                       (a.bottleneck ? "two per Bottleneck" : "one per BasicBlock") + "), got " + std::to_string(o.widths.size()));
    for (std::size_t i = 0; i < o.widths.size(); ++i)
      if (o.widths[i] < 1)
        throw isp::Error("ResNet: widths[" + std::to_string(i) + "] must be >= 1, got " + std::to_string(o.widths[i]));
  }
  return o;
}

// The layer table counts what the official counter would see in torchvision's model: every conv, BN, ReLU module
// use, the MaxPool and the AdaptiveAvgPool modules, the fc; the residual add is functional (0 FLOPs). Its conv and
// linear rows alone are multiply-accumulates, torchvision's "GFLOPS" (ResNet-50 at 224: 4,089,184,256).
class ResNet : public isp::Backbone {
 public:
  explicit ResNet(const ResNetOptions& o) : opt_(checked(o)), arch_(arch_of(o.depth)) {
    using isp::LayerOp;
    const int64_t expansion = arch_.bottleneck ? 4 : 1, s = o.input_size;
    std::size_t next_width = 0;
    auto width = [&](int64_t full) { return o.widths.empty() ? full : o.widths[next_width++]; };
    // Residual streams first (gate order = widths order). Stage 1 of a BasicBlock ResNet has no downsample: its
    // stream starts at the stem, whose output channels then belong to it.
    int stream[4] = {-1, -1, -1, -1};
    int64_t stream_width[4];
    for (int st = 0; st < 4; ++st) {
      stream_width[st] = (64 << st) * expansion;
      if (o.gate_residual) {
        stream_width[st] = width(stream_width[st]);
        stream[st] = declare_gate("layer" + std::to_string(st + 1) + ".stream", stream_width[st]);
      }
    }
    stem_in_stream_ = !arch_.bottleneck;
    const int stem_gate = stem_in_stream_ ? stream[0] : -1;
    const int64_t stem_width = stem_in_stream_ ? stream_width[0] : 64;
    conv1 = register_module("conv1", conv(o.in_channels, stem_width, 7, 2));
    bn1 = register_module("bn1", torch::nn::BatchNorm2d(stem_width));
    declare_conv("conv1", o.in_channels, stem_width, 7, s, s / 2, -1, stem_gate);
    declare_bn("bn1", stem_width, s / 2, stem_gate);
    declare_op("relu", LayerOp::Relu, stem_width, s / 2, s / 2, stem_gate);
    isp::LayerShape pool;
    pool.name = "maxpool", pool.op = LayerOp::MaxPool, pool.in_channels = pool.out_channels = stem_width, pool.kernel = 3;
    pool.in_h = pool.in_w = s / 2, pool.out_h = pool.out_w = s / 4, pool.in_gate = pool.out_gate = stem_gate;
    declare_layer(pool);
    int64_t hw = s / 4, in = stem_width, in_full = 64;
    int in_gate = stem_gate;
    for (int stage = 0; stage < 4; ++stage) {
      torch::nn::ModuleList layer;
      const int64_t planes = 64 << stage, out = stream_width[stage], out_full = planes * expansion;
      const int og = stream[stage];
      stream_gate_.push_back(og);
      for (int64_t b = 0; b < arch_.blocks[stage]; ++b) {
        const int64_t stride = (stage > 0 && b == 0) ? 2 : 1, out_hw = hw / stride;
        const bool has_downsample = stride != 1 || in_full != out_full;
        const std::string p = "layer" + std::to_string(stage + 1) + "." + std::to_string(b) + ".";
        std::vector<int64_t> mid;
        for (int64_t k = 0; k < gates_per_block(arch_); ++k) mid.push_back(width(planes));
        Block block(arch_.bottleneck, in, out, stride, mid, has_downsample);
        layer->push_back(block);
        blocks_.push_back(block);
        std::vector<int> gates;
        if (arch_.bottleneck) {
          const int g1 = declare_gate(p + "gate1", mid[0]), g2 = declare_gate(p + "gate2", mid[1]);
          gates = {g1, g2};
          declare_conv(p + "conv1", in, mid[0], 1, hw, hw, in_gate, g1);
          declare_bn(p + "bn1", mid[0], hw, g1);
          declare_op(p + "relu1", LayerOp::Relu, mid[0], hw, hw, g1);
          declare_conv(p + "conv2", mid[0], mid[1], 3, hw, out_hw, g1, g2);
          declare_bn(p + "bn2", mid[1], out_hw, g2);
          declare_op(p + "relu2", LayerOp::Relu, mid[1], out_hw, out_hw, g2);
          declare_conv(p + "conv3", mid[1], out, 1, out_hw, out_hw, g2, og);
          declare_bn(p + "bn3", out, out_hw, og);
        } else {
          const int g = declare_gate(p + "gate", mid[0]);
          gates = {g};
          declare_conv(p + "conv1", in, mid[0], 3, hw, out_hw, in_gate, g);
          declare_bn(p + "bn1", mid[0], out_hw, g);
          declare_op(p + "relu1", LayerOp::Relu, mid[0], out_hw, out_hw, g);
          declare_conv(p + "conv2", mid[0], out, 3, out_hw, out_hw, g, og);
          declare_bn(p + "bn2", out, out_hw, og);
        }
        block_gates_.push_back(gates);
        if (has_downsample) {
          declare_conv(p + "downsample.0", in, out, 1, hw, out_hw, in_gate, og);
          declare_bn(p + "downsample.1", out, out_hw, og);
        }
        declare_op(p + "add", LayerOp::Add, out, out_hw, out_hw, og);
        declare_op(p + "relu_out", LayerOp::Relu, out, out_hw, out_hw, og);
        in = out, in_full = out_full, in_gate = og;
        hw = out_hw;
      }
      stage_end_.push_back(blocks_.size());
      register_module("layer" + std::to_string(stage + 1), layer);
    }
    fc = register_module("fc", torch::nn::Linear(in, o.num_classes));
    declare_op("avgpool", LayerOp::AvgPool, in, hw, 1, in_gate);
    declare_linear("fc", in, o.num_classes, in_gate);
    init_weights();
  }

  at::Tensor forward(const at::Tensor& x) override { return forward_features(x).logits; }

  isp::BackboneFeatures forward_features(const at::Tensor& x) override {
    isp::BackboneFeatures f;
    at::Tensor out = torch::max_pool2d(torch::relu(conv_bn1_(*conv1, *bn1, x)), {3, 3}, {2, 2}, {1, 1});
    if (stem_in_stream_ && stream_gate_[0] >= 0) out = apply_gate(out, gate(stream_gate_[0]));
    std::size_t next_stage = 0;
    for (std::size_t i = 0; i < blocks_.size(); ++i) {
      const auto& gates = block_gates_[i];
      out = blocks_[i]->forward(out, [&](const at::Tensor& h, int k) { return apply_gate(h, gate(gates[k])); });
      // A stream gate after every block of its stage: a removed channel is zero in every sum it joins.
      if (stream_gate_[next_stage] >= 0) out = apply_gate(out, gate(stream_gate_[next_stage]));
      if (i + 1 == stage_end_[next_stage]) {
        f.scales.push_back(out);
        ++next_stage;
      }
    }
    f.logits = fc->forward(out.mean({2, 3}));
    return f;
  }

  isp::InferenceGraph inference_graph() const override {
    isp::InferenceGraph g;
    std::string out = g.max_pool(g.relu(g.conv("conv1", g.input(), 2, 3)), 3, 2, 1);
    std::size_t i = 0;
    for (int stage = 0; stage < 4; ++stage)
      for (int64_t b = 0; b < arch_.blocks[stage]; ++b, ++i) {
        const int64_t stride = (stage > 0 && b == 0) ? 2 : 1;
        const std::string p = "layer" + std::to_string(stage + 1) + "." + std::to_string(b) + ".";
        std::string h;
        if (arch_.bottleneck) {
          h = g.relu(g.conv(p + "conv1", out, 1, 0));
          h = g.relu(g.conv(p + "conv2", h, stride, 1));
          h = g.conv(p + "conv3", h, 1, 0);
        } else {
          h = g.conv(p + "conv2", g.relu(g.conv(p + "conv1", out, stride, 1)), 1, 1);
        }
        const std::string identity = blocks_[i]->downsample ? g.conv(p + "downsample.0", out, stride, 0) : out;
        out = g.relu(g.add(h, identity));
      }
    g.linear("fc", g.global_mean(out));
    return g;
  }

  std::vector<int64_t> feature_channels() const override {
    const int64_t e = arch_.bottleneck ? 4 : 1;
    return {64 * e, 128 * e, 256 * e, 512 * e};
  }
  int64_t num_classes() const override { return opt_.num_classes; }
  int64_t input_size() const override { return opt_.input_size; }

  isp::json structure() const override {
    ResNetOptions o = opt_;
    o.widths = widths();
    return isp::options_to_json(o);
  }

  std::shared_ptr<isp::Backbone> with_widths(const std::vector<int64_t>& widths) const override {
    ResNetOptions o = opt_;
    o.widths = widths.empty() ? this->widths() : widths;
    return std::make_shared<ResNet>(o);
  }

 private:
  // torchvision's initialisation: Kaiming normal (fan_out, ReLU) for convs, BN weight 1 and bias 0, the Linear's
  // default (uniform in +-1/sqrt(in) for weight and bias); zero_init_residual zeroes each block's last BN weight.
  void init_weights() {
    torch::NoGradGuard no_grad;
    for (auto& m : modules(/*include_self=*/false)) {
      if (auto* c = m->as<torch::nn::Conv2d>()) {
        torch::nn::init::kaiming_normal_(c->weight, 0.0, torch::kFanOut, torch::kReLU);
      } else if (auto* b = m->as<torch::nn::BatchNorm2d>()) {
        b->weight.fill_(1.0);
        b->bias.zero_();
      }
    }
    if (opt_.zero_init_residual)
      for (auto& b : blocks_) b->last_bn()->weight.zero_();
  }

  ResNetOptions opt_;
  Arch arch_;
  torch::nn::Conv2d conv1{nullptr};
  torch::nn::BatchNorm2d bn1{nullptr};
  isp::ConvBatchNorm conv_bn1_;
  std::vector<Block> blocks_;
  std::vector<std::vector<int>> block_gates_;  // gate indices of each block's internal layers
  std::vector<int> stream_gate_;               // per stage; -1 without gate_residual
  bool stem_in_stream_ = false;
  std::vector<std::size_t> stage_end_;
  torch::nn::Linear fc{nullptr};
};

std::shared_ptr<isp::Backbone> make_resnet(const ResNetOptions& o, isp::BuildContext&) {
  return std::make_shared<ResNet>(o);
}

}  // namespace

ISP_REGISTER(isp::Backbone, "ResNet", 1, ResNetOptions, make_resnet,
             "ImageNet ResNet-18/34/50/101/152 in torchvision's layout and names, with channel gates inside each "
             "block (one per BasicBlock, two per Bottleneck)");
ISP_PLUGIN("0.1.0");
