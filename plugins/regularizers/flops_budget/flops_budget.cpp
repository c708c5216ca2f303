// "FlopsBudget": the FLOPs term of the pruning loss, r = kept fraction of the whole network's FLOPs (default)
// or the official numerator (`counting: official`: ResNet conv1 only, MobileNetV2 quadratic depthwise, over
// the gated-block total; docs/method.md §3.3, §6.4), p = target.
//
// mode "lagrangian" (default): the constrained problem  min D(gates)  s.t.  r_final <= p, solved by dual
//   ascent: the term is lambda * (r - p) on the differentiable straight-through ratio r, and after every step
//   lambda <- max(0, lambda + dual_lr * (r_final - p)), where r_final is the ratio of the deterministic
//   architecture the stage would extract now. lambda grows for as long as that architecture is over budget,
//   so the pressure adapts to whatever scale the interpretation term's gradients have on a given classifier
//   and CPU, instead of depending on a hand-tuned weight (why: a fixed-weight penalty either never reaches the
//   target or overshoots it, depending on the classifier; see README "Budgets").
// mode "log_ratio": the paper's R_res(r, p) = log(max(r, p) / p) with a fixed weight (official).
// Either way PruneChannels projects the extracted architecture onto the budget and reports whether it is met.
#include <ATen/ATen.h>

#include "isp/interfaces/regularizer.h"
#include "isp/registry/plugin.h"

namespace {
struct FlopsBudgetOptions {
  double weight = 1.0;
  double target = 0.5;
  std::string counting = "whole_network";
  std::string mode = "lagrangian";
  double dual_lr = 0.5;
  double initial_multiplier = 0.0;
  template <class V> void visit(V& v) {
    v("weight", weight, "term weight (official reg_w = 1; lagrangian: scales lambda)", isp::at_least(0));
    v("target", target, "p: target kept fraction of FLOPs", isp::open_closed(0, 1));
    v("counting", counting, "whole_network (default) or official (docs/method.md §3.3)",
      isp::one_of({"whole_network", "official"}));
    v("mode", mode, "lagrangian (dual ascent on r_final - p; default) or log_ratio (the paper's R_res)",
      isp::one_of({"lagrangian", "log_ratio"}));
    v("dual_lr", dual_lr, "lagrangian: step of the multiplier per unit of budget excess", isp::greater_than(0));
    v("initial_multiplier", initial_multiplier, "lagrangian: lambda at the start", isp::at_least(0));
  }
};
class FlopsBudget : public isp::Regularizer {
 public:
  explicit FlopsBudget(FlopsBudgetOptions o) : isp::Regularizer(o.weight), o_(std::move(o)) {}
  at::Tensor compute(const isp::LossInputs& in) override {
    const bool official = o_.counting == "official";
    const at::Tensor& r = official ? isp::require_input(in.flops_ratio_official, term(), "the official FLOPs ratio")
                                   : isp::require_input(in.flops_ratio, term(), "the FLOPs ratio");
    if (o_.mode == "log_ratio") return at::log(at::clamp_min(r, o_.target) / o_.target);
    const at::Tensor& r_final =
        official ? isp::require_input(in.final_flops_ratio_official, term(), "the extracted architecture's official FLOPs ratio")
                 : isp::require_input(in.final_flops_ratio, term(), "the extracted architecture's FLOPs ratio");
    if (!lambda_.defined()) lambda_ = at::full({}, o_.initial_multiplier, r.options().dtype(at::kDouble));
    if (lambda_.device() != r.device()) lambda_ = lambda_.to(r.device());
    at::Tensor term = lambda_.to(r.scalar_type()) * (r - o_.target);
    // Dual ascent, on the device (no host read inside a step).
    at::Tensor next = at::clamp_min(lambda_ + o_.dual_lr * (r_final.detach().to(at::kDouble) - o_.target), 0.0);
    lambda_.copy_(next);
    return term;
  }
  std::string term() const override { return "flops"; }
  std::optional<isp::FlopsBudgetSpec> flops_budget() const override {
    return isp::FlopsBudgetSpec{o_.target, o_.counting == "official"};
  }
  std::vector<std::pair<std::string, at::Tensor>> state() override {
    if (o_.mode != "lagrangian") return {};
    if (!lambda_.defined()) lambda_ = at::full({}, o_.initial_multiplier, at::TensorOptions().dtype(at::kDouble));
    return {{"lambda", lambda_}};
  }
  std::vector<std::pair<std::string, at::Tensor>> diagnostics() const override {
    if (o_.mode != "lagrangian" || !lambda_.defined()) return {};
    return {{"flops_lambda", lambda_}};
  }
 private:
  FlopsBudgetOptions o_;
  at::Tensor lambda_;
};
std::shared_ptr<isp::Regularizer> make(const FlopsBudgetOptions& o, isp::BuildContext&) {
  return std::make_shared<FlopsBudget>(o);
}
}  // namespace

ISP_PLUGIN("0.1.0");
ISP_REGISTER(isp::Regularizer, "FlopsBudget", 1, FlopsBudgetOptions, make,
             "FLOPs budget: Lagrangian (dual ascent, default) or R_res = log(max(r, p)/p)");
