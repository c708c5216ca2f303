#pragma once
// kind "regularizer": one weighted loss term. A stage fills the inputs it has; a term that needs an input the
// stage does not provide throws isp::Error naming it.
#include <optional>
#include <string>
#include <utility>
#include <vector>

#include <ATen/core/Tensor.h>

#include "isp/registry/options.h"

namespace isp {

struct LossInputs {
  at::Tensor mask;                  // sampled mask s [n,1,H,W]
  at::Tensor probs;                 // mask distribution P [n,1,H,W]
  at::Tensor params, params_ref;    // raw selector head outputs, gated model vs unpruned reference [n,k]
  at::Tensor readable, readable_ref;  // (c_row, c_col, sigma) of both
  at::Tensor maps, maps_ref;        // RBF maps of both [n,1,H,W]
  at::Tensor logits, labels;        // classifier logits and targets
  at::Tensor flops_ratio;           // differentiable FLOPs(kept)/FLOPs(full network), scalar
  at::Tensor flops_ratio_official;  // the official code's ratio (docs/method.md §3.3), scalar
  // The same two ratios for the deterministic architecture the stage would extract now (no gradient): what a
  // constrained budget formulation steers (dual ascent on r_final - p).
  at::Tensor final_flops_ratio, final_flops_ratio_official;
};

// What a FLOPs-budget term promises: the stage projects the extracted architecture onto it and reports
// whether it was met.
struct FlopsBudgetSpec {
  double target = 1.0;        // kept fraction of FLOPs
  bool official_counting = false;  // the official numerator (docs/method.md §3.3) instead of the whole network
};

class ISP_API Regularizer {
 public:
  static constexpr const char* kKind = "regularizer";
  // Every term has a weight (its default and meaning differ per term, so each options struct declares it).
  explicit Regularizer(double weight) : weight_(weight) {}
  virtual ~Regularizer();
  // The unweighted term.
  virtual at::Tensor compute(const LossInputs& in) = 0;
  double weight() const { return weight_; }
  virtual std::string term() const = 0;  // short name for logs: "area", "smoothness", "flops", ...
  // What the term needs from the stage, checked when the stage is built (a recipe error, not a run-time one):
  // a selector at all, and a mask head that predicts RBF parameters.
  virtual bool needs_selector() const { return false; }
  virtual bool needs_rbf_parameters() const { return false; }
  // A FLOPs-budget term says so (the stage then meets and checks the budget); others return nothing.
  virtual std::optional<FlopsBudgetSpec> flops_budget() const { return std::nullopt; }
  // Tensors the term updates itself while training (e.g. a Lagrange multiplier): saved in checkpoints and
  // restored in place (copy_) on resume, so an interrupted run continues exactly. Names are local to the term.
  virtual std::vector<std::pair<std::string, at::Tensor>> state() { return {}; }
  // Extra values for the progress line and metrics (read on the host only when a line is drawn).
  virtual std::vector<std::pair<std::string, at::Tensor>> diagnostics() const { return {}; }

 private:
  double weight_;
};

// Throws isp::Error("<term> needs <what>") when a required input is missing.
ISP_API const at::Tensor& require_input(const at::Tensor& t, const std::string& term, const std::string& what);

}  // namespace isp
