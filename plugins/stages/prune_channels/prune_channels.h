#pragma once
// Stage "PruneChannels" (docs/method.md §1d, §3.3): learn per-channel gates so the gated classifier keeps the
// selector's saliency parameters while meeting a FLOPs budget, then cut the channels for real (§1e).
//   loss = sum_r w_r * term_r, with terms from `regularizers` (RbfParamDistance, FlopsBudget, CrossEntropyTerm)
// One-shot pruners (L1-norm, random) skip the optimisation.
//
// Budget. With a FLOPs-budget term (FlopsBudget) the stage promises an architecture at the target: gate
// learning steers towards it (dual ascent by default), and every candidate architecture is then projected onto
// the budget (`budget_projection: to_target`): channels are ranked by the pruner's keep score, and the final
// rule's threshold is moved until the architecture is the largest one whose FLOPs ratio is <= target. So the
// achieved ratio lands in [target - one channel's cost, target] whatever the classifier or CPU rounding, the
// FLOPs-only ablation and ISP are compared at the same FLOPs, and the report says how far the projection had to
// move the threshold. A missed budget (projection off, or a target below the one-channel-per-layer floor) is
// loud: a warning, `budget_met: false` in the summary and report, and `isp run` exits 4 unless
// `on_budget_miss` is "warn".
//
// Candidates. Every `eval_every` epochs the deterministic architecture is extracted on a copy, its BatchNorm
// statistics are re-estimated on `bn_recalibration_images` pruning images (adaptive BN), and it is scored on the
// validation split (never the test split); the best candidate at or under the budget is kept.
#include <torch/torch.h>

#include <limits>
#include <optional>

#include "budget.h"
#include "isp/artifacts.h"
#include "isp/data.h"
#include "isp/interfaces/pruner.h"
#include "isp/registry/plugin.h"

namespace isp_prune {

struct PruneOptions {
  isp::NodeRef classifier, selector, pruner, data;
  std::vector<isp::NodeRef> regularizers;
  double subset_fraction = 0.05;
  int64_t subset_seed = 0;
  int64_t epochs = 200;
  int64_t batch_size = 128;
  double lr = 1e-3;
  double weight_decay = 1e-3;
  std::string bn_policy = "frozen";
  int64_t eval_every = 1;
  int64_t select_after_epoch = 0;
  double max_flops_ratio = 0.0;
  std::string budget_projection = "to_target";
  double budget_tolerance = 0.005;
  double candidate_slack = 0.05;
  std::string on_budget_miss = "error";
  int64_t bn_recalibration_images = 512;
  int64_t seed = 0;
  int64_t eval_batch_size = 256;
  int64_t max_steps_per_epoch = 0;
  int64_t channel_multiple = 1;
  template <class V> void visit(V& v) {
    v("classifier", classifier, "the TrainClassifier stage whose network is pruned ({\"$ref\": stage})", isp::required(),
      isp::of_kind("stage"));
    v("selector", selector, "the TrainSelector stage whose explanation model steers pruning (null: no interpretation "
      "term)", isp::of_kind("stage"));
    v("pruner", pruner, "gate generator or one-shot pruner", isp::required(), isp::of_kind("pruner"));
    v("data", data, "dataset: the pruning subset is drawn from its train split", isp::required(), isp::of_kind("dataset"));
    v("regularizers", regularizers, "loss terms, each with its weight", isp::of_kind("regularizer"));
    v("subset_fraction", subset_fraction, "pruning subset: this fraction of the train split (official 5%)", isp::open_closed(0, 1));
    v("subset_seed", subset_seed, "seed of the (stratified) pruning subset", isp::at_least(0));
    v("epochs", epochs, "gate-learning epochs over the subset", isp::at_least(1));
    v("batch_size", batch_size, "mini-batch size", isp::at_least(1));
    v("lr", lr, "AdamW learning rate", isp::greater_than(0));
    v("weight_decay", weight_decay, "AdamW decoupled weight decay", isp::at_least(0));
    v("bn_policy", bn_policy, "frozen: BN uses the unpruned running statistics (official); batch: batch statistics",
      isp::one_of({"frozen", "batch"}));
    v("eval_every", eval_every, "evaluate the deterministic architecture on the validation split every N epochs", isp::at_least(1));
    v("select_after_epoch", select_after_epoch, "only architectures after this epoch are candidates (official 100)", isp::at_least(0));
    v("max_flops_ratio", max_flops_ratio,
      "only architectures whose FLOPs ratio is at most this are candidates (if none is, the cheapest one seen is "
      "taken); 0 = the budget's target + budget_tolerance (1 without a budget)", isp::between(0, 1));
    v("budget_projection", budget_projection,
      "to_target: move the final rule's threshold so the architecture is the largest at or under the budget; "
      "none: take the final rule as it is", isp::one_of({"to_target", "none"}));
    v("budget_tolerance", budget_tolerance, "the budget is met when the achieved ratio is <= target + this",
      isp::between(0, 1));
    v("candidate_slack", candidate_slack,
      "with a budget, an architecture is a candidate only once the learned gates themselves are near it: its ratio "
      "before projection is <= target + this (1 = any); until then the one closest to the budget is kept",
      isp::between(0, 1));
    v("on_budget_miss", on_budget_miss,
      "error: `isp run` exits 4 after writing the report and export when the budget is missed; warn: only warn",
      isp::one_of({"error", "warn"}));
    v("bn_recalibration_images", bn_recalibration_images,
      "adaptive BN: re-estimate BatchNorm statistics of each candidate (and of the extracted network) on this many "
      "pruning images before scoring it (0 = keep the unpruned statistics)", isp::at_least(0));
    v("seed", seed,
      "0: continue the run's random stream; > 0: reseed at the start of the stage (gate initialisation and noise), "
      "so repeated pruning runs over one shared classifier and AEM differ only here", isp::at_least(0));
    v("eval_batch_size", eval_batch_size, "evaluation batch size", isp::at_least(1));
    v("max_steps_per_epoch", max_steps_per_epoch, "cap steps per epoch (0 = all; smoke tests)", isp::at_least(0));
    v("channel_multiple", channel_multiple,
      "every kept width is a multiple of this or the layer's full width, chosen by the budget projection at the "
      "same FLOPs target (aligned widths run faster in oneDNN's and cuDNN's kernels; docs/performance.md); "
      "1 = any width (official). Needs a learned pruner and a FLOPs budget with budget_projection to_target",
      isp::between(1, 1024));
  }
};

class PruneChannels : public isp::Stage {
 public:
  PruneChannels(PruneOptions o, isp::BuildContext& ctx);

  const char* produces() const override { return isp::PrunedNetwork::kType; }

  void run(isp::RunContext& ctx) override;

  void restore(isp::RunContext& ctx) override;

 private:
  // The stage prunes its own copy of the classifier; the selector view shares the AEM's frozen filter, decoder
  // and head but encodes with that copy, so gates steer it.
  void take_inputs();

  // Checks the loss terms against the network and the selector, and sets up the cost model and the budget.
  // Called with the planned artifacts when the recipe is built, and again with the real ones.
  void check_terms(const isp::Backbone& net, const isp::SelectorNet* selector);

  at::Tensor learn_gates(const isp::ImageSplit& subset, isp::RunContext& ctx, isp::json& summary, isp::json& selected);

  // The architecture the stage would extract now: the pruner's final rule, projected onto the budget. Fills
  // `line` with the ratios before and after projection and the expected ratio of the noisy gates.
  at::Tensor candidate(isp::json& line);

  isp::ImageSplit pruning_subset() const;

  // Validation top-1 of a candidate: extracted on a copy, BN statistics re-estimated on the pruning subset.
  // The gated network is not touched, and the training noise does not depend on whether candidates are scored.
  double evaluate_candidate(const at::Tensor& gates, const isp::ImageSplit& split, const isp::ImageSplit& calib,
                            torch::Device dev);


  std::tuple<at::Tensor, at::Tensor, at::Tensor> selector_outputs(const isp::ImageSplit& split, torch::Device dev);

  void recalibrate(isp::Backbone& net, torch::Device dev);

  // The physically smaller network (weights inherited from the classifier).
  isp::ExtractedNetwork extract(const at::Tensor& gates, torch::Device dev);

  void publish_network(isp::ExtractedNetwork pruned, isp::json metrics, isp::RunContext& ctx);

  PruneOptions o_;
  isp::StageInput<isp::TrainedClassifier> classifier_in_;
  isp::StageInput<isp::ExplanationModel> selector_in_;
  std::shared_ptr<isp::Pruner> pruner_;
  std::shared_ptr<isp::Dataset> data_;
  std::string pruner_type_;
  std::vector<std::shared_ptr<isp::Regularizer>> regs_;
  std::vector<isp::Where> reg_where_;
  isp::Where where_;  // this stage's own spec, for errors about its options found after the build
  // Set by take_inputs():
  std::shared_ptr<const isp::TrainedClassifier> original_;
  std::shared_ptr<const isp::ExplanationModel> aem_;
  std::shared_ptr<isp::Backbone> gated_;
  std::shared_ptr<isp::SelectorNet> gated_selector_;
  std::unique_ptr<isp::CostModel> cost_;
  std::unique_ptr<Budget> budget_;
  at::Tensor ref_params_, ref_readable_, ref_maps_;
};

}  // namespace isp_prune
