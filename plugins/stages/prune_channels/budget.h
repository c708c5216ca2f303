#pragma once
// The FLOPs budget of PruneChannels: the ratio it is stated in, projecting an architecture onto it, and the
// report of whether the pruned network keeps it.
#include <optional>
#include <string>
#include <vector>

#include "isp/cost.h"
#include "isp/interfaces/regularizer.h"
#include "isp/interfaces/stage.h"

namespace isp_prune {

class Budget {
 public:
  // channel_multiple > 1: every kept width is a multiple of it or the layer's full width (see project()).
  Budget(const isp::CostModel& cost, std::optional<isp::FlopsBudgetSpec> spec, isp::Where where, double tolerance,
         int64_t channel_multiple = 1)
      : cost_(cost), spec_(spec), where_(std::move(where)), tolerance_(tolerance), multiple_(channel_multiple) {}
  bool active() const { return spec_.has_value(); }
  const isp::FlopsBudgetSpec& spec() const { return *spec_; }
  const isp::Where& where() const { return where_; }
  // Kept channels per gated layer of a {0,1} gate vector (at least one per layer).
  std::vector<int64_t> widths_of(const at::Tensor& gates) const;
  double flops_ratio(const std::vector<int64_t>& widths) const;       // whole network
  double official_ratio(const std::vector<int64_t>& widths) const;    // the official numerator (method §3.3)
  double budget_ratio(const std::vector<int64_t>& widths) const;      // the ratio the budget is stated in
  // The largest architecture that keeps channels in order of `scores` (each layer's best channel always kept)
  // and whose budget ratio is <= the target. With a channel multiple m > 1, each layer's kept count is first
  // rounded up to a multiple of m (at most the layer's width) with that layer's next best channels, so every
  // layer keeps at least min(m, width). `threshold` receives the score of the last channel kept in global order.
  at::Tensor project(const at::Tensor& scores, double* threshold) const;
  // Writes budget_* keys into `summary`; on a miss warns and, with on_miss "error", sets run_failure.
  void report(isp::json& summary, const std::vector<int64_t>& widths, const std::string& on_miss,
              const std::string& stage_name) const;

 private:
  const isp::CostModel& cost_;
  std::optional<isp::FlopsBudgetSpec> spec_;
  isp::Where where_;
  double tolerance_;
  int64_t multiple_;
};

}  // namespace isp_prune
