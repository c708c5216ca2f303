// "FreeLogitGates": one free logit per channel, theta ~ N(0, init_std) (the official Simplified_Gate and the
// default gate generator, docs/method.md §2.4).
#include <torch/torch.h>

#include "gumbel_gates.h"
#include "isp/cost.h"
#include "isp/interfaces/pruner.h"
#include "isp/registry/plugin.h"

namespace {

struct FreeLogitOptions : isp_pruners::GumbelGateOptions {
  double init_std = 1.0;
  template <class V> void visit(V& v) {
    visit_gumbel(v);
    v("init_std", init_std, "theta ~ N(0, init_std)", isp::at_least(0));
  }
};

class FreeLogitGates : public isp::Pruner {
 public:
  explicit FreeLogitGates(FreeLogitOptions o) : o_(o) {}
  void attach(isp::Backbone& model, const isp::CostModel&) override {
    layers_ = model.gated_layers();
    theta_ = register_parameter("theta", torch::randn({model.total_gate_width()}) * o_.init_std);
  }
  bool learns_gates() const override { return true; }
  at::Tensor soft_gates() override { return isp_pruners::soft_gates(theta_, o_.offset, o_.temperature); }
  at::Tensor hard_gates() override { return isp_pruners::straight_through(soft_gates()); }
  at::Tensor keep_scores() override { return isp_pruners::keep_scores(theta_.detach(), o_); }
  at::Tensor keep_probabilities() override { return isp_pruners::keep_probabilities(theta_.detach(), o_.offset); }
  at::Tensor final_gates() override { return isp_pruners::final_gates(keep_scores(), layers_); }

 private:
  FreeLogitOptions o_;
  std::vector<isp::GatedLayer> layers_;
  at::Tensor theta_;
};

std::shared_ptr<isp::Pruner> make(const FreeLogitOptions& o, isp::BuildContext&) {
  return std::make_shared<FreeLogitGates>(o);
}

}  // namespace

ISP_PLUGIN("0.1.0");
ISP_REGISTER(isp::Pruner, "FreeLogitGates", 1, FreeLogitOptions, make,
             "one learned logit per channel, Gumbel-sigmoid gates (official default gate generator)");
