#pragma once
// Shared by the learned gate generators (header-only, compiled into each plugin): Gumbel-sigmoid gates
// sigma((theta + g + b) / T) with one Gumbel draw g on the logits' device (docs/method.md §2.4, supplement Eq. 15),
// hard straight-through samples, and the final architecture.
//
// The final rule. Under the training noise a channel is on iff theta + b + g >= 0 (the gate's sigmoid is
// >= 0.5), so with a standard Gumbel g its keep-probability is P = 1 - exp(-exp(theta + b)). The default rule
// "median" keeps a channel iff P >= 0.5, i.e. theta + b >= ln ln 2 (-0.3665): the architecture is the median
// of the distribution the FLOPs budget controlled. "zero" (theta + b >= 0, earlier isp versions) keeps a
// channel only when P >= 1 - 1/e = 0.63, which extracts a smaller net than the noisy gates had. "official"
// draws one fixed-seed noisy sample, as the official code's final gates (docs/method.md §6).
#include <ATen/ATen.h>
#include <ATen/CPUGeneratorImpl.h>

#include <cmath>
#include <string>
#include <vector>

#include "isp/interfaces/backbone.h"
#include "isp/registry/options.h"

namespace isp_pruners {

// The options every Gumbel-sigmoid gate generator has; generators derive their options from it.
struct GumbelGateOptions {
  double temperature = 0.4;
  double offset = 3.0;
  std::string final_rule = "median";
  int64_t official_seed = 0;
  template <class V> void visit_gumbel(V& v) {
    v("temperature", temperature, "Gumbel-sigmoid temperature T", isp::greater_than(0));
    v("offset", offset, "logit offset b (gates start mostly on)");
    v("final_rule", final_rule,
      "final architecture: median (keep iff keep-probability >= 0.5: theta + b >= ln ln 2; default), zero "
      "(theta + b >= 0), official (one noisy sample with official_seed)",
      isp::one_of({"median", "zero", "official"}));
    v("official_seed", official_seed, "seed of the noise of final_rule official", isp::at_least(0));
  }
};

// Score s per channel with the final rule "keep iff s >= 0" (see above); higher = keep first.
inline at::Tensor keep_scores(const at::Tensor& logits, const GumbelGateOptions& o) {
  at::Tensor a = logits + o.offset;
  if (o.final_rule == "median") return a - std::log(std::log(2.0));
  if (o.final_rule == "official") {
    at::Generator gen = at::detail::createCPUGenerator(static_cast<uint64_t>(o.official_seed));
    at::Tensor u = at::rand({logits.numel()}, gen, at::TensorOptions().dtype(at::kFloat));
    at::Tensor g = -at::log(-at::log(u + 1e-20) + 1e-20);
    return a + g.to(logits.device()).to(logits.scalar_type()).view(logits.sizes());
  }
  return a;
}
// P(theta + b + g >= 0) for a standard Gumbel g.
inline at::Tensor keep_probabilities(const at::Tensor& logits, double offset) {
  return -at::expm1(-at::exp(logits + offset));
}

inline at::Tensor gumbel_like(const at::Tensor& t) {
  at::Tensor u = at::rand_like(t);
  return -at::log(-at::log(u + 1e-20) + 1e-20);
}
inline at::Tensor soft_gates(const at::Tensor& logits, double offset, double temperature) {
  return at::sigmoid((logits + gumbel_like(logits) + offset) / temperature);
}
inline at::Tensor straight_through(const at::Tensor& soft) {
  at::Tensor hard = soft.ge(0.5).to(soft.scalar_type());
  return hard - soft.detach() + soft;
}
// 1[score >= 0]; a layer with nothing above the threshold keeps its strongest channel.
inline at::Tensor final_gates(const at::Tensor& scores, const std::vector<isp::GatedLayer>& layers) {
  at::Tensor score = scores.detach().cpu();
  at::Tensor g = score.ge(0).to(at::kFloat);
  int64_t off = 0;
  for (const auto& l : layers) {
    if (g.narrow(0, off, l.width).sum().item<double>() < 1.0) g[off + score.narrow(0, off, l.width).argmax().item<int64_t>()] = 1.0;
    off += l.width;
  }
  return g.to(scores.device());
}

}  // namespace isp_pruners
