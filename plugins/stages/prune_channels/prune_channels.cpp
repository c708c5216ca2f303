// Stage "PruneChannels" (isp-spec §1d, §3.3): learn per-channel gates so the gated classifier keeps the
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

#include <filesystem>
#include <fstream>
#include <limits>
#include <optional>

#include "isp/checkpoint.h"
#include "isp/cost.h"
#include "isp/data.h"
#include "isp/interfaces/pruner.h"
#include "isp/interfaces/regularizer.h"
#include "isp/interfaces/stage.h"
#include "isp/plugin.h"
#include "isp/recipe.h"
#include "isp/registry.h"
#include "isp/selector.h"
#include "isp/train.h"

namespace fs = std::filesystem;

namespace {

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
  template <class V> void visit(V& v) {
    v("classifier", classifier, "the trained backbone to prune", isp::required(), isp::of_kind("backbone"));
    v("selector", selector, "the TrainSelector stage whose selector steers pruning (null: no interpretation term)",
      isp::of_kind("stage"));
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
  }
};

class PruneChannels : public isp::Stage {
 public:
  PruneChannels(PruneOptions o, isp::BuildContext& ctx) : o_(std::move(o)), ctx_(ctx) {
    node_ = isp::BuildContext::ref_name(o_.classifier.spec);
    if (node_.empty()) throw isp::RecipeError(o_.classifier.where, "expected {\"$ref\": <backbone node>} (the network is rebuilt by name)");
    classifier_ = ctx.get<isp::Backbone>(o_.classifier);
    pruner_ = ctx.get<isp::Pruner>(o_.pruner);
    data_ = ctx.get<isp::Dataset>(o_.data);
    if (!o_.selector.empty()) {
      auto stage = ctx.get<isp::Stage>(o_.selector);
      selector_ = std::dynamic_pointer_cast<isp::SelectorNet>(stage->model());
      if (!selector_) throw isp::RecipeError(o_.selector.where, "this stage provides no selector (expected a TrainSelector node)");
    }
    cost_ = std::make_unique<isp::CostModel>(classifier_->layer_shapes(), classifier_->gated_layers());
    for (std::size_t i = 0; i < o_.regularizers.size(); ++i) {
      const isp::NodeRef& ref = o_.regularizers[i];
      auto reg = ctx.get<isp::Regularizer>(ref);
      regs_.push_back(reg);
      // Errors point at the regularizer's own node when it is a $ref, else at the inline spec.
      const std::string name = isp::BuildContext::ref_name(ref.spec);
      auto where = [&](const std::string& key) { return name.empty() ? ref.where.child(key) : ctx.where("/nodes/" + name + "/" + key); };
      if (reg->needs_selector() && !selector_)
        throw isp::RecipeError(where("type"), "the '" + reg->term() + "' term needs a selector, but " +
                                                  o_.selector.where.str() + " names none");
      if (reg->needs_rbf_parameters() && !selector_->head->predicts_rbf_parameters())
        throw isp::RecipeError(where("mode"), "compares RBF parameters, but the selector's mask head predicts none; use "
                                              "mode \"map\" or an RBF head");
      if (auto b = reg->flops_budget()) {
        if (budget_) throw isp::RecipeError(where("type"), "a second FLOPs-budget term; one budget per stage");
        // A term that can never be active: the unpruned network already meets it.
        const double full = b->official_counting ? official_ratio_of(full_widths()) : 1.0;
        if (b->target >= full)
          throw isp::RecipeError(where("target"), "this budget is met by the unpruned network (its " +
                                                      std::string(b->official_counting ? "official" : "whole-network") +
                                                      " FLOPs ratio is " + std::to_string(full) +
                                                      "), so the term is never active; set a target below that");
        budget_ = b;
        budget_where_ = where("target");
      }
    }
    // A one-shot pruner learns nothing, so loss terms are not used; its own target is the budget.
    if (!pruner_->learns_gates()) {
      budget_.reset();
      budget_where_ = isp::Where{};
      if (pruner_->flops_target()) budget_ = isp::FlopsBudgetSpec{*pruner_->flops_target(), false};
    }
  }

  std::shared_ptr<torch::nn::Module> model() override { return pruned_; }
  isp::json outputs() const override { return arch_; }

  void run(isp::RunContext& ctx) override {
    const auto& data = data_->data();
    torch::Device dev = ctx.device;
    classifier_->to(dev);
    if (selector_) selector_->to(dev);
    const double t_start = isp::now_seconds();
    isp::Classifier cls{classifier_.get(), [m = classifier_.get()](const at::Tensor& x) { return m->forward(x); }};
    classifier_->set_gates(at::Tensor());
    const isp::EvalResult baseline = isp::evaluate_classifier(cls, data.test, o_.eval_batch_size, dev);

    // Pruning subset (no augmentation) and the reference selector outputs of the unpruned model.
    const isp::ImageSplit subset = pruning_subset();
    at::Tensor ref_params, ref_readable, ref_maps;
    if (selector_) std::tie(ref_params, ref_readable, ref_maps) = selector_outputs(subset, dev);

    if (o_.seed > 0) torch::manual_seed(static_cast<uint64_t>(o_.seed));
    pruner_->attach(*classifier_, *cost_);
    pruner_->to(dev);
    std::vector<std::pair<std::string, bool>> frozen;
    for (auto& p : classifier_->named_parameters()) frozen.emplace_back(p.key(), p.value().requires_grad()), p.value().set_requires_grad(false);
    if (selector_) for (auto& p : selector_->parameters()) p.set_requires_grad(false);

    const double max_ratio = o_.max_flops_ratio > 0 ? o_.max_flops_ratio
                             : budget_               ? budget_->target + o_.budget_tolerance
                                                     : 1.0;
    at::Tensor best_gates;
    isp::json selected_line;
    if (pruner_->learns_gates()) {
      torch::optim::AdamW opt(pruner_->parameters(), torch::optim::AdamWOptions(o_.lr).weight_decay(o_.weight_decay));
      isp::BatchLoader loader(subset, o_.batch_size, true, isp::Augmentation{}, dev);
      isp::TrainLoopSpec spec;
      spec.epochs = o_.epochs;
      spec.eval_every = o_.eval_every;
      spec.max_steps_per_epoch = o_.max_steps_per_epoch;
      spec.metrics = {"loss"};
      for (const auto& r : regs_) spec.metrics.push_back(r->term());
      spec.metrics.push_back("flops_ratio");
      spec.metrics.push_back("deterministic_flops_ratio");
      std::size_t n_diag = 0;
      for (const auto& r : regs_) {
        r->state();  // creates the term's state, so its diagnostics have names from the first step on
        for (const auto& d : r->diagnostics()) spec.metrics.push_back(d.first), ++n_diag;
      }
      isp::TrainLoopHooks hooks;
      hooks.start_epoch = [&](int64_t) {
        set_bn_mode();
        return isp::json{{"lr", o_.lr}};
      };
      // Everything stays on the device: gate noise, the FLOPs terms and the interpretation term are batched
      // tensor ops, and nothing is read back inside a step.
      hooks.step = [&](const isp::Batch& b) {
        at::Tensor x = b.x.to(dev), y = b.y.to(dev), bi = b.index.to(dev);
        isp::LossInputs in;
        classifier_->set_gates(pruner_->soft_gates());
        isp::BackboneFeatures f = classifier_->forward_features(x);
        in.logits = f.logits;
        in.labels = y;
        if (selector_) {
          auto scales = f.scales;
          scales.back() = selector_->filter->forward(scales.back(), y);
          isp::MaskDistribution d = selector_->head->forward(selector_->decoder->forward(scales));
          in.params = d.params;
          in.readable = d.readable;
          in.probs = d.probs;
          in.params_ref = ref_params.index_select(0, bi);
          in.readable_ref = ref_readable.index_select(0, bi);
          in.maps_ref = ref_maps.index_select(0, bi);
        }
        // A separate hard straight-through sample drives the FLOPs term (isp-spec §3.3).
        at::Tensor kept = cost_->kept_per_layer(pruner_->hard_gates());
        in.flops_ratio = cost_->flops(kept) / cost_->full_flops();
        in.flops_ratio_official = cost_->official_flops_ratio(kept);
        // The deterministic architecture the stage would extract now (before projection), as tensors.
        at::Tensor final_kept = cost_->kept_per_layer(pruner_->keep_scores().detach().ge(0).to(kept.scalar_type())).clamp_min(1);
        in.final_flops_ratio = cost_->flops(final_kept) / cost_->full_flops();
        in.final_flops_ratio_official = cost_->official_flops_ratio(final_kept);
        at::Tensor loss = torch::zeros({}, x.options());
        std::vector<at::Tensor> parts{at::Tensor()};
        for (auto& r : regs_) {
          at::Tensor term = r->compute(in);
          loss = loss + r->weight() * term;
          parts.push_back(term.detach().reshape({}));
        }
        parts.push_back(in.flops_ratio.detach().reshape({}).to(loss.dtype()));
        parts.push_back(in.final_flops_ratio.detach().reshape({}).to(loss.dtype()));
        for (const auto& r : regs_)
          for (const auto& d : r->diagnostics()) parts.push_back(d.second.detach().clone().reshape({}).to(loss.dtype()));
        parts[0] = loss.detach();
        opt.zero_grad();
        loss.backward();
        opt.step();
        return torch::stack(parts);
      };
      (void)n_diag;
      hooks.checkpoint(*pruner_, opt, "pruner");
      // The terms' own state (e.g. the Lagrange multiplier) travels with the checkpoint, restored in place.
      hooks.save = [&, base = hooks.save](isp::CheckpointWriter& w) {
        base(w);
        for (std::size_t i = 0; i < regs_.size(); ++i)
          for (const auto& [name, t] : regs_[i]->state()) w.tensor("regularizer" + std::to_string(i) + "." + name, t);
      };
      hooks.load = [&, base = hooks.load](isp::CheckpointReader& r) {
        base(r);
        for (std::size_t i = 0; i < regs_.size(); ++i)
          for (auto& [name, t] : regs_[i]->state()) {
            const std::string key = "regularizer" + std::to_string(i) + "." + name;
            if (r.has(key)) t.copy_(r.tensor(key));
          }
      };
      at::Tensor evaluated_gates;
      hooks.evaluate = [&](int64_t) {
        isp::json line;
        evaluated_gates = candidate(line).to(dev);
        line["val_top1_gated"] = evaluate_candidate(evaluated_gates, data.val.size() ? data.val : subset, subset, dev);
        return line;
      };
      // Model selection on the validation split among the architectures within max_ratio; until one is, the
      // cheapest architecture seen so far is kept. As a score: any candidate (2 + accuracy) beats every
      // architecture that is not one (negative).
      // With a budget, the architecture must also be one the gates learned, not mostly the projection's: its
      // ratio before projection within candidate_slack of the target (else the closest one so far is kept).
      hooks.score = [&](const isp::json& line, int64_t epoch) {
        if (epoch + 1 <= o_.select_after_epoch) return -std::numeric_limits<double>::infinity();
        const double ratio = line["final_flops_ratio"].get<double>();
        if (ratio > max_ratio) return -1.0 - ratio;
        if (budget_) {
          const double det = line["deterministic_flops_ratio"].get<double>();
          if (det > budget_->target + o_.candidate_slack) return -det;
        }
        return 2.0 + line["val_top1_gated"].get<double>();
      };
      hooks.save_best = [&](isp::CheckpointWriter& w) { w.tensor("gates", evaluated_gates); };
      const isp::TrainLoopResult res = isp::run_train_loop(spec, hooks, loader, ctx);
      if (res.best_epoch > 0) {
        isp::CheckpointReader best(res.best_path);
        best_gates = best.tensor("gates").to(dev);
        selected_line = best.meta().value("metrics", isp::json::object());
      } else {
        best_gates = candidate(selected_line).to(dev);
      }
      ctx.summary["pruning_images_per_s"] = static_cast<double>(res.images_seen) / std::max(1e-9, res.train_seconds);
      ctx.summary["selected_epoch"] = res.best_epoch;
    } else {
      best_gates = pruner_->final_gates().to(dev);
    }
    classifier_->set_gates(at::Tensor());
    for (auto& [name, rg] : frozen) classifier_->named_parameters()[name].set_requires_grad(rg);
    if (selector_) for (auto& p : selector_->parameters()) p.set_requires_grad(true);

    {
      isp::CheckpointWriter w;
      w.tensor("gates", best_gates);
      w.meta({{"recipe", ctx.resolved_recipe}});
      w.save_atomic(ctx.stage_dir + "/gates.pt");
    }
    extract(best_gates, dev, /*recalibrate=*/false);
    isp::Classifier pc{pruned_.get(), [m = pruned_.get()](const at::Tensor& x) { return m->forward(x); }};
    const isp::EvalResult pruned_frozen_bn = isp::evaluate_classifier(pc, data.test, o_.eval_batch_size, dev);
    recalibrate(dev);
    const isp::EvalResult pruned = isp::evaluate_classifier(pc, data.test, o_.eval_batch_size, dev);
    const isp::EvalResult pruned_val = data.val.size() ? isp::evaluate_classifier(pc, data.val, o_.eval_batch_size, dev) : isp::EvalResult{};
    auto before = cost_->count(), after = isp::CostModel(pruned_->layer_shapes(), pruned_->gated_layers()).count();
    ctx.summary["baseline_top1"] = baseline.top1;
    ctx.summary["pruned_top1"] = pruned.top1;
    ctx.summary["pruned_top1_unpruned_bn_stats"] = pruned_frozen_bn.top1;
    ctx.summary["bn_recalibration_images"] = std::min<int64_t>(o_.bn_recalibration_images, subset.size());
    ctx.summary["pruned_val_top1"] = pruned_val.top1;
    ctx.summary["flops_before"] = before.flops;
    ctx.summary["flops_after"] = after.flops;
    ctx.summary["params_before"] = before.params;
    ctx.summary["params_after"] = after.params;
    ctx.summary["flops_reduction"] = 1.0 - after.flops / before.flops;
    ctx.summary["params_reduction"] = 1.0 - after.params / before.params;
    ctx.summary["flops_ratio"] = after.flops / before.flops;
    ctx.summary["kept_widths"] = arch_["widths"];
    ctx.summary["full_widths"] = arch_["full_widths"];
    ctx.summary["pruning_subset"] = subset.size();
    for (const char* k : {"expected_flops_ratio", "deterministic_flops_ratio", "projection_threshold"})
      if (selected_line.contains(k)) ctx.summary[std::string("selected_") + k] = selected_line[k];
    report_budget(ctx, widths_of(best_gates));
    ctx.summary["prune_seconds"] = isp::now_seconds() - t_start;
    isp::write_file_atomic(ctx.stage_dir + "/architecture.json", arch_.dump(2) + "\n");
  }

  void restore(isp::RunContext& ctx) override {
    isp::CheckpointReader r(ctx.stage_dir + "/gates.pt");
    extract(r.tensor("gates").to(ctx.device), ctx.device, /*recalibrate=*/true);
  }

 private:
  std::vector<int64_t> full_widths() const {
    std::vector<int64_t> w;
    for (const auto& l : classifier_->gated_layers()) w.push_back(l.width);
    return w;
  }
  double official_ratio_of(const std::vector<int64_t>& widths) const {
    return cost_->official_flops_ratio(at::tensor(widths, at::kFloat)).item<double>();
  }
  // The ratio the budget is stated in (whole network unless the budget counts officially).
  double budget_ratio_of(const std::vector<int64_t>& widths) const {
    if (budget_ && budget_->official_counting) return official_ratio_of(widths);
    return cost_->count(widths).flops / cost_->full_flops();
  }

  std::vector<int64_t> widths_of(const at::Tensor& gates) const {
    at::Tensor k = cost_->kept_per_layer(gates.to(at::kFloat)).cpu();
    std::vector<int64_t> w;
    for (int64_t i = 0; i < k.numel(); ++i) w.push_back(std::max<int64_t>(1, static_cast<int64_t>(std::llround(k[i].item<double>()))));
    return w;
  }

  // The architecture the stage would extract now: the pruner's final rule, projected onto the budget. Fills
  // `line` with the ratios before and after projection and the expected ratio of the noisy gates.
  at::Tensor candidate(isp::json& line) {
    torch::NoGradGuard ng;
    at::Tensor det = pruner_->final_gates().cpu();
    const double det_ratio = cost_->count(widths_of(det)).flops / cost_->full_flops();
    line["deterministic_flops_ratio"] = det_ratio;
    if (at::Tensor p = pruner_->keep_probabilities(); p.defined())
      line["expected_flops_ratio"] = (cost_->flops(cost_->kept_per_layer(p.to(at::kFloat).cpu())) / cost_->full_flops()).item<double>();
    at::Tensor gates = det;
    at::Tensor scores = pruner_->keep_scores();
    if (budget_ && o_.budget_projection == "to_target" && scores.defined()) {
      double threshold = 0;
      gates = project_to_budget(scores.detach().to(at::kFloat).cpu(), budget_->target, &threshold);
      line["projection_threshold"] = threshold;
    }
    line["final_flops_ratio"] = cost_->count(widths_of(gates)).flops / cost_->full_flops();
    if (budget_ && budget_->official_counting) line["final_flops_ratio_official"] = official_ratio_of(widths_of(gates));
    return gates;
  }

  // The largest architecture that keeps channels in order of `scores` (each layer's best channel always kept)
  // and whose budget ratio is <= target. Ratio is monotone in the number kept, so a binary search finds it.
  // `threshold` receives the score of the last channel kept (0 = the final rule's own threshold). If even the
  // one-channel-per-layer floor is over the target, the floor is returned (and the budget is reported missed).
  at::Tensor project_to_budget(const at::Tensor& scores, double target, double* threshold) const {
    const auto layers = classifier_->gated_layers();
    const int64_t n = scores.numel();
    at::Tensor forced = at::zeros({n}, at::kFloat);
    int64_t off = 0;
    for (const auto& l : layers) {
      forced[off + scores.narrow(0, off, l.width).argmax().item<int64_t>()] = 1.0;
      off += l.width;
    }
    at::Tensor order = std::get<1>(scores.sort(/*dim=*/0, /*descending=*/true));
    auto gates_with = [&](int64_t k) {
      at::Tensor g = forced.clone();
      if (k > 0) g.index_fill_(0, order.narrow(0, 0, k), 1.0);
      return g;
    };
    int64_t lo = 0, hi = n;  // invariant: gates_with(lo) fits (or lo = 0), gates_with(hi + 1) does not
    if (budget_ratio_of(widths_of(gates_with(n))) <= target) {
      lo = n;
    } else {
      while (lo < hi) {
        const int64_t mid = (lo + hi + 1) / 2;
        if (budget_ratio_of(widths_of(gates_with(mid))) <= target) lo = mid;
        else hi = mid - 1;
      }
    }
    if (threshold) *threshold = lo > 0 ? scores[order[lo - 1].item<int64_t>()].item<double>() : 0.0;
    return gates_with(lo);
  }

  void report_budget(isp::RunContext& ctx, const std::vector<int64_t>& widths) {
    if (!budget_) return;
    const double achieved = budget_ratio_of(widths);
    const bool met = achieved <= budget_->target + o_.budget_tolerance;
    ctx.summary["budget_target"] = budget_->target;
    ctx.summary["budget_counting"] = budget_->official_counting ? "official" : "whole_network";
    ctx.summary["budget_achieved"] = achieved;
    ctx.summary["budget_tolerance"] = o_.budget_tolerance;
    ctx.summary["budget_met"] = met;
    ctx.summary["on_budget_miss"] = o_.on_budget_miss;
    if (met) return;
    char buf[320];
    std::snprintf(buf, sizeof buf, "FLOPs budget missed: the pruned network keeps %.4f of the %s FLOPs, target %.4f (%s)",
                  achieved, budget_->official_counting ? "official" : "whole-network", budget_->target,
                  budget_where_.file.empty() ? "the pruner's target_flops_ratio" : budget_where_.str().c_str());
    std::fprintf(stderr, "[%s] WARNING: %s\n", ctx.stage_name.c_str(), buf);
    if (o_.on_budget_miss == "error") ctx.summary["run_failure"] = buf;
  }

  isp::ImageSplit pruning_subset() const {
    const auto& data = data_->data();
    int64_t n_sub = std::max<int64_t>(1, static_cast<int64_t>(o_.subset_fraction * data.train.size()));
    auto idx = isp::stratified_indices(data.train.labels, n_sub, static_cast<uint64_t>(o_.subset_seed));
    auto it = at::tensor(idx, at::kLong);
    return isp::ImageSplit{data.train.images.index_select(0, it), data.train.labels.index_select(0, it)};
  }

  void set_bn_mode() {
    // frozen: the whole network in eval mode, BN uses the unpruned statistics (official, §6.20).
    classifier_->eval();
    if (o_.bn_policy == "batch") classifier_->train();
    if (selector_) selector_->eval();
  }

  // Validation top-1 of a candidate: extracted on a copy, BN statistics re-estimated on the pruning subset.
  // The classifier is not touched, and the training noise does not depend on whether candidates are scored.
  double evaluate_candidate(const at::Tensor& gates, const isp::ImageSplit& split, const isp::ImageSplit& calib,
                            torch::Device dev) {
    isp::CpuRngGuard rng;
    auto ex = isp::extract_pruned(*classifier_, gates, ctx_, node_);
    ex.model->to(dev);
    isp::Classifier c{ex.model.get(), [m = ex.model.get()](const at::Tensor& x) { return m->forward(x); }};
    if (o_.bn_recalibration_images > 0)
      isp::recalibrate_batchnorm(c, calib, o_.bn_recalibration_images, o_.eval_batch_size, dev);
    ex.model->eval();
    return isp::evaluate_classifier(c, split, o_.eval_batch_size, dev).top1;
  }

  std::tuple<at::Tensor, at::Tensor, at::Tensor> selector_outputs(const isp::ImageSplit& split, torch::Device dev) {
    torch::NoGradGuard ng;
    classifier_->eval();
    selector_->eval();
    isp::BatchLoader loader(split, o_.eval_batch_size, false, isp::Augmentation{}, dev);
    loader.start_epoch(0, 0);
    std::vector<at::Tensor> p, r, m;
    for (int64_t i = 0; i < loader.num_batches(); ++i) {
      isp::Batch b = loader.get(i);
      auto d = selector_->forward(b.x.to(dev), b.y.to(dev), false);
      p.push_back(d.params.defined() ? d.params : torch::zeros({b.size(), 0}, b.x.options().device(dev)));
      r.push_back(d.readable.defined() ? d.readable : torch::zeros({b.size(), 0}, b.x.options().device(dev)));
      m.push_back(d.probs);
    }
    return {torch::cat(p), torch::cat(r), torch::cat(m)};
  }

  void recalibrate(torch::Device dev) {
    if (o_.bn_recalibration_images <= 0) return;
    isp::CpuRngGuard rng;
    isp::Classifier pc{pruned_.get(), [m = pruned_.get()](const at::Tensor& x) { return m->forward(x); }};
    isp::recalibrate_batchnorm(pc, pruning_subset(), o_.bn_recalibration_images, o_.eval_batch_size, dev);
  }

  // The physically smaller network; with `recalibrate` its BN statistics are re-estimated as in run(), so a
  // restored stage hands on exactly the network a continuous run did.
  void extract(const at::Tensor& gates, torch::Device dev, bool recalibrate_bn) {
    {
      isp::CpuRngGuard rng;
      auto ex = isp::extract_pruned(*classifier_, gates, ctx_, node_);
      pruned_ = ex.model;
      pruned_->to(dev);
      std::vector<int64_t> widths;
      for (const auto& k : ex.kept_indices) widths.push_back(static_cast<int64_t>(k.size()));
      isp::json layers = isp::json::array();
      auto gl = classifier_->gated_layers();
      for (std::size_t l = 0; l < gl.size(); ++l)
        layers.push_back({{"name", gl[l].name}, {"width", gl[l].width}, {"kept", ex.kept_indices[l]}});
      arch_ = {{"backbone_node", node_}, {"spec", ex.spec}, {"widths", widths}, {"full_widths", full_widths()}, {"layers", layers}};
    }
    if (recalibrate_bn) recalibrate(dev);
  }

  PruneOptions o_;
  isp::BuildContext& ctx_;
  std::string node_;
  std::shared_ptr<isp::Backbone> classifier_, pruned_;
  std::shared_ptr<isp::Pruner> pruner_;
  std::shared_ptr<isp::Dataset> data_;
  std::shared_ptr<isp::SelectorNet> selector_;
  std::vector<std::shared_ptr<isp::Regularizer>> regs_;
  std::unique_ptr<isp::CostModel> cost_;
  std::optional<isp::FlopsBudgetSpec> budget_;
  isp::Where budget_where_;
  isp::json arch_ = isp::json::object();
};

std::shared_ptr<isp::Stage> make(const PruneOptions& o, isp::BuildContext& ctx) { return std::make_shared<PruneChannels>(o, ctx); }

}  // namespace

ISP_PLUGIN("0.1.0");
ISP_REGISTER(isp::Stage, "PruneChannels", 1, PruneOptions, make,
             "learn channel gates steered by the selector's RBF parameters and a FLOPs budget, then cut channels");
