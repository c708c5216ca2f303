#pragma once
// kind "backbone": a classifier trunk that exposes multi-scale features and per-channel gate slots.
#include <memory>
#include <string>
#include <vector>

#include <torch/nn/module.h>

#include "isp/interfaces/inference_graph.h"
#include "isp/registry/options.h"

namespace torch { namespace nn { class Conv2dImpl; class BatchNorm2dImpl; } }

namespace isp {

// BatchNorm folding (docs/performance.md): in a frozen network a BatchNorm in eval mode is an affine map per
// channel, y = s * (conv(x) - mean) + beta with s = gamma / sqrt(var + eps), so conv + BN is one convolution
// with weight W * s and bias beta + s * (b - mean): one pass over the activation instead of two. It is used only
// where it is exact up to rounding and changes nothing a gradient needs: the BN is in eval mode and uses running
// statistics, and no conv or BN parameter would receive a gradient (grad mode off, or none requires grad).
// Otherwise the layers run as they are. Backbones call it for every conv a BN follows directly.
// The fold is computed on every call (a few small kernels over the weights), except for the convolutions of a
// network held by keep_batchnorm_folds below: those folds are computed once and kept (core/src/batchnorm_fold.cpp
// says why a general cache is unsafe).
class ISP_API ConvBatchNorm {
 public:
  at::Tensor operator()(torch::nn::Conv2dImpl& conv, torch::nn::BatchNorm2dImpl& bn, const at::Tensor& x);
  // Whether the last call ran the folded convolution (tests, benchmarks).
  bool last_call_folded() const { return last_folded_; }

 private:
  bool last_folded_ = false;
};

// Process-wide switch (runtime.fold_batchnorm, default on); off runs every conv and BN separately.
ISP_API void set_batchnorm_folding(bool on);
ISP_API bool batchnorm_folding();
// Folds kept for the lifetime of `owner` (isp::FrozenParameters, isp/train.h): every conv of `frozen` that runs
// folded computes its folded weight and bias once and reuses them until drop_batchnorm_folds(owner). In a captured
// CUDA graph the fold kernels then leave the step altogether. The owner promises that nothing writes the
// network's parameters or BN statistics in place meanwhile; what still changes them is seen: a training-mode BN
// forward drops that layer's fold, and new storage (.to(), channels_last, a load that replaces the tensors)
// refolds. Nested owners of one network are counted.
ISP_API void keep_batchnorm_folds(const void* owner, torch::nn::Module& frozen);
ISP_API void drop_batchnorm_folds(const void* owner);
// How many folds are kept now (tests).
ISP_API std::size_t kept_batchnorm_folds();

// The switch set for one scope and restored after it (exports and checks that need the unfolded layers).
class ScopedBatchNormFolding {
 public:
  explicit ScopedBatchNormFolding(bool on) : saved_(batchnorm_folding()) { set_batchnorm_folding(on); }
  ~ScopedBatchNormFolding() { set_batchnorm_folding(saved_); }
  ScopedBatchNormFolding(const ScopedBatchNormFolding&) = delete;
  ScopedBatchNormFolding& operator=(const ScopedBatchNormFolding&) = delete;

 private:
  bool saved_;
};

// One gated layer: a per-channel multiplier after an activation (docs/method.md §3.4). Fixed to 1 until pruning.
struct GatedLayer {
  std::string name;
  int64_t width = 0;
};

// What the cost model (cost.h) counts. The Functional* ops and Add are what the official counter cannot see
// (applied inline, not as nn modules): they cost 0 FLOPs and are listed only so the table reads like forward().
enum class LayerOp { Conv, BatchNorm, Relu, Linear, AvgPool, FunctionalRelu, FunctionalAvgPool, Add, MaxPool };
// "conv", "bn", "relu", "linear", "avgpool", "functional_relu", "functional_avgpool", "add", "maxpool" (reports).
// MaxPool (an nn.MaxPool2d module, ImageNet stems): declare it with declare_layer and its kernel; it counts
// kernel^2 * numel(out) as the official counter's pooling hook does.
ISP_API const char* to_string(LayerOp op);

// One layer of a backbone's topology. `name` is its parameter-name prefix ("layer1.0.conv1": the tensors are
// "layer1.0.conv1.weight", ...). Channels that depend on a gated layer name it by index: for a layer whose
// output (input) channels are the kept channels of gated layer l, out_gate (in_gate) = l.
struct LayerShape {
  std::string name;
  LayerOp op = LayerOp::Conv;
  int64_t in_channels = 0, out_channels = 0;
  int64_t kernel = 1, groups = 1;  // conv: groups == in_channels for depthwise (then it follows the gate too)
  int64_t out_h = 1, out_w = 1;    // output spatial size (linear: 1x1)
  int64_t in_h = 1, in_w = 1;      // input spatial size (pooling)
  bool bias = false;
  int in_gate = -1, out_gate = -1;
};

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

// A backbone declares its prunable structure once, in its constructor, as it registers its modules
// (declare_gate, then declare_conv/bn/linear/op in forward order). The FLOPs table, the channel groups cut by
// surgery, the widths and the gate plumbing are all derived from that one table, so they cannot drift apart.
class ISP_API Backbone : public torch::nn::Module {
 public:
  static constexpr const char* kKind = "backbone";
  ~Backbone() override;
  virtual at::Tensor forward(const at::Tensor& x) = 0;
  virtual BackboneFeatures forward_features(const at::Tensor& x) = 0;
  virtual std::vector<int64_t> feature_channels() const = 0;
  virtual int64_t num_classes() const = 0;
  virtual int64_t input_size() const = 0;
  // Options (incl. widths) that rebuild this exact architecture (after pruning: the kept widths).
  virtual json structure() const = 0;
  // A freshly initialised network of the same architecture and options whose gated layers have `widths`
  // (empty = this network's widths): what channel surgery copies the kept weights into.
  virtual std::shared_ptr<Backbone> with_widths(const std::vector<int64_t>& widths) const = 0;
  // This network's forward pass in eval mode for the exporters (TorchScript: isp::save_torchscript), declared
  // with the layer table's conv and linear names; BN after a conv is folded by the exporter. Empty: this
  // backbone cannot be exported in those formats (weights.pt and structure.json still are).
  virtual InferenceGraph inference_graph() const { return {}; }

  const std::vector<GatedLayer>& gated_layers() const { return gated_; }
  // Every layer in forward order, for FLOPs/parameter counting.
  std::vector<LayerShape> layer_shapes() const { return layers_; }
  // The tensors coupled to each gated layer (cut together by channel surgery), one group per gated layer.
  std::vector<ChannelGroup> channel_groups() const;
  std::vector<int64_t> widths() const;
  int64_t total_gate_width() const;
  // gates: [sum of widths] (shared by the batch) or [N, sum of widths]; an undefined tensor restores all-ones.
  void set_gates(const at::Tensor& gates);

 protected:
  // Returns the gate index that layers pass as in_gate/out_gate.
  int declare_gate(std::string name, int64_t width);
  void declare_layer(LayerShape layer);
  void declare_conv(std::string name, int64_t in, int64_t out, int64_t kernel, int64_t in_hw, int64_t out_hw,
                    int in_gate = -1, int out_gate = -1, int64_t groups = 1, bool bias = false);
  void declare_bn(std::string name, int64_t channels, int64_t hw, int gate = -1);
  void declare_linear(std::string name, int64_t in, int64_t out, int in_gate = -1, int out_gate = -1,
                      bool bias = true);
  // Parameter-free ops (ReLU, pooling, residual add). Pooling kernel = stride = in_hw / out_hw.
  void declare_op(std::string name, LayerOp op, int64_t channels, int64_t in_hw, int64_t out_hw, int gate = -1);

  // Gated layer `index`'s slice of the current gates ([w] or [N, w]); undefined when no gates are set.
  at::Tensor gate(int index) const;
  // x * gate over the channel dimension of [N, C, ...] (NCHW maps, [N, C] features); undefined gate = identity.
  static at::Tensor apply_gate(const at::Tensor& x, const at::Tensor& gate);

 private:
  std::vector<GatedLayer> gated_;
  std::vector<int64_t> offsets_;  // of each gated layer in the concatenated gate vector
  std::vector<LayerShape> layers_;
  at::Tensor gates_;  // plain member, not a parameter or buffer: state_dict is unaffected
};

}  // namespace isp
