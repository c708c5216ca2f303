// "GruHypernetGates": the official HyperStructure (docs/method.md §2.4): a fixed orthogonal input per gated layer
// -> bidirectional GRU(64 -> 128 per direction) -> LayerNorm(256) -> ReLU -> a weight-normalised linear head
// per layer (256 -> width, no bias) -> logits -> Gumbel-sigmoid gates.
#include <torch/torch.h>

#include "gumbel_gates.h"
#include "isp/cost.h"
#include "isp/interfaces/pruner.h"
#include "isp/registry/plugin.h"

namespace {

struct GruOptions : isp_pruners::GumbelGateOptions {
  int64_t input_size = 64;
  int64_t hidden_size = 128;
  template <class V> void visit(V& v) {
    visit_gumbel(v);
    v("input_size", input_size, "GRU input features per layer token", isp::at_least(1));
    v("hidden_size", hidden_size, "GRU hidden size per direction", isp::at_least(1));
  }
};

class GruHypernetGates : public isp::Pruner {
 public:
  explicit GruHypernetGates(GruOptions o) : o_(o) {}
  void attach(isp::Backbone& model, const isp::CostModel&) override {
    layers_ = model.gated_layers();
    const int64_t L = static_cast<int64_t>(layers_.size());
    at::Tensor input = torch::empty({L, 1, o_.input_size});
    torch::nn::init::orthogonal_(input.view({L, o_.input_size}));
    input_ = register_buffer("input", input);  // fixed, not trained
    gru_ = register_module("gru", torch::nn::GRU(torch::nn::GRUOptions(o_.input_size, o_.hidden_size).bidirectional(true)));
    norm_ = register_module("norm", torch::nn::LayerNorm(torch::nn::LayerNormOptions({2 * o_.hidden_size})));
    for (int64_t l = 0; l < L; ++l) {
      // weight norm: w = g * v / ||v|| per output row
      auto lin = torch::nn::Linear(torch::nn::LinearOptions(2 * o_.hidden_size, layers_[l].width).bias(false));
      // g and v are both leaf parameters: g starts at ||v|| but is not computed from the parameter v (a g
      // with a grad_fn is a non-leaf tensor, which AdamW refuses to optimise).
      at::Tensor v = lin->weight.detach().clone();
      at::Tensor g = v.norm(2, {1}, true).detach();
      v_.push_back(register_parameter("head" + std::to_string(l) + "_v", v));
      g_.push_back(register_parameter("head" + std::to_string(l) + "_g", g));
    }
  }
  bool learns_gates() const override { return true; }
  at::Tensor logits() {
    auto out = std::get<0>(gru_->forward(input_));  // [L, 1, 2H]
    at::Tensor h = torch::relu(norm_->forward(out.squeeze(1)));
    std::vector<at::Tensor> parts;
    for (std::size_t l = 0; l < v_.size(); ++l) {
      at::Tensor w = g_[l] * v_[l] / v_[l].norm(2, {1}, true);
      parts.push_back(torch::mv(w, h[static_cast<int64_t>(l)]));
    }
    return torch::cat(parts);
  }
  at::Tensor soft_gates() override { return isp_pruners::soft_gates(logits(), o_.offset, o_.temperature); }
  at::Tensor hard_gates() override { return isp_pruners::straight_through(soft_gates()); }
  at::Tensor keep_scores() override {
    torch::NoGradGuard ng;
    return isp_pruners::keep_scores(logits(), o_);
  }
  at::Tensor keep_probabilities() override {
    torch::NoGradGuard ng;
    return isp_pruners::keep_probabilities(logits(), o_.offset);
  }
  at::Tensor final_gates() override { return isp_pruners::final_gates(keep_scores(), layers_); }

 private:
  GruOptions o_;
  std::vector<isp::GatedLayer> layers_;
  at::Tensor input_;
  torch::nn::GRU gru_{nullptr};
  torch::nn::LayerNorm norm_{nullptr};
  std::vector<at::Tensor> v_, g_;
};

std::shared_ptr<isp::Pruner> make(const GruOptions& o, isp::BuildContext&) { return std::make_shared<GruHypernetGates>(o); }

}  // namespace

ISP_PLUGIN("0.1.0");
ISP_REGISTER(isp::Pruner, "GruHypernetGates", 1, GruOptions, make,
             "bidirectional-GRU hypernetwork emitting Gumbel-sigmoid gates (official HyperStructure)");
