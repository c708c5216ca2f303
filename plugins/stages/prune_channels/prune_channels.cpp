// Stage "PruneChannels" (isp-spec §1d, §3.3): learn per-channel gates so the gated classifier keeps the
// selector's saliency parameters while meeting a FLOPs budget, then cut the channels for real (§1e).
//   loss = sum_r w_r * term_r, with terms from `regularizers` (RbfParamDistance, FlopsBudget, CrossEntropyTerm)
// One-shot pruners (L1-norm, random) skip the optimisation. The final architecture is deterministic (gates
// thresholded without noise) and selected on the validation split, never the test split.
#include <torch/torch.h>

#include <filesystem>
#include <fstream>
#include <limits>

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
  double max_flops_ratio = 1.0;
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
      "only architectures whose whole-network FLOPs ratio is at most this are candidates (if none is, the cheapest one "
      "seen is taken)", isp::open_closed(0, 1));
    v("eval_batch_size", eval_batch_size, "evaluation batch size", isp::at_least(1));
    v("max_steps_per_epoch", max_steps_per_epoch, "cap steps per epoch (0 = all; smoke tests)", isp::at_least(0));
  }
};

isp::json vec_json(const std::vector<int64_t>& v) { return isp::json(v); }

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
    for (const auto& r : o_.regularizers) regs_.push_back(ctx.get<isp::Regularizer>(r));
    cost_ = std::make_unique<isp::CostModel>(classifier_->layer_shapes(), classifier_->gated_layers());
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
    int64_t n_sub = std::max<int64_t>(1, static_cast<int64_t>(o_.subset_fraction * data.train.size()));
    auto idx = isp::stratified_indices(data.train.labels, n_sub, static_cast<uint64_t>(o_.subset_seed));
    auto it = at::tensor(idx, at::kLong);
    isp::ImageSplit subset{data.train.images.index_select(0, it), data.train.labels.index_select(0, it)};
    at::Tensor ref_params, ref_readable, ref_maps;
    if (selector_) std::tie(ref_params, ref_readable, ref_maps) = selector_outputs(subset, dev);

    pruner_->attach(*classifier_, *cost_);
    pruner_->to(dev);
    std::vector<std::pair<std::string, bool>> frozen;
    for (auto& p : classifier_->named_parameters()) frozen.emplace_back(p.key(), p.value().requires_grad()), p.value().set_requires_grad(false);
    if (selector_) for (auto& p : selector_->parameters()) p.set_requires_grad(false);

    at::Tensor best_gates;
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
      isp::TrainLoopHooks hooks;
      hooks.start_epoch = [&](int64_t) {
        set_bn_mode();
        return isp::json{{"lr", o_.lr}};
      };
      // Everything stays on the device: gate noise, the FLOPs term and the interpretation term are batched
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
        at::Tensor loss = torch::zeros({}, x.options());
        std::vector<at::Tensor> parts{at::Tensor()};
        for (auto& r : regs_) {
          at::Tensor term = r->compute(in);
          loss = loss + r->weight() * term;
          parts.push_back(term.detach().reshape({}));
        }
        parts.push_back(in.flops_ratio.detach().reshape({}).to(loss.dtype()));
        parts[0] = loss.detach();
        opt.zero_grad();
        loss.backward();
        opt.step();
        return torch::stack(parts);
      };
      hooks.checkpoint(*pruner_, opt, "pruner");
      at::Tensor evaluated_gates;
      hooks.evaluate = [&](int64_t) {
        evaluated_gates = pruner_->final_gates().to(dev);  // deterministic: thresholded without noise
        const double ratio = cost_->count(widths_of(evaluated_gates)).flops / cost_->full_flops();
        const double val = evaluate_gated(evaluated_gates, data.val.size() ? data.val : subset, dev);
        return isp::json{{"val_top1_gated", val}, {"final_flops_ratio", ratio}};
      };
      // Model selection on the validation split among the architectures within max_flops_ratio; until one
      // is, the cheapest architecture seen so far is kept. As a score: any architecture within the budget
      // (2 + accuracy) beats every one outside it (-ratio).
      hooks.score = [&](const isp::json& line, int64_t epoch) {
        if (epoch + 1 <= o_.select_after_epoch) return -std::numeric_limits<double>::infinity();
        const double ratio = line["final_flops_ratio"].get<double>();
        return ratio <= o_.max_flops_ratio ? 2.0 + line["val_top1_gated"].get<double>() : -ratio;
      };
      hooks.save_best = [&](isp::CheckpointWriter& w) { w.tensor("gates", evaluated_gates); };
      const isp::TrainLoopResult res = isp::run_train_loop(spec, hooks, loader, ctx);
      best_gates = res.best_epoch > 0 ? isp::CheckpointReader(res.best_path).tensor("gates").to(dev)
                                      : pruner_->final_gates().to(dev);
      ctx.summary["pruning_images_per_s"] = static_cast<double>(res.images_seen) / std::max(1e-9, res.train_seconds);
      ctx.summary["selected_epoch"] = res.best_epoch;
      ctx.summary["selected_meets_budget"] = res.best_epoch > 0 && res.best_score >= 2.0;
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
    extract(best_gates, dev);
    isp::Classifier pc{pruned_.get(), [m = pruned_.get()](const at::Tensor& x) { return m->forward(x); }};
    const isp::EvalResult pruned = isp::evaluate_classifier(pc, data.test, o_.eval_batch_size, dev);
    const isp::EvalResult pruned_val = data.val.size() ? isp::evaluate_classifier(pc, data.val, o_.eval_batch_size, dev) : isp::EvalResult{};
    auto before = cost_->count(), after = isp::CostModel(pruned_->layer_shapes(), pruned_->gated_layers()).count();
    ctx.summary["baseline_top1"] = baseline.top1;
    ctx.summary["pruned_top1"] = pruned.top1;
    ctx.summary["pruned_val_top1"] = pruned_val.top1;
    ctx.summary["flops_before"] = before.flops;
    ctx.summary["flops_after"] = after.flops;
    ctx.summary["params_before"] = before.params;
    ctx.summary["params_after"] = after.params;
    ctx.summary["flops_reduction"] = 1.0 - after.flops / before.flops;
    ctx.summary["params_reduction"] = 1.0 - after.params / before.params;
    ctx.summary["kept_widths"] = arch_["widths"];
    ctx.summary["full_widths"] = arch_["full_widths"];
    ctx.summary["pruning_subset"] = subset.size();
    ctx.summary["prune_seconds"] = isp::now_seconds() - t_start;
    isp::write_file_atomic(ctx.stage_dir + "/architecture.json", arch_.dump(2) + "\n");
  }

  void restore(isp::RunContext& ctx) override {
    isp::CheckpointReader r(ctx.stage_dir + "/gates.pt");
    extract(r.tensor("gates").to(ctx.device), ctx.device);
  }

 private:
  std::vector<int64_t> widths_of(const at::Tensor& gates) const {
    at::Tensor k = cost_->kept_per_layer(gates.to(at::kFloat)).cpu();
    std::vector<int64_t> w;
    for (int64_t i = 0; i < k.numel(); ++i) w.push_back(std::max<int64_t>(1, static_cast<int64_t>(std::llround(k[i].item<double>()))));
    return w;
  }

  void set_bn_mode() {
    // frozen: the whole network in eval mode, BN uses the unpruned statistics (official, §6.20).
    classifier_->eval();
    if (o_.bn_policy == "batch") classifier_->train();
    if (selector_) selector_->eval();
  }

  double evaluate_gated(const at::Tensor& gates, const isp::ImageSplit& split, torch::Device dev) {
    classifier_->eval();
    classifier_->set_gates(gates);
    isp::Classifier c{classifier_.get(), [m = classifier_.get()](const at::Tensor& x) { return m->forward(x); }};
    double acc = isp::evaluate_classifier(c, split, o_.eval_batch_size, dev).top1;
    classifier_->set_gates(at::Tensor());
    return acc;
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

  void extract(const at::Tensor& gates, torch::Device dev) {
    auto ex = isp::extract_pruned(*classifier_, gates, ctx_, node_);
    pruned_ = ex.model;
    pruned_->to(dev);
    std::vector<int64_t> widths, full;
    for (const auto& k : ex.kept_indices) widths.push_back(static_cast<int64_t>(k.size()));
    for (const auto& l : classifier_->gated_layers()) full.push_back(l.width);
    isp::json layers = isp::json::array();
    auto gl = classifier_->gated_layers();
    for (std::size_t l = 0; l < gl.size(); ++l)
      layers.push_back({{"name", gl[l].name}, {"width", gl[l].width}, {"kept", ex.kept_indices[l]}});
    arch_ = {{"backbone_node", node_}, {"spec", ex.spec}, {"widths", widths}, {"full_widths", full}, {"layers", layers}};
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
  isp::json arch_ = isp::json::object();
};

std::shared_ptr<isp::Stage> make(const PruneOptions& o, isp::BuildContext& ctx) { return std::make_shared<PruneChannels>(o, ctx); }

}  // namespace

ISP_PLUGIN("0.1.0");
ISP_REGISTER(isp::Stage, "PruneChannels", 1, PruneOptions, make,
             "learn channel gates steered by the selector's RBF parameters and a FLOPs budget, then cut channels");
