// Stage "Export": the deliverable folder and the run's report.
//   export/recipe.resolved.json   the recipe that produced it
//   export/structure.json         node spec with pruned widths + kept channel indices per gated layer
//   export/weights.pt             {name: tensor} state dict in torch's zip format: Python reads it with
//                                 torch.load(path) (a plain dict); isp reloads it with isp::load_export
//   export/model.ts.pt, model.onnx TorchScript and ONNX (BN folded) where the backbone declares an inference graph
//   export/sample.json            the first test images and their logits in isp, to check any runtime against
//   export/original/              the same files for the unpruned classifier (option "original")
//   export/summary.json           params, FLOPs and accuracy before/after
//   report.md, report.json        (run folder) the comparison table a paper needs, wall time per stage
//   report.html                   (run folder) the same with training curves and kept widths (isp/report_html.h)
#include <torch/torch.h>

#include <filesystem>
#include <fstream>
#include <sstream>

#include "isp/artifacts.h"
#include "isp/checkpoint.h"
#include "isp/cost.h"
#include "isp/data.h"
#include "isp/interfaces/dataset.h"
#include "isp/registry/number_text.h"
#include "isp/registry/plugin.h"
#include "isp/registry/recipe.h"
#include "isp/report_html.h"
#include "isp/saliency_metrics.h"
#include "isp/selector.h"
#include "isp/train.h"

namespace fs = std::filesystem;

namespace {

struct ExportOptions {
  isp::NodeRef model, selector, data;
  int64_t agreement_images = 500;
  int64_t metrics_images = 256;
  int64_t metrics_steps = 16;
  bool original = true;
  bool reuse_selector_curves = true;
  template <class V> void visit(V& v) {
    v("model", model, "the stage whose pruned network is exported (Finetune or PruneChannels); the before/after "
      "columns compare it with the classifier it was pruned from", isp::required(), isp::of_kind("stage"));
    v("selector", selector, "TrainSelector stage: compare saliency of pruned vs original (optional)", isp::of_kind("stage"));
    v("data", data, "dataset (test split for the saliency comparison)", isp::required(), isp::of_kind("dataset"));
    v("agreement_images", agreement_images, "test images used for the saliency agreement figures", isp::at_least(1));
    v("metrics_images", metrics_images, "test images for the saliency metrics of the original and the pruned network "
      "(deletion/insertion AUC, mass on object, centre spread: docs/method.md §9); 0 = skip them", isp::at_least(0));
    v("metrics_steps", metrics_steps, "deletion/insertion steps", isp::between(2, 1024));
    v("original", original, "also export the classifier it was pruned from, unpruned, to export/original/ in the same "
      "formats (the baseline for deployment and latency comparisons)");
    v("reuse_selector_curves", reuse_selector_curves, "the original network's row takes the per-image deletion/insertion "
      "curves the selector stage measured on the same test images, when its selector weights, steps, seed and labels "
      "are the same (identical figures, half the classifier passes); false = measure them again");
  }
};

class Export : public isp::Stage {
 public:
  Export(ExportOptions o, isp::BuildContext& ctx)
      : o_(std::move(o)), source_(isp::stage_input<isp::PrunedNetwork>(ctx, o_.model)),
        aem_(isp::stage_input<isp::ExplanationModel>(ctx, o_.selector)), data_(ctx.get<isp::Dataset>(o_.data)) {}

  const char* produces() const override { return isp::ExportedModel::kType; }

  void run(isp::RunContext& ctx) override {
    const auto pruned = source_.get();
    const std::string dir = ctx.stage_dir;
    fs::create_directories(dir);
    isp::write_file_atomic(dir + "/recipe.resolved.json", ctx.resolved_recipe.dump(2) + "\n");
    const isp::json arch = pruned->architecture();
    const isp::json plugins = ctx.resolved_recipe.value("plugins", isp::json::array());
    // The pruned network in every format (TorchScript and ONNX with BN folded, where the backbone declares an
    // inference graph), and sample.json: the first test images and their logits in isp.
    const auto& test = data_->data().test;
    const at::Tensor sample_input = test.images.narrow(0, 0, std::min<int64_t>(4, test.size()));
    isp::write_export(*pruned->network, isp::export_structure(arch["spec"], arch["layers"], pruned->pruner, plugins),
                      sample_input, dir);
    if (o_.original && pruned->original) {
      // The classifier it was pruned from, the same way: the baseline a deployment measures the pruned one against.
      isp::Backbone& original = *pruned->original->network;
      isp::json spec = original.structure();
      spec["type"] = pruned->original->backbone_type;
      isp::write_export(original, isp::export_structure(spec, isp::unpruned_layers(original), isp::json(), plugins),
                        sample_input, dir + "/original");
    }

    const isp::Backbone& baseline = *pruned->original->network;
    auto before = isp::CostModel(baseline.layer_shapes(), baseline.gated_layers()).count();
    auto after = isp::CostModel(pruned->network->layer_shapes(), pruned->network->gated_layers()).count();
    isp::json baseline_top1 = pruned->metric("baseline_top1");
    if (baseline_top1.is_null()) baseline_top1 = pruned->original->metrics.value("test_top1", isp::json());
    isp::json report = {{"recipe", ctx.resolved_recipe.value("description", std::string())},
                        {"baseline_top1", baseline_top1},
                        {"pruned_top1", pruned->metric("pruned_top1")},
                        {"finetuned_top1", pruned->metric("finetuned_top1")},
                        {"flops_before", before.flops},
                        {"flops_after", after.flops},
                        {"params_before", before.params},
                        {"params_after", after.params},
                        {"flops_reduction", 1.0 - after.flops / before.flops},
                        {"params_reduction", 1.0 - after.params / before.params},
                        {"kept_widths", pruned->widths()},
                        {"full_widths", pruned->full_widths()}};
    // The budget the pruning stage promised, and whether the exported network keeps it.
    for (const char* k : {"budget_target", "budget_counting", "budget_achieved", "budget_met", "budget_tolerance",
                          "bn_recalibration_images", "pruned_top1_unpruned_bn_stats", "selected_expected_flops_ratio",
                          "selected_deterministic_flops_ratio", "selected_projection_threshold", "selected_epoch",
                          "selected_by", "candidate_slack"})
      if (isp::json v = pruned->metric(k); !v.is_null()) report[k] = v;
    report["flops_ratio"] = after.flops / before.flops;
    if (report["finetuned_top1"].is_null()) report["finetuned_top1"] = report["pruned_top1"];
    if (!report["baseline_top1"].is_null() && !report["finetuned_top1"].is_null())
      report["delta_top1"] = report["finetuned_top1"].get<double>() - report["baseline_top1"].get<double>();
    isp::json wall = isp::json::object(), timeline = isp::json::array();
    for (const auto& rec : ctx.finished) {
      wall[rec.name] = rec.wall_seconds;
      isp::json row = {{"stage", rec.name}, {"wall_seconds", rec.wall_seconds}};
      if (!rec.reused_from.empty()) row["reused_from"] = rec.reused_from;
      timeline.push_back(row);
    }
    report["wall_seconds"] = wall;
    report["stages"] = timeline;
    report["pruner"] = pruned->pruner;
    isp::json lineage = isp::json::array();
    for (const auto& e : pruned->lineage) lineage.push_back({{"stage", e.stage}, {"type", e.type}});
    report["lineage"] = lineage;
    if (!aem_.empty()) {
      report["saliency"] = saliency_agreement(*aem_->selector, pruned->network, ctx.device);
      if (o_.metrics_images > 0) {
        // Seeded as the selector stage's metrics were (each stage has its own seed): both rows and the selector
        // stage's figures draw the same random orderings, and its curves are valid for the original's row.
        const uint64_t seed = aem_->saliency_curves.curves.defined() ? aem_->saliency_curves.seed : ctx.seed;
        int64_t reused = 0;
        isp::json original = saliency_metrics(*aem_->selector, pruned->original->network, ctx.device, seed,
                                              o_.reuse_selector_curves ? &aem_->saliency_curves : nullptr, &reused)
                                 .to_json(false);
        original["curves_from_selector_stage"] = reused;
        report["saliency"]["original"] = original;
        report["saliency"]["pruned"] =
            saliency_metrics(*aem_->selector, pruned->network, ctx.device, seed, nullptr, nullptr).to_json(false);
      }
    }
    isp::write_file_atomic(dir + "/summary.json", report.dump(2) + "\n");
    isp::write_file_atomic(ctx.run_dir + "/report.json", report.dump(2) + "\n");
    isp::write_file_atomic(ctx.run_dir + "/report.md", markdown(report));
    isp::write_run_report_html(ctx.run_dir);  // curves, widths; `isp explain` + `isp report` add the saliency figure
    ctx.summary = {{"export_dir", dir}, {"flops_reduction", report["flops_reduction"]}};
    publish_export(dir, report);
  }

  void restore(isp::RunContext& ctx) override {
    publish_export(ctx.stage_dir, isp::json::parse(isp::read_text_file(ctx.stage_dir + "/summary.json")));
  }

 private:
  void publish_export(const std::string& dir, isp::json report) {
    auto a = std::make_shared<isp::ExportedModel>();
    a->dir = dir;
    a->report = std::move(report);
    publish(a);
  }

  // How far the pruned network's saliency moved: the same frozen decoder/head on the pruned encoder.
  isp::json saliency_agreement(isp::SelectorNet& original, const std::shared_ptr<isp::Backbone>& pruned,
                               torch::Device dev) {
    torch::NoGradGuard ng;
    const auto& test = data_->data().test;
    int64_t n = std::min<int64_t>(o_.agreement_images, test.size());
    isp::ImageSplit sub{test.images.narrow(0, 0, n), test.labels.narrow(0, 0, n)};
    isp::SelectorNet on_pruned(pruned, original.filter, original.decoder, original.head, original.sampler);
    original.eval();
    pruned->eval();
    isp::BatchLoader loader(sub, 128, false, isp::Augmentation{}, dev);
    loader.start_epoch(0, 0);
    double shift = 0, iou = 0, dsigma = 0;
    bool rbf = original.head->predicts_rbf_parameters();  // readable = (c_row, c_col, sigma) only then
    for (int64_t i = 0; i < loader.num_batches(); ++i) {
      isp::Batch b = loader.get(i);
      auto x = b.x.to(dev), y = b.y.to(dev);
      auto a = original.forward(x, y, false), p = on_pruned.forward(x, y, false);
      if (rbf && a.readable.defined() && p.readable.defined()) {
        shift += (a.readable.narrow(1, 0, 2) - p.readable.narrow(1, 0, 2)).pow(2).sum(1).sqrt().sum().item<double>();
        dsigma += (a.readable.select(1, 2) - p.readable.select(1, 2)).abs().sum().item<double>();
      } else {
        rbf = false;
      }
      auto ma = a.probs.ge(0.5), mp = p.probs.ge(0.5);
      auto inter = (ma & mp).flatten(1).sum(1).to(at::kDouble), uni = (ma | mp).flatten(1).sum(1).to(at::kDouble);
      iou += (inter / uni.clamp_min(1)).sum().item<double>();
    }
    isp::json out = {{"images", n}, {"mask_iou_at_0.5", iou / n}};
    if (rbf) {
      out["mean_center_shift_px"] = shift / n;
      out["mean_abs_sigma_change"] = dsigma / n;
    }
    return out;
  }

  // docs/method.md §9 for one network: its own maps (the AEM's decoder and head on its encoder), scored by its own
  // classifier, on the first metrics_images test images -- the same images for the original and the pruned one.
  // `measured`: curves the selector stage measured, taken for the images they cover where they belong to the same
  // selector weights (fingerprint), steps, seed and labels; `reused` says for how many images.
  isp::SaliencyReport saliency_metrics(isp::SelectorNet& original, const std::shared_ptr<isp::Backbone>& network,
                                       torch::Device dev, uint64_t seed,
                                       const isp::ExplanationModel::MeasuredCurves* measured, int64_t* reused) {
    const isp::DataBundle& data = data_->data();
    const int64_t n = std::min<int64_t>(o_.metrics_images, data.test.size());
    isp::SelectorNet sel(network, original.filter, original.decoder, original.head, original.sampler);
    isp::SaliencyMetricOptions mo;
    mo.steps = o_.metrics_steps;
    mo.seed = seed;
    at::Tensor known;
    if (measured && measured->curves.defined() && measured->steps == mo.steps && measured->seed == mo.seed &&
        measured->labels == "ground_truth" && measured->selector_fingerprint == isp::weights_fingerprint(sel))
      known = measured->curves.narrow(0, 0, std::min<int64_t>(n, measured->curves.size(0)));
    if (reused) *reused = known.defined() ? known.size(0) : 0;
    return isp::measure_selector_saliency(sel, data.test.images.narrow(0, 0, n).to(dev),
                                          data.test.labels.narrow(0, 0, n).to(dev), data, mo, 128, known);
  }

  static std::string num(const isp::json& v, int precision = 3) { return isp::fixed_or_na(v, precision); }
  static std::string pct(const isp::json& v) { return isp::fixed_or_na(v, 2, 100.0); }
  static std::string signed_points(const isp::json& v) {
    std::ostringstream os;
    os.precision(2);
    os << std::fixed << std::showpos << 100.0 * v.get<double>() << " pts";
    return os.str();
  }
  static std::string markdown(const isp::json& r) {
    std::ostringstream os;
    os.precision(3);
    if (r.contains("budget_met") && !r["budget_met"].get<bool>())
      os << "**WARNING: FLOPs budget missed** — the pruned network keeps " << r["budget_achieved"].get<double>()
         << " of the " << r.value("budget_counting", std::string()) << " FLOPs; the target was "
         << r["budget_target"].get<double>() << ".\n\n";
    os << "# Pruning report\n\n" << r.value("recipe", std::string()) << "\n\n";
    os << "| baseline top-1 | pruned top-1 | finetuned top-1 | Δ top-1 | FLOPs before | FLOPs after | FLOPs ↓ | params before | params after | params ↓ |\n";
    os << "|---|---|---|---|---|---|---|---|---|---|\n";
    os << "| " << pct(r["baseline_top1"]) << "% | " << pct(r["pruned_top1"]) << "% | " << pct(r["finetuned_top1"]) << "% | "
       << (r.contains("delta_top1") ? signed_points(r["delta_top1"]) : std::string("n/a")) << " | " << r["flops_before"].get<double>() / 1e6
       << " M | " << r["flops_after"].get<double>() / 1e6 << " M | " << pct(r["flops_reduction"]) << "% | "
       << r["params_before"].get<double>() / 1e6 << " M | " << r["params_after"].get<double>() / 1e6 << " M | "
       << pct(r["params_reduction"]) << "% |\n\n";
    if (r.contains("saliency")) {
      const isp::json& sal = r["saliency"];
      os << "Saliency of the pruned vs the original network (same selector, " << sal.value("images", 0)
         << " test images): mask IoU at 0.5 = " << sal.value("mask_iou_at_0.5", 0.0);
      if (sal.contains("mean_center_shift_px"))
        os << ", mean RBF centre shift = " << sal["mean_center_shift_px"].get<double>()
           << " px, mean |Δσ| = " << sal.value("mean_abs_sigma_change", 0.0);
      os << "\n\n";
      if (sal.contains("original") && sal.contains("pruned")) {
        os << "How well the maps explain (docs/method.md §9; " << sal["pruned"].value("images", 0)
           << " test images, each network's maps scored by its own classifier; deletion AUC: lower is better, "
              "insertion AUC and mass on object: higher is better):\n\n";
        os << "| network | deletion AUC | insertion AUC | deletion: random / centred | insertion: random / centred | "
              "mass on object | centred Gaussian's mass | centre spread row / col (px) | objects' own spread (px) | "
              "centre to object (px) | image centre to object (px) |\n";
        os << "|---|---|---|---|---|---|---|---|---|---|---|\n";
        for (const char* which : {"original", "pruned"}) {
          const isp::json& m = sal[which];
          os << "| " << which << " | " << num(m["deletion_auc"]) << " | " << num(m["insertion_auc"]) << " | "
             << num(m["random_order"]["deletion_auc"]) << " / " << num(m["centred_gaussian"]["deletion_auc"]) << " | "
             << num(m["random_order"]["insertion_auc"]) << " / " << num(m["centred_gaussian"]["insertion_auc"]) << " | "
             << num(m["mass_on_object"]) << " (foreground " << num(m["foreground_share"]) << ") | "
             << num(m["mass_on_object_centred_gaussian"]) << " | " << num(m["centre_std_row_px"], 2) << " / "
             << num(m["centre_std_col_px"], 2) << " | " << num(m["object_centroid_std_row_px"], 2) << " / "
             << num(m["object_centroid_std_col_px"], 2) << " | " << num(m["centre_to_object_px"], 2) << " | "
             << num(m["image_centre_to_object_px"], 2) << " |\n";
        }
        os << "\n";
      }
    }
    if (r.contains("budget_met")) {
      os << "FLOPs budget: target " << r["budget_target"].get<double>() << " (" << r.value("budget_counting", std::string())
         << "), achieved " << r["budget_achieved"].get<double>() << " — " << (r["budget_met"].get<bool>() ? "met" : "MISSED");
      if (r.contains("selected_deterministic_flops_ratio"))
        os << "; the final rule alone gave " << r["selected_deterministic_flops_ratio"].get<double>();
      if (r.contains("selected_expected_flops_ratio"))
        os << ", the noisy gates " << r["selected_expected_flops_ratio"].get<double>() << " in expectation";
      os << ".";
      // Whether the gates learned the architecture or the projection made most of it (docs/method.md §1d).
      const std::string by = r.value("selected_by", std::string());
      if (by == "validation accuracy")
        os << " The architecture (epoch " << r.value("selected_epoch", 0) << ") was the candidate with the best "
           << "validation accuracy among those within candidate_slack " << r.value("candidate_slack", 0.0)
           << " of the target before projection.";
      else if (by == "closest to the budget")
        os << " No architecture came within candidate_slack " << r.value("candidate_slack", 0.0)
           << " of the target before projection, so the one closest to it was kept (epoch " << r.value("selected_epoch", 0)
           << "): its widths are mostly the projection's, not the gates'.";
      else if (by == "final gates")
        os << " No evaluation came after select_after_epoch, so the final gates were kept.";
      os << "\n\n";
    }
    if (r.contains("bn_recalibration_images") && r["bn_recalibration_images"].get<int64_t>() > 0)
      os << "Pruned top-1 is measured after re-estimating BatchNorm statistics on " << r["bn_recalibration_images"].get<int64_t>()
         << " training images (adaptive BN); with the unpruned statistics it was " << pct(r.value("pruned_top1_unpruned_bn_stats", isp::json()))
         << "%.\n\n";
    os << "Kept widths per gated layer: " << r["kept_widths"].dump() << "\n\nof " << r["full_widths"].dump() << "\n\n";
    os << "| stage | wall time (s) | |\n|---|---|---|\n";
    double total = 0;
    for (const auto& row : r["stages"]) {
      total += row["wall_seconds"].get<double>();
      os << "| " << row["stage"].get<std::string>() << " | " << row["wall_seconds"].get<double>() << " | "
         << (row.contains("reused_from") ? "reused from " + row["reused_from"].get<std::string>() : std::string()) << " |\n";
    }
    os << "| total | " << total << " | |\n";
    return os.str();
  }

  ExportOptions o_;
  isp::StageInput<isp::PrunedNetwork> source_;
  isp::StageInput<isp::ExplanationModel> aem_;
  std::shared_ptr<isp::Dataset> data_;
};

std::shared_ptr<isp::Stage> make(const ExportOptions& o, isp::BuildContext& ctx) { return std::make_shared<Export>(o, ctx); }

}  // namespace

ISP_PLUGIN("0.3.0");
ISP_REGISTER(isp::Stage, "Export", 1, ExportOptions, make,
             "write the pruned network (structure + torch.load-able weights) and report.md/report.json");
