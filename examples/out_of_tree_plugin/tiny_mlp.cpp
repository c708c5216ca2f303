// An out-of-tree backbone: a two-layer perceptron on flattened images. It has no multi-scale features
// worth a U-Net and one gated layer (its hidden units), which is all the Backbone interface needs.
#include <torch/torch.h>

#include "isp/interfaces/backbone.h"
#include "isp/plugin.h"

namespace {

struct TinyMlpOptions {
  int64_t hidden = 64;
  int64_t num_classes = 10;
  int64_t in_channels = 3;
  int64_t input_size = 32;
  template <class V> void visit(V& v) {
    v("hidden", hidden, "hidden units", isp::between(1, 4096));
    v("num_classes", num_classes, "classes", isp::at_least(2));
    v("in_channels", in_channels, "input channels", isp::at_least(1));
    v("input_size", input_size, "input side", isp::at_least(1));
  }
};

class TinyMlp : public isp::Backbone {
 public:
  explicit TinyMlp(const TinyMlpOptions& o) : o_(o) {
    fc1_ = register_module("fc1", torch::nn::Linear(o.in_channels * o.input_size * o.input_size, o.hidden));
    fc2_ = register_module("fc2", torch::nn::Linear(o.hidden, o.num_classes));
  }
  at::Tensor forward(const at::Tensor& x) override { return forward_features(x).logits; }
  isp::BackboneFeatures forward_features(const at::Tensor& x) override {
    at::Tensor h = torch::relu(fc1_->forward(x.flatten(1)));
    if (gates_.defined()) h = h * gates_;
    return {{h.view({h.size(0), o_.hidden, 1, 1})}, fc2_->forward(h)};
  }
  std::vector<int64_t> feature_channels() const override { return {o_.hidden}; }
  std::vector<isp::GatedLayer> gated_layers() const override { return {{"fc1.gate", o_.hidden}}; }
  void set_gates(const at::Tensor& g) override { gates_ = g; }
  int64_t num_classes() const override { return o_.num_classes; }
  int64_t input_size() const override { return o_.input_size; }
  isp::json structure() const override { return isp::options_to_json(o_); }
  std::vector<isp::LayerShape> layer_shapes() const override {
    const int64_t in = o_.in_channels * o_.input_size * o_.input_size;
    isp::LayerShape fc1{"fc1", "linear", in, o_.hidden};
    fc1.bias = true;
    fc1.out_gate = 0;
    isp::LayerShape relu{"relu", "relu", o_.hidden, o_.hidden};
    relu.in_gate = relu.out_gate = 0;
    isp::LayerShape fc2{"fc2", "linear", o_.hidden, o_.num_classes};
    fc2.bias = true;
    fc2.in_gate = 0;
    return {fc1, relu, fc2};
  }
  std::vector<isp::ChannelGroup> channel_groups() const override {
    return {{0, {{"fc1.weight", 0}, {"fc1.bias", 0}, {"fc2.weight", 1}}}};
  }

 private:
  TinyMlpOptions o_;
  torch::nn::Linear fc1_{nullptr}, fc2_{nullptr};
  at::Tensor gates_;
};

std::shared_ptr<isp::Backbone> make(const TinyMlpOptions& o, isp::BuildContext&) { return std::make_shared<TinyMlp>(o); }

}  // namespace

ISP_PLUGIN("1.0.0");
ISP_REGISTER(isp::Backbone, "ExampleTinyMLP", 1, TinyMlpOptions, make, "out-of-tree example: a two-layer perceptron");
