// Budget projection: ranking channels by the pruner's keep score and moving the final rule's threshold until the
// architecture is the largest at or under the target. The ratio grows monotonically with the number of channels
// kept, so a binary search over that number finds it.
#include "budget.h"

#include <ATen/ATen.h>

#include <algorithm>
#include <cmath>
#include <cstdio>

namespace isp_prune {

std::vector<int64_t> Budget::widths_of(const at::Tensor& gates) const {
  at::Tensor k = cost_.kept_per_layer(gates.to(at::kFloat)).cpu();
  std::vector<int64_t> w;
  for (int64_t i = 0; i < k.numel(); ++i)
    w.push_back(std::max<int64_t>(1, static_cast<int64_t>(std::llround(k[i].item<double>()))));
  return w;
}

double Budget::flops_ratio(const std::vector<int64_t>& widths) const {
  return cost_.count(widths).flops / cost_.full_flops();
}

double Budget::official_ratio(const std::vector<int64_t>& widths) const {
  return cost_.official_flops_ratio(at::tensor(widths, at::kFloat)).item<double>();
}

double Budget::budget_ratio(const std::vector<int64_t>& widths) const {
  return spec_ && spec_->official_counting ? official_ratio(widths) : flops_ratio(widths);
}

at::Tensor Budget::project(const at::Tensor& scores, double* threshold) const {
  const auto& layers = cost_.gated();
  const int64_t n = scores.numel();
  at::Tensor forced = at::zeros({n}, at::kFloat);
  int64_t off = 0;
  for (const auto& l : layers) {
    forced[off + scores.narrow(0, off, l.width).argmax().item<int64_t>()] = 1.0;
    off += l.width;
  }
  at::Tensor order = std::get<1>(scores.sort(/*dim=*/0, /*descending=*/true)).contiguous();
  // Each layer's channels by descending score (global channel indices), for rounding kept counts up: the global
  // order filtered per layer, so rounding and thresholding rank channels, ties included, the same way.
  std::vector<std::vector<int64_t>> layer_order;
  if (multiple_ > 1) {
    std::vector<std::size_t> layer_of(static_cast<std::size_t>(n));
    off = 0;
    for (std::size_t li = 0; li < layers.size(); ++li) {
      std::fill_n(layer_of.begin() + off, layers[li].width, li);
      off += layers[li].width;
    }
    layer_order.resize(layers.size());
    const int64_t* op = order.data_ptr<int64_t>();
    for (int64_t r = 0; r < n; ++r) layer_order[layer_of[static_cast<std::size_t>(op[r])]].push_back(op[r]);
  }
  // Kept counts only grow with k, and so do the rounded ones: the budget ratio stays monotone in k.
  auto gates_with = [&](int64_t k) {
    at::Tensor g = forced.clone();
    if (k > 0) g.index_fill_(0, order.narrow(0, 0, k), 1.0);
    if (multiple_ > 1) {
      float* gp = g.data_ptr<float>();
      int64_t start = 0;
      for (std::size_t li = 0; li < layers.size(); ++li) {
        const int64_t width = layers[li].width;
        int64_t kept = 0;
        for (int64_t c = 0; c < width; ++c) kept += gp[start + c] > 0.5f;
        const int64_t want = std::min(width, (kept + multiple_ - 1) / multiple_ * multiple_);
        for (int64_t c : layer_order[li]) {
          if (kept >= want) break;
          if (gp[c] <= 0.5f) gp[c] = 1.0f, ++kept;
        }
        start += width;
      }
    }
    return g;
  };
  const double target = spec_->target;
  int64_t lo = 0, hi = n;  // invariant: gates_with(lo) fits (or lo = 0), gates_with(hi + 1) does not
  if (budget_ratio(widths_of(gates_with(n))) <= target) {
    lo = n;
  } else {
    while (lo < hi) {
      const int64_t mid = (lo + hi + 1) / 2;
      if (budget_ratio(widths_of(gates_with(mid))) <= target) lo = mid;
      else hi = mid - 1;
    }
  }
  if (threshold) *threshold = lo > 0 ? scores[order[lo - 1].item<int64_t>()].item<double>() : 0.0;
  return gates_with(lo);
}

void Budget::report(isp::json& summary, const std::vector<int64_t>& widths, const std::string& on_miss,
                    const std::string& stage_name) const {
  if (!spec_) return;
  const double achieved = budget_ratio(widths);
  const bool met = achieved <= spec_->target + tolerance_;
  summary["budget_target"] = spec_->target;
  summary["budget_counting"] = spec_->official_counting ? "official" : "whole_network";
  summary["budget_achieved"] = achieved;
  summary["budget_tolerance"] = tolerance_;
  summary["budget_met"] = met;
  summary["on_budget_miss"] = on_miss;
  if (met) return;
  char buf[320];
  std::snprintf(buf, sizeof buf, "FLOPs budget missed: the pruned network keeps %.4f of the %s FLOPs, target %.4f (%s)",
                achieved, spec_->official_counting ? "official" : "whole-network", spec_->target,
                where_.file.empty() ? "the pruner's target_flops_ratio" : where_.str().c_str());
  std::fprintf(stderr, "[%s] WARNING: %s\n", stage_name.c_str(), buf);
  if (on_miss == "error") summary["run_failure"] = buf;
}

}  // namespace isp_prune
