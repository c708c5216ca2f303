// An out-of-tree backbone: a perceptron on flattened images. It has no multi-scale features worth a U-Net
// (its one "scale" is the last hidden layer as [N, C, 1, 1]) and one gated layer per hidden layer, which is all
// the Backbone interface needs. Declaring the layers (declare_gate / declare_linear / declare_op) is what makes
// it prunable: FLOPs counting and channel surgery read that table.
#include <torch/torch.h>

#include "isp/interfaces/backbone.h"
#include "isp/registry/plugin.h"

namespace {

struct TinyMlpOptions {
  std::vector<int64_t> widths = {64};
  int64_t num_classes = 10;
  int64_t in_channels = 3;
  int64_t input_size = 32;
  template <class V> void visit(V& v) {
    v("widths", widths, "units of each hidden layer (each one gated, so pruning can shrink it)");
    v("num_classes", num_classes, "classes", isp::at_least(2));
    v("in_channels", in_channels, "input channels", isp::at_least(1));
    v("input_size", input_size, "input side", isp::at_least(1));
  }
};

class TinyMlp : public isp::Backbone {
 public:
  explicit TinyMlp(const TinyMlpOptions& o) : o_(o) {
    if (o.widths.empty()) throw isp::Error("ExampleTinyMLP: widths must list at least one hidden layer");
    int64_t in = o.in_channels * o.input_size * o.input_size;
    int in_gate = -1;  // the flattened image is not gated
    for (std::size_t i = 0; i < o.widths.size(); ++i) {
      const std::string name = "fc" + std::to_string(i + 1);
      hidden_.push_back(register_module(name, torch::nn::Linear(in, o.widths[i])));
      const int g = declare_gate(name + ".gate", o.widths[i]);
      declare_linear(name, in, o.widths[i], in_gate, g);
      declare_op(name + ".relu", isp::LayerOp::Relu, o.widths[i], 1, 1, g);
      in = o.widths[i];
      in_gate = g;
    }
    const std::string name = "fc" + std::to_string(o.widths.size() + 1);
    out_ = register_module(name, torch::nn::Linear(in, o.num_classes));
    declare_linear(name, in, o.num_classes, in_gate);
  }

  at::Tensor forward(const at::Tensor& x) override { return forward_features(x).logits; }
  isp::BackboneFeatures forward_features(const at::Tensor& x) override {
    at::Tensor h = x.flatten(1);
    for (std::size_t i = 0; i < hidden_.size(); ++i)
      h = apply_gate(torch::relu(hidden_[i]->forward(h)), gate(static_cast<int>(i)));
    return {{h.view({h.size(0), h.size(1), 1, 1})}, out_->forward(h)};
  }
  std::vector<int64_t> feature_channels() const override { return {o_.widths.back()}; }
  int64_t num_classes() const override { return o_.num_classes; }
  int64_t input_size() const override { return o_.input_size; }
  isp::json structure() const override { return isp::options_to_json(o_); }
  std::shared_ptr<isp::Backbone> with_widths(const std::vector<int64_t>& widths) const override {
    TinyMlpOptions o = o_;
    if (!widths.empty()) o.widths = widths;
    return std::make_shared<TinyMlp>(o);
  }

 private:
  TinyMlpOptions o_;
  std::vector<torch::nn::Linear> hidden_;
  torch::nn::Linear out_{nullptr};
};

std::shared_ptr<isp::Backbone> make(const TinyMlpOptions& o, isp::BuildContext&) { return std::make_shared<TinyMlp>(o); }

}  // namespace

ISP_PLUGIN("1.1.0");
ISP_REGISTER(isp::Backbone, "ExampleTinyMLP", 1, TinyMlpOptions, make, "out-of-tree example: a perceptron");
