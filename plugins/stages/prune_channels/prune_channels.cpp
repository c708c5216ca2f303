// Stage "PruneChannels": options and class in prune_channels.h, gate learning in gate_learning.cpp, the FLOPs
// budget in budget.cpp.
#include "prune_channels.h"

#include "isp/checkpoint.h"
#include "isp/registry/recipe.h"
#include "isp/train.h"

namespace isp_prune {

PruneChannels::PruneChannels(PruneOptions o, isp::BuildContext& ctx)
    : o_(std::move(o)),
      classifier_in_(isp::stage_input<isp::TrainedClassifier>(ctx, o_.classifier)),
      selector_in_(isp::stage_input<isp::ExplanationModel>(ctx, o_.selector)),
      pruner_(ctx.get<isp::Pruner>(o_.pruner)),
      data_(ctx.get<isp::Dataset>(o_.data)),
      where_(ctx.spec_where()) {
  const isp::ComponentRecord* rec = ctx.record_of(pruner_.get());
  pruner_type_ = rec ? rec->type : std::string();
  for (const isp::NodeRef& ref : o_.regularizers) {
    regs_.push_back(ctx.get<isp::Regularizer>(ref));
    // Errors point at the regularizer's own node when it is a $ref, else at the inline spec.
    const std::string name = isp::BuildContext::ref_name(ref.spec);
    reg_where_.push_back(name.empty() ? ref.where : ctx.where("/nodes/" + name));
    if (regs_.back()->needs_selector() && selector_in_.empty())
      throw isp::RecipeError(reg_where_.back().child("type"), "the '" + regs_.back()->term() +
                                                                  "' term needs a selector, but " +
                                                                  o_.selector.where.str() + " names none");
    if (regs_.back()->flops_budget() && std::count_if(regs_.begin(), regs_.end(), [](auto& r) { return r->flops_budget().has_value(); }) > 1)
      throw isp::RecipeError(reg_where_.back().child("type"), "a second FLOPs-budget term; one budget per stage");
  }
  // The recipe is checked against the planned classifier and explanation model before anything runs.
  if (auto cls = classifier_in_.planned(); cls && cls->network) {
    auto aem = selector_in_.planned();
    check_terms(*cls->network, aem ? aem->selector.get() : nullptr);
  }
}

void PruneChannels::run(isp::RunContext& ctx) {
  take_inputs();
  const auto& data = data_->data();
  const torch::Device dev = ctx.device;
  const double t_start = isp::now_seconds();
  original_->network->to(dev);
  gated_->to(dev);
  isp::Classifier cls{original_->network.get(), [m = original_->network.get()](const at::Tensor& x) { return m->forward(x); }};
  const isp::EvalResult baseline = isp::evaluate_classifier(cls, data.test, o_.eval_batch_size, dev);

  // Pruning subset (no augmentation) and the reference selector outputs of the unpruned model.
  const isp::ImageSplit subset = pruning_subset();
  if (aem_) {
    aem_->selector->to(dev);
    std::tie(ref_params_, ref_readable_, ref_maps_) = selector_outputs(subset, dev);
  }
  if (o_.seed > 0) torch::manual_seed(static_cast<uint64_t>(o_.seed));
  pruner_->attach(*gated_, *cost_);
  pruner_->to(dev);
  // Aligned widths are chosen by the projection, which ranks channels by the pruner's keep scores.
  if (o_.channel_multiple > 1 && pruner_->learns_gates() && !pruner_->keep_scores().defined())
    throw isp::RecipeError(where_.child("channel_multiple"),
                           "expected 1 here: channel_multiple " + std::to_string(o_.channel_multiple) +
                               " needs keep scores from the pruner, and '" + pruner_type_ + "' returns none");
  isp::json summary;
  at::Tensor best_gates;
  isp::json selected;
  if (pruner_->learns_gates()) {
    best_gates = learn_gates(subset, ctx, summary, selected);
  } else {
    best_gates = pruner_->final_gates().to(dev);
  }
  {
    isp::CheckpointWriter w;
    w.tensor("gates", best_gates);
    w.meta({{"recipe", ctx.resolved_recipe}});
    w.save_atomic(ctx.stage_dir + "/gates.pt");
  }
  auto pruned = extract(best_gates, dev);
  isp::Classifier pc{pruned.model.get(), [m = pruned.model.get()](const at::Tensor& x) { return m->forward(x); }};
  const isp::EvalResult frozen_bn = isp::evaluate_classifier(pc, data.test, o_.eval_batch_size, dev);
  recalibrate(*pruned.model, dev);
  const isp::EvalResult top = isp::evaluate_classifier(pc, data.test, o_.eval_batch_size, dev);
  const isp::EvalResult val = data.val.size() ? isp::evaluate_classifier(pc, data.val, o_.eval_batch_size, dev) : isp::EvalResult{};
  const auto before = cost_->count(), after = isp::CostModel(pruned.model->layer_shapes(), pruned.model->gated_layers()).count();
  summary["baseline_top1"] = baseline.top1;
  summary["pruned_top1"] = top.top1;
  summary["pruned_top1_unpruned_bn_stats"] = frozen_bn.top1;
  summary["bn_recalibration_images"] = std::min<int64_t>(o_.bn_recalibration_images, subset.size());
  summary["pruned_val_top1"] = val.top1;
  summary["flops_before"] = before.flops;
  summary["flops_after"] = after.flops;
  summary["params_before"] = before.params;
  summary["params_after"] = after.params;
  summary["flops_reduction"] = 1.0 - after.flops / before.flops;
  summary["params_reduction"] = 1.0 - after.params / before.params;
  summary["flops_ratio"] = after.flops / before.flops;
  summary["kept_widths"] = budget_->widths_of(best_gates);
  summary["full_widths"] = gated_->widths();
  summary["pruning_subset"] = subset.size();
  for (const char* k : {"expected_flops_ratio", "deterministic_flops_ratio", "projection_threshold"})
    if (selected.contains(k)) summary[std::string("selected_") + k] = selected[k];
  budget_->report(summary, budget_->widths_of(best_gates), o_.on_budget_miss, ctx.stage_name);
  summary["prune_seconds"] = isp::now_seconds() - t_start;
  ctx.summary = summary;
  isp::write_file_atomic(ctx.stage_dir + "/result.json", summary.dump(2) + "\n");
  publish_network(std::move(pruned), summary, ctx);
}

void PruneChannels::restore(isp::RunContext& ctx) {
  take_inputs();
  gated_->to(ctx.device);
  auto pruned = extract(isp::CheckpointReader(ctx.stage_dir + "/gates.pt").tensor("gates").to(ctx.device), ctx.device);
  recalibrate(*pruned.model, ctx.device);  // exactly the network a continuous run handed on
  publish_network(std::move(pruned), isp::json::parse(isp::read_text_file(ctx.stage_dir + "/result.json")), ctx);
}

void PruneChannels::take_inputs() {
  original_ = classifier_in_.get();
  gated_ = isp::clone_backbone(*original_->network);
  if (!selector_in_.empty()) {
    aem_ = selector_in_.get();
    const auto& s = *aem_->selector;
    gated_selector_ = std::make_shared<isp::SelectorNet>(gated_, s.filter, s.decoder, s.head, s.sampler);
  }
  check_terms(*gated_, aem_ ? aem_->selector.get() : nullptr);
}

void PruneChannels::check_terms(const isp::Backbone& net, const isp::SelectorNet* selector) {
  cost_ = std::make_unique<isp::CostModel>(net.layer_shapes(), net.gated_layers());
  std::optional<isp::FlopsBudgetSpec> spec;
  isp::Where where;
  for (std::size_t i = 0; i < regs_.size(); ++i) {
    if (selector && regs_[i]->needs_rbf_parameters() && !selector->head->predicts_rbf_parameters())
      throw isp::RecipeError(reg_where_[i].child("mode"), "compares RBF parameters, but the selector's mask head "
                                                          "predicts none; use mode \"map\" or an RBF head");
    if (auto b = regs_[i]->flops_budget()) {
      spec = b;
      where = reg_where_[i].child("target");
    }
  }
  // A one-shot pruner learns nothing, so loss terms are not used; its own target is the budget.
  if (!pruner_->learns_gates()) {
    spec.reset();
    where = isp::Where{};
    if (pruner_->flops_target()) spec = isp::FlopsBudgetSpec{*pruner_->flops_target(), false};
  }
  if (o_.channel_multiple > 1 && !(pruner_->learns_gates() && spec && o_.budget_projection == "to_target")) {
    // The rounding happens in the budget projection: without it the option would be silently ignored.
    throw isp::RecipeError(where_.child("channel_multiple"),
                           "expected 1 here: rounding kept widths to a multiple needs a learned pruner, a FLOPs-budget "
                           "term and budget_projection \"to_target\"" +
                               std::string(pruner_->learns_gates() ? "" : " (this pruner is one-shot)"));
  }
  budget_ = std::make_unique<Budget>(*cost_, spec, where, o_.budget_tolerance, o_.channel_multiple);
  if (spec && pruner_->learns_gates()) {
    // A term that can never be active: the unpruned network already meets it.
    const double full = budget_->budget_ratio(net.widths());
    if (spec->target >= full)
      throw isp::RecipeError(where, "this budget is met by the unpruned network (its " +
                                        std::string(spec->official_counting ? "official" : "whole-network") +
                                        " FLOPs ratio is " + std::to_string(full) +
                                        "), so the term is never active; set a target below that");
  }
}

at::Tensor PruneChannels::candidate(isp::json& line) {
  torch::NoGradGuard ng;
  at::Tensor det = pruner_->final_gates().cpu();
  line["deterministic_flops_ratio"] = budget_->flops_ratio(budget_->widths_of(det));
  if (at::Tensor p = pruner_->keep_probabilities(); p.defined())
    line["expected_flops_ratio"] = (cost_->flops(cost_->kept_per_layer(p.to(at::kFloat).cpu())) / cost_->full_flops()).item<double>();
  at::Tensor gates = det;
  at::Tensor scores = pruner_->keep_scores();
  if (budget_->active() && o_.budget_projection == "to_target" && scores.defined()) {
    double threshold = 0;
    gates = budget_->project(scores.detach().to(at::kFloat).cpu(), &threshold);
    line["projection_threshold"] = threshold;
  }
  line["final_flops_ratio"] = budget_->flops_ratio(budget_->widths_of(gates));
  if (budget_->active() && budget_->spec().official_counting)
    line["final_flops_ratio_official"] = budget_->official_ratio(budget_->widths_of(gates));
  return gates;
}

isp::ImageSplit PruneChannels::pruning_subset() const {
  const auto& data = data_->data();
  int64_t n_sub = std::max<int64_t>(1, static_cast<int64_t>(o_.subset_fraction * data.train.size()));
  auto idx = isp::stratified_indices(data.train.labels, n_sub, static_cast<uint64_t>(o_.subset_seed));
  auto it = at::tensor(idx, at::kLong);
  return isp::ImageSplit{data.train.images.index_select(0, it), data.train.labels.index_select(0, it)};
}

std::tuple<at::Tensor, at::Tensor, at::Tensor> PruneChannels::selector_outputs(const isp::ImageSplit& split, torch::Device dev) {
  torch::NoGradGuard ng;
  aem_->selector->eval();
  isp::BatchLoader loader(split, o_.eval_batch_size, false, isp::Augmentation{}, dev);
  loader.start_epoch(0, 0);
  std::vector<at::Tensor> p, r, m;
  for (int64_t i = 0; i < loader.num_batches(); ++i) {
    isp::Batch b = loader.get(i);
    auto d = aem_->selector->forward(b.x.to(dev), b.y.to(dev), false);
    p.push_back(d.params.defined() ? d.params : torch::zeros({b.size(), 0}, b.x.options().device(dev)));
    r.push_back(d.readable.defined() ? d.readable : torch::zeros({b.size(), 0}, b.x.options().device(dev)));
    m.push_back(d.probs);
  }
  return {torch::cat(p), torch::cat(r), torch::cat(m)};
}

void PruneChannels::recalibrate(isp::Backbone& net, torch::Device dev) {
  if (o_.bn_recalibration_images <= 0) return;
  isp::CpuRngGuard rng;
  isp::Classifier pc{&net, [m = &net](const at::Tensor& x) { return m->forward(x); }};
  isp::recalibrate_batchnorm(pc, pruning_subset(), o_.bn_recalibration_images, o_.eval_batch_size, dev);
}

isp::ExtractedNetwork PruneChannels::extract(const at::Tensor& gates, torch::Device dev) {
  isp::CpuRngGuard rng;
  auto ex = isp::extract_pruned(*gated_, gates);
  ex.model->to(dev);
  return ex;
}

void PruneChannels::publish_network(isp::ExtractedNetwork pruned, isp::json metrics, isp::RunContext& ctx) {
  auto a = std::make_shared<isp::PrunedNetwork>();
  pruned.model->eval();
  a->network = pruned.model;
  a->original = original_;
  a->original_layers = gated_->gated_layers();
  a->kept = pruned.kept_indices;
  a->pruner = pruner_type_;
  a->lineage.push_back({ctx.stage_name, ctx.stage_type, std::move(metrics)});
  isp::write_file_atomic(ctx.stage_dir + "/architecture.json", a->architecture().dump(2) + "\n");
  publish(a);
}

double PruneChannels::evaluate_candidate(const at::Tensor& gates, const isp::ImageSplit& split, const isp::ImageSplit& calib,
                          torch::Device dev) {
  isp::CpuRngGuard rng;
  auto ex = isp::extract_pruned(*gated_, gates);
  ex.model->to(dev);
  isp::Classifier c{ex.model.get(), [m = ex.model.get()](const at::Tensor& x) { return m->forward(x); }};
  if (o_.bn_recalibration_images > 0)
    isp::recalibrate_batchnorm(c, calib, o_.bn_recalibration_images, o_.eval_batch_size, dev);
  ex.model->eval();
  return isp::evaluate_classifier(c, split, o_.eval_batch_size, dev).top1;
}
}  // namespace isp_prune

namespace {

std::shared_ptr<isp::Stage> make(const isp_prune::PruneOptions& o, isp::BuildContext& ctx) {
  return std::make_shared<isp_prune::PruneChannels>(o, ctx);
}

}  // namespace

ISP_PLUGIN("0.2.0");
ISP_REGISTER(isp::Stage, "PruneChannels", 1, isp_prune::PruneOptions, make,
             "learn channel gates steered by the selector's RBF parameters and a FLOPs budget, then cut channels");
