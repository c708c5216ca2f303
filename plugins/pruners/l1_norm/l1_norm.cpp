// One-shot baselines at a FLOPs target: "L1NormPruner" (Li et al. 2017: keep the filters with the largest L1
// norm) and "RandomPruner" (the same allocation, random choice). Both share the width allocation, hence one
// folder: per-layer ("uniform": the same keep ratio in every gated layer) or global (rank layer-normalised
// scores across layers), searched so that whole-network FLOPs <= target_flops_ratio * full FLOPs.
#include <torch/torch.h>

#include <algorithm>
#include <numeric>

#include "isp/cost.h"
#include "isp/data.h"
#include "isp/interfaces/pruner.h"
#include "isp/registry/plugin.h"

namespace {

struct OneShotOptions {
  double target_flops_ratio = 0.5;
  std::string allocation = "uniform";
  int64_t seed = 0;
  template <class V> void visit(V& v) {
    v("target_flops_ratio", target_flops_ratio, "kept fraction of the whole network's FLOPs", isp::open_closed(0, 1));
    v("allocation", allocation, "uniform: same keep ratio per gated layer; global: rank scores across layers",
      isp::one_of({"uniform", "global"}));
    v("seed", seed, "RandomPruner: seed of the random scores", isp::at_least(0));
  }
};

// Per-channel L1 norm of the filters that produce each gated channel: the first conv (4-D) or linear (2-D)
// weight sliced on dim 0.
std::vector<at::Tensor> l1_scores(isp::Backbone& model) {
  auto params = model.named_parameters();
  std::vector<at::Tensor> out(model.gated_layers().size());
  for (const auto& g : model.channel_groups()) {
    for (const auto& s : g.slices) {
      const at::Tensor* t = params.find(s.param);
      if (t && s.dim == 0 && (t->dim() == 4 || t->dim() == 2)) {
        out[static_cast<std::size_t>(g.gate)] = t->detach().abs().flatten(1).sum(1).cpu().to(at::kDouble);
        break;
      }
    }
    if (!out[static_cast<std::size_t>(g.gate)].defined())
      throw isp::Error("L1NormPruner: gated layer " + std::to_string(g.gate) + " has no conv or linear weight sliced on dim 0");
  }
  return out;
}

class OneShotPruner : public isp::Pruner {
 public:
  OneShotPruner(OneShotOptions o, bool random) : o_(std::move(o)), random_(random) {}
  bool learns_gates() const override { return false; }
  std::optional<double> flops_target() const override { return o_.target_flops_ratio; }
  at::Tensor final_gates() override {
    if (!gates_.defined()) throw isp::Error("pruner used before attach()");
    return gates_;
  }

  void attach(isp::Backbone& model, const isp::CostModel& cost) override {
    auto layers = model.gated_layers();
    std::vector<at::Tensor> scores;
    if (random_) {
      at::Generator gen = at::detail::createCPUGenerator(isp::mix_seed(static_cast<uint64_t>(o_.seed), 77));
      for (const auto& l : layers) scores.push_back(at::rand({l.width}, gen, at::kDouble));
    } else {
      scores = l1_scores(model);
    }
    // Keep-count per layer as a function of one knob t in [0,1]; FLOPs are monotone in t, so bisect.
    std::vector<std::vector<int64_t>> order;  // channel indices by descending score
    std::vector<at::Tensor> normalised;
    for (auto& s : scores) {
      order.push_back(std::vector<int64_t>());
      auto idx = s.argsort(0, /*descending=*/true);
      for (int64_t i = 0; i < idx.numel(); ++i) order.back().push_back(idx[i].item<int64_t>());
      normalised.push_back(s / (s.max() + 1e-12));
    }
    auto widths_at = [&](double t) {
      std::vector<int64_t> w;
      for (std::size_t l = 0; l < layers.size(); ++l) {
        int64_t k = o_.allocation == "uniform"
                        ? static_cast<int64_t>(std::ceil(t * static_cast<double>(layers[l].width)))
                        : normalised[l].ge(1.0 - t).sum().item<int64_t>();
        w.push_back(std::clamp<int64_t>(k, 1, layers[l].width));
      }
      return w;
    };
    const double target = o_.target_flops_ratio * cost.full_flops();
    double lo = 0.0, hi = 1.0;
    for (int it = 0; it < 40; ++it) {
      double mid = 0.5 * (lo + hi);
      if (cost.count(widths_at(mid)).flops <= target) lo = mid;
      else hi = mid;
    }
    auto widths = widths_at(lo);
    gates_ = torch::zeros({model.total_gate_width()});
    int64_t off = 0;
    for (std::size_t l = 0; l < layers.size(); ++l) {
      for (int64_t j = 0; j < widths[l]; ++j) gates_[off + order[l][static_cast<std::size_t>(j)]] = 1.0;
      off += layers[l].width;
    }
  }

 private:
  OneShotOptions o_;
  bool random_;
  at::Tensor gates_;
};

std::shared_ptr<isp::Pruner> make_l1(const OneShotOptions& o, isp::BuildContext&) {
  return std::make_shared<OneShotPruner>(o, false);
}
std::shared_ptr<isp::Pruner> make_random(const OneShotOptions& o, isp::BuildContext&) {
  return std::make_shared<OneShotPruner>(o, true);
}

}  // namespace

ISP_PLUGIN("0.1.0");
ISP_REGISTER(isp::Pruner, "L1NormPruner", 1, OneShotOptions, make_l1,
             "Li et al. 2017: keep the largest-L1 filters at a whole-network FLOPs target");
ISP_REGISTER(isp::Pruner, "RandomPruner", 1, OneShotOptions, make_random,
             "random channels at the same FLOPs target and allocation as L1NormPruner");
