// "RbfParamDistance": the interpretation term D(u(x; v), u_orig(x)) of the pruning loss (docs/method.md §3.3, §6.1).
//   raw (official default): mean squared error of the raw head outputs (u_z, u_t, u_sigma);
//   readable: MSE of (c_row, c_col, sigma) — the quantities the paper's figure names;
//   map: mean squared difference of the RBF probability maps.
#include <ATen/ATen.h>

#include "isp/interfaces/regularizer.h"
#include "isp/registry/plugin.h"

namespace {
struct RbfDistanceOptions {
  double weight = 10.0;
  std::string mode = "raw";
  template <class V> void visit(V& v) {
    v("weight", weight, "term weight (official mse_w = 10)", isp::at_least(0));
    v("mode", mode, "what is compared", isp::one_of({"raw", "readable", "map"}));
  }
};
class RbfParamDistance : public isp::Regularizer {
 public:
  explicit RbfParamDistance(RbfDistanceOptions o) : isp::Regularizer(o.weight), o_(std::move(o)) {}
  at::Tensor compute(const isp::LossInputs& in) override {
    if (o_.mode == "raw")
      return at::mse_loss(isp::require_input(in.params, term(), "selector parameters"),
                          isp::require_input(in.params_ref, term(), "reference selector parameters"));
    if (o_.mode == "readable")
      return at::mse_loss(isp::require_input(in.readable, term(), "RBF centres and sigma"),
                          isp::require_input(in.readable_ref, term(), "reference RBF centres and sigma"));
    return at::mse_loss(isp::require_input(in.probs, term(), "mask maps"),
                        isp::require_input(in.maps_ref, term(), "reference mask maps"));
  }
  std::string term() const override { return "interp"; }
  // raw and readable compare RBF parameters, which only an RBF head predicts; map works with any head.
  bool needs_rbf_parameters() const override { return o_.mode != "map"; }
  bool needs_selector() const override { return true; }
 private:
  RbfDistanceOptions o_;
};
std::shared_ptr<isp::Regularizer> make(const RbfDistanceOptions& o, isp::BuildContext&) {
  return std::make_shared<RbfParamDistance>(o);
}
}  // namespace

ISP_PLUGIN("0.1.0");
ISP_REGISTER(isp::Regularizer, "RbfParamDistance", 1, RbfDistanceOptions, make,
             "distance between the selector's RBF parameters for the gated and the original model");
