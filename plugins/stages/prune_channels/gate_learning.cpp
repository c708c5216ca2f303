#include "prune_channels.h"

#include <cstdio>

#include "isp/checkpoint.h"
#include "isp/train.h"
#include "isp/accel.h"
#include "isp/optim.h"

namespace isp_prune {

// Gate learning (docs/method.md §1d, §3.3): the loss terms on the gated copy, one candidate architecture per
// evaluation, model selection on the validation split among candidates at or under the budget.
at::Tensor PruneChannels::learn_gates(const isp::ImageSplit& subset, isp::RunContext& ctx, isp::json& summary,
                                      isp::json& selected) {
  const auto& data = data_->data();
  const torch::Device dev = ctx.device;
  isp::FrozenParameters frozen_net(*gated_);
  std::optional<isp::FrozenParameters> frozen_sel;
  if (gated_selector_) frozen_sel.emplace(*gated_selector_);
  const double max_ratio = o_.max_flops_ratio > 0 ? o_.max_flops_ratio
                           : budget_->active()    ? budget_->spec().target + o_.budget_tolerance
                                                  : 1.0;
  isp::apply_memory_format(*gated_, ctx.speed);
  if (gated_selector_) isp::apply_memory_format(*gated_selector_, ctx.speed);
  // torch.optim.AdamW's defaults (betas 0.9/0.999, eps 1e-8), decoupled weight decay.
  isp::FlatAdam opt(pruner_->parameters(), isp::FlatAdamOptions{o_.lr, 0.9, 0.999, 1e-8, o_.weight_decay, true});
  isp::BatchLoader loader(subset, o_.batch_size, true, isp::Augmentation{}, dev);
  isp::TrainLoopSpec spec;
  spec.epochs = o_.epochs;
  spec.eval_every = o_.eval_every;
  spec.max_steps_per_epoch = o_.max_steps_per_epoch;
  spec.metrics = {"loss"};
  for (const auto& r : regs_) spec.metrics.push_back(r->term());
  spec.metrics.push_back("flops_ratio");
  spec.metrics.push_back("final_rule_flops_ratio");
  for (const auto& r : regs_) {
    r->state();  // creates the term's state, so its diagnostics have names from the first step on
    for (const auto& d : r->diagnostics()) spec.metrics.push_back(d.first);
  }
  isp::TrainLoopHooks hooks;
  hooks.start_epoch = [&](int64_t) {
    // frozen: BN uses the unpruned running statistics (official, method §6.20); batch: batch statistics.
    gated_->train(o_.bn_policy == "batch");
    if (gated_selector_) gated_selector_->eval();
    return isp::json{{"lr", o_.lr}};
  };
  // Everything stays on the device: gate noise, the FLOPs terms and the interpretation term are batched tensor
  // ops, and nothing is read back inside a step.
  isp::TrainStep step(ctx, [&](const isp::Batch& b) {
    const at::Tensor &x = b.x, &y = b.y, &bi = b.index;
    isp::LossInputs in;
    gated_->set_gates(pruner_->soft_gates());
    isp::BackboneFeatures f = gated_->forward_features(x);
    in.logits = f.logits;
    in.labels = y;
    if (gated_selector_) {
      isp::MaskDistribution d = gated_selector_->decode(f.scales, y);
      in.params = d.params;
      in.readable = d.readable;
      in.probs = d.probs;
      in.params_ref = ref_params_.index_select(0, bi);
      in.readable_ref = ref_readable_.index_select(0, bi);
      in.maps_ref = ref_maps_.index_select(0, bi);
    }
    // A separate hard straight-through sample drives the FLOPs term (method §3.3).
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
  });
  hooks.step = [&](const isp::Batch& b) { return step(b); };
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
  // Model selection among the architectures within max_ratio; until one is, the cheapest one seen so far is
  // kept. As a score: any candidate (2 + accuracy) beats every architecture that is not one (negative). With a
  // budget, the architecture must also be one the gates learned, not mostly the projection's: its ratio before
  // projection within candidate_slack of the target (else the closest one so far is kept). `standing` is that
  // score for an architecture that is not a candidate, and nothing for one that is.
  auto standing = [&](const isp::json& line, int64_t epoch) -> std::optional<double> {
    if (epoch + 1 <= o_.select_after_epoch) return -std::numeric_limits<double>::infinity();
    const double ratio = line["final_flops_ratio"].get<double>();
    if (ratio > max_ratio) return -1.0 - ratio;
    if (budget_->active()) {
      const double det = line["deterministic_flops_ratio"].get<double>();
      if (det > budget_->spec().target + o_.candidate_slack) return -det;
    }
    return std::nullopt;
  };
  at::Tensor evaluated_gates;
  hooks.evaluate = [&](int64_t epoch) {
    isp::json line;
    evaluated_gates = candidate(line).to(dev);
    // Only a candidate's accuracy enters the selection: extracting, recalibrating and validating any other
    // architecture would be spent on the log alone (in the README job, none of the 15 evaluations is a
    // candidate). The extraction and recalibration keep the RNG as they found it, so skipping them changes
    // nothing else.
    if (!standing(line, epoch))
      line["val_top1_gated"] = evaluate_candidate(evaluated_gates, data.val.size() ? data.val : subset, subset, dev);
    return line;
  };
  hooks.score = [&](const isp::json& line, int64_t epoch) {
    const std::optional<double> s = standing(line, epoch);
    return s ? *s : 2.0 + line["val_top1_gated"].get<double>();
  };
  hooks.save_best = [&](isp::CheckpointWriter& w) { w.tensor("gates", evaluated_gates); };
  const isp::TrainLoopResult res = isp::run_train_loop(spec, hooks, loader, ctx);
  gated_->set_gates(at::Tensor());
  summary["pruning_images_per_s"] = static_cast<double>(res.images_seen) / std::max(1e-9, res.train_seconds);
  summary["selected_epoch"] = res.best_epoch;
  summary["candidate_slack"] = o_.candidate_slack;
  at::Tensor gates;
  if (res.best_epoch > 0) {
    isp::CheckpointReader best(res.best_path);
    selected = best.meta().value("metrics", isp::json::object());
    gates = best.tensor("gates").to(dev);
  } else {
    gates = candidate(selected).to(dev);
  }
  // How the architecture was chosen, for the report: a candidate's validation accuracy decided, or none came
  // within candidate_slack of the target before projection and the closest to the budget was kept, whose widths
  // are then mostly the projection's rather than the gates'. (Read from the selected line, so a resumed run
  // says the same.)
  const bool by_accuracy = selected.contains("val_top1_gated");
  summary["selected_by"] = by_accuracy ? "validation accuracy" : res.best_epoch > 0 ? "closest to the budget" : "final gates";
  if (!by_accuracy && res.best_epoch > 0 && budget_->active() && selected.contains("deterministic_flops_ratio"))
    std::fprintf(stderr,
                 "[%s] note: no architecture came within candidate_slack %.3g of the target %.3g before projection (the "
                 "gates' own ratio came down to %.3f); kept the one closest to the budget (epoch %lld), whose widths are "
                 "mostly the projection's. More epochs or a larger budget weight let the gates reach the target.\n",
                 ctx.stage_name.c_str(), o_.candidate_slack, budget_->spec().target,
                 selected["deterministic_flops_ratio"].get<double>(), static_cast<long long>(res.best_epoch));
  return gates;
}

}  // namespace isp_prune
