#pragma once
// kind "regularizer": one weighted loss term. A stage fills the inputs it has; a term that needs an input the
// stage does not provide throws isp::Error naming it.
#include <string>

#include <ATen/core/Tensor.h>

#include "isp/options.h"

namespace isp {

struct LossInputs {
  at::Tensor mask;                  // sampled mask s [n,1,H,W]
  at::Tensor probs;                 // mask distribution P [n,1,H,W]
  at::Tensor params, params_ref;    // raw selector head outputs, gated model vs unpruned reference [n,k]
  at::Tensor readable, readable_ref;  // (c_row, c_col, sigma) of both
  at::Tensor maps, maps_ref;        // RBF maps of both [n,1,H,W]
  at::Tensor logits, labels;        // classifier logits and targets
  at::Tensor flops_ratio;           // differentiable FLOPs(kept)/FLOPs(full network), scalar
  at::Tensor flops_ratio_official;  // the official code's ratio (isp-spec §3.3), scalar
};

class ISP_API Regularizer {
 public:
  static constexpr const char* kKind = "regularizer";
  virtual ~Regularizer();
  // The unweighted term.
  virtual at::Tensor compute(const LossInputs& in) = 0;
  virtual double weight() const = 0;
  virtual std::string term() const = 0;  // short name for logs: "area", "smoothness", "flops", ...
};

// Throws isp::Error("<term> needs <what>") when a required input is missing.
ISP_API const at::Tensor& require_input(const at::Tensor& t, const std::string& term, const std::string& what);

}  // namespace isp
