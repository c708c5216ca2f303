// "FlopsBudget": R_res(r, p) = log(max(r, p) / p) (isp-spec §3.3, supplement §3.2). r is the differentiable
// kept fraction of the whole network's FLOPs by default; `counting: official` uses the official numerator
// (ResNet conv1 only, MobileNetV2 quadratic depthwise) over the gated-block total, for comparisons (§6.4).
#include <ATen/ATen.h>

#include "isp/interfaces/regularizer.h"
#include "isp/plugin.h"

namespace {
struct FlopsBudgetOptions {
  double weight = 1.0;
  double target = 0.5;
  std::string counting = "whole_network";
  template <class V> void visit(V& v) {
    v("weight", weight, "term weight (official reg_w = 1)", isp::at_least(0));
    v("target", target, "p: target kept fraction of FLOPs", isp::open_closed(0, 1));
    v("counting", counting, "whole_network (default) or official (isp-spec §3.3)",
      isp::one_of({"whole_network", "official"}));
  }
};
class FlopsBudget : public isp::Regularizer {
 public:
  explicit FlopsBudget(FlopsBudgetOptions o) : o_(std::move(o)) {}
  at::Tensor compute(const isp::LossInputs& in) override {
    const at::Tensor& r = o_.counting == "official"
                              ? isp::require_input(in.flops_ratio_official, term(), "the official FLOPs ratio")
                              : isp::require_input(in.flops_ratio, term(), "the FLOPs ratio");
    return at::log(at::clamp_min(r, o_.target) / o_.target);
  }
  double weight() const override { return o_.weight; }
  std::string term() const override { return "flops"; }
 private:
  FlopsBudgetOptions o_;
};
std::shared_ptr<isp::Regularizer> make(const FlopsBudgetOptions& o, isp::BuildContext&) {
  return std::make_shared<FlopsBudget>(o);
}
}  // namespace

ISP_PLUGIN("0.1.0");
ISP_REGISTER(isp::Regularizer, "FlopsBudget", 1, FlopsBudgetOptions, make, "R_res = log(max(r, p)/p) on the FLOPs ratio");
