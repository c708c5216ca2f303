#pragma once
// Shared by the learned gate generators (header-only, compiled into each plugin): Gumbel-sigmoid gates
// sigma((theta + g + b) / T) with one Gumbel draw g on the logits' device (isp-spec §2.4, supplement Eq. 15),
// hard straight-through samples, and the deterministic final architecture (threshold without noise).
#include <ATen/ATen.h>

#include <vector>

#include "isp/interfaces/backbone.h"
#include "isp/options.h"

namespace isp_pruners {

// The options every Gumbel-sigmoid gate generator has; generators derive their options from it.
struct GumbelGateOptions {
  double temperature = 0.4;
  double offset = 3.0;
  template <class V> void visit_gumbel(V& v) {
    v("temperature", temperature, "Gumbel-sigmoid temperature T", isp::greater_than(0));
    v("offset", offset, "logit offset b (gates start mostly on)");
  }
};

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
// 1[theta + b >= 0]; a layer with nothing above the threshold keeps its strongest channel.
inline at::Tensor final_gates(const at::Tensor& logits, double offset, const std::vector<isp::GatedLayer>& layers) {
  at::Tensor score = (logits.detach() + offset).cpu();
  at::Tensor g = score.ge(0).to(at::kFloat);
  int64_t off = 0;
  for (const auto& l : layers) {
    if (g.narrow(0, off, l.width).sum().item<double>() < 1.0) g[off + score.narrow(0, off, l.width).argmax().item<int64_t>()] = 1.0;
    off += l.width;
  }
  return g.to(logits.device());
}

}  // namespace isp_pruners
