#pragma once
// kind "backbone": a classifier trunk that exposes multi-scale features and per-channel gate slots.
#include <string>
#include <vector>

#include <torch/nn/module.h>

#include "isp/options.h"

namespace isp {

// One gated layer: a per-channel multiplier after an activation (isp-spec §3.4). Fixed to 1 until pruning.
struct GatedLayer {
  std::string name;
  int64_t width = 0;
};

// One layer as the cost model sees it. Channels that depend on a gated layer name it by index: for a layer
// whose output (input) channels are the kept channels of gated layer l, out_gate (in_gate) = l.
struct LayerShape {
  std::string name;
  std::string op;  // "conv", "bn", "relu", "linear", "avgpool", or inline (0 FLOPs, see cost.h):
                   // "functional_relu", "functional_avgpool", "add"
  int64_t in_channels = 0, out_channels = 0;
  int64_t kernel = 1, groups = 1;  // conv: groups == in_channels for depthwise (then it follows the gate too)
  int64_t out_h = 1, out_w = 1;    // output spatial size (linear: 1x1)
  int64_t in_h = 1, in_w = 1;      // input spatial size (pooling)
  bool bias = false;
  int in_gate = -1, out_gate = -1;
};

// Appends one layer with a square feature map: what backbones' layer_shapes() lists are made of.
ISP_API void add_layer(std::vector<LayerShape>& layers, std::string name, std::string op, int64_t in_channels,
                       int64_t out_channels, int64_t kernel, int64_t in_hw, int64_t out_hw, int in_gate = -1,
                       int out_gate = -1, int64_t groups = 1);
// The check behind every set_gates(): gates are [sum(widths)] or [N, sum(widths)]; throws naming `who`.
ISP_API void check_gate_shape(const at::Tensor& gates, const std::vector<int64_t>& widths, const std::string& who);

// A tensor that must be sliced when channels of a gated layer are removed: dimension `dim` of `param`.
struct ChannelSlice {
  std::string param;  // name as in named_parameters()/named_buffers(), e.g. "layer1.0.conv1.weight"
  int64_t dim = 0;
};
struct ChannelGroup {
  int gate = 0;  // index into gated_layers()
  std::vector<ChannelSlice> slices;
};

struct BackboneFeatures {
  std::vector<at::Tensor> scales;  // finest first, e.g. ResNet-56: 16@32x32, 32@16x16, 64@8x8
  at::Tensor logits;
};

class ISP_API Backbone : public torch::nn::Module {
 public:
  static constexpr const char* kKind = "backbone";
  ~Backbone() override;
  virtual at::Tensor forward(const at::Tensor& x) = 0;
  virtual BackboneFeatures forward_features(const at::Tensor& x) = 0;
  virtual std::vector<int64_t> feature_channels() const = 0;
  virtual std::vector<GatedLayer> gated_layers() const = 0;
  // gates: [sum of widths] (shared by the batch) or [N, sum of widths]; an undefined tensor restores all-ones.
  virtual void set_gates(const at::Tensor& gates) = 0;
  virtual int64_t num_classes() const = 0;
  virtual int64_t input_size() const = 0;
  // Width configuration that rebuilds this exact architecture (after pruning: the kept widths).
  virtual json structure() const = 0;
  // Every layer in forward order, for FLOPs/parameter counting.
  virtual std::vector<LayerShape> layer_shapes() const = 0;
  // The tensors coupled to each gated layer (cut together by channel surgery).
  virtual std::vector<ChannelGroup> channel_groups() const = 0;
  int64_t total_gate_width() const;
};

}  // namespace isp
