// The AEM stages through the runner (TrainClassifier -> TrainPredictor -> TrainSelector on synthetic blobs):
// every epoch's selector loss is the weighted sum of its terms, each within its range, the summary holds sane AEM
// metrics, and `isp explain` writes a figure of the documented size plus one RBF parameter record per image.
#include "test_support.h"

#include <cmath>
#include <cstdio>
#include <fstream>
#include <map>

#define STB_IMAGE_IMPLEMENTATION
#include <stb/stb_image.h>

#include "../apps/isp/explain.h"
#include "isp/artifacts.h"
#include "isp/data.h"
#include "isp/interfaces/dataset.h"
#include "isp/registry/recipe.h"
#include "isp/train.h"
#include "isp/runner.h"
#include "isp/saliency_metrics.h"

namespace fs = std::filesystem;
using isp::json;

namespace {

json ref(const std::string& n) { return {{"$ref", n}}; }

std::string write_aem_recipe(const fs::path& dir) {
  json nodes = {
      {"data", {{"type", "SyntheticImages"}, {"num_train", 256}, {"num_test", 48}, {"num_classes", 4},
                {"channels", 3}, {"val_fraction", 0.2}, {"crop_padding", 0}, {"horizontal_flip", false}}},
      {"backbone", {{"type", "ResNetCifar"}, {"depth", 20}, {"num_classes", 4}}},
      {"classifier", {{"type", "TrainClassifier"}, {"model", ref("backbone")}, {"data", ref("data")}, {"epochs", 4},
                      {"batch_size", 16}, {"lr", 0.05}, {"milestones", json::array()}, {"eval_batch_size", 64}}},
      {"mask_source", {{"type", "RandomRbfMasks"}}},
      {"predictor", {{"type", "TrainPredictor"}, {"classifier", ref("classifier")}, {"data", ref("data")},
                     {"mask_source", ref("mask_source")}, {"epochs", 3}, {"batch_size", 16}, {"lr", 2e-3},
                     {"eval_every", 1}, {"eval_batch_size", 64}}},
      {"filter", {{"type", "ClassEmbeddingFilter"}, {"encoder", ref("backbone")}}},
      {"decoder", {{"type", "UNetDecoder"}, {"encoder", ref("backbone")}}},
      {"head", {{"type", "RbfMaskHead"}, {"decoder", ref("decoder")}, {"encoder", ref("backbone")}}},
      {"mask_sampler", {{"type", "RelaxedBernoulli"}, {"temperature", 1.0}}},
      {"area", {{"type", "MaskArea"}, {"weight", 0.2}, {"power", 0.3}}},
      {"smoothness", {{"type", "MaskSmoothness"}, {"weight", 0.001}}},
      {"selector", {{"type", "TrainSelector"}, {"predictor", ref("predictor")},
                    {"filter", ref("filter")}, {"decoder", ref("decoder")}, {"head", ref("head")},
                    {"sampler", ref("mask_sampler")}, {"regularizers", {ref("area"), ref("smoothness")}},
                    {"data", ref("data")}, {"epochs", 3}, {"batch_size", 16}, {"lr", 1e-3}, {"eval_batch_size", 64}}}};
  json recipe = {{"seed", 5},
                 {"runtime", {{"threads", 1}, {"device", "cpu"}}},
                 {"nodes", nodes},
                 {"stages", {ref("classifier"), ref("predictor"), ref("selector")}}};
  auto p = dir / "recipe.json";
  std::ofstream(p) << recipe.dump(2);
  return p.string();
}

}  // namespace

TEST_CASE("AEM stages: predictor and selector train, summary and explain figure") {
  auto dir = isp_test::temp_dir("aem_stages");
  isp::RunOptions o;
  o.recipe_path = write_aem_recipe(dir);
  o.work_dir = (dir / "run").string();
  ::unsetenv("ISP_INTERRUPT_AFTER_STEPS");
  REQUIRE(isp::run_recipe(isp_test::shared_registry(), o) == 0);

  std::vector<json> sel;
  std::ifstream in(dir / "run" / "metrics.jsonl");
  for (std::string line; std::getline(in, line);) {
    json j = json::parse(line);
    if (j.value("stage", "") == "selector") sel.push_back(j);
  }
  REQUIRE(sel.size() == 3);
  MESSAGE("selector train_loss " << sel.front()["train_loss"] << " -> " << sel.back()["train_loss"]);
  // Three tiny epochs guarantee no descent (on an AMD EPYC the loss once went 0.67967 -> 0.68005); what holds
  // on every CPU is the loss's make-up and the range of each term, epoch by epoch.
  for (const json& e : sel) {
    CAPTURE(e.dump());
    for (const char* k : {"train_loss", "train_kl", "train_area", "train_smoothness", "val_agreement", "val_kl",
                          "val_mask_area"}) {
      REQUIRE(e.contains(k));
      CHECK(std::isfinite(e[k].get<double>()));
    }
    const double loss = e["train_loss"].get<double>(), kl = e["train_kl"].get<double>();
    const double area = e["train_area"].get<double>(), smooth = e["train_smoothness"].get<double>();
    // The logged loss is KL + 0.2 area + 0.001 smoothness (the recipe's weights), averaged over the same steps.
    CHECK(loss == doctest::Approx(kl + 0.2 * area + 0.001 * smooth).epsilon(1e-5));
    CHECK(kl >= -1e-6);  // a KL divergence, up to rounding
    // MaskArea = mean over pixels of (s + 5e-4)^0.3 with s in [0, 1].
    CHECK(area >= std::pow(5e-4, 0.3) - 1e-6);
    CHECK(area <= std::pow(1 + 5e-4, 0.3) + 1e-6);
    CHECK(smooth >= 0.0);
    CHECK(e["val_agreement"].get<double>() >= 0.0);
    CHECK(e["val_agreement"].get<double>() <= 1.0);
    CHECK(e["val_kl"].get<double>() >= -1e-6);
    CHECK(e["val_mask_area"].get<double>() >= 0.0);
    CHECK(e["val_mask_area"].get<double>() <= 1.0);
  }

  json s = json::parse(isp::read_text_file((dir / "run" / "summary.json").string()));
  MESSAGE("summary: " << s.dump());
  REQUIRE(s.contains("selector_agreement"));
  CHECK(s["selector_agreement"].get<double>() >= 0.0);
  CHECK(s["selector_agreement"].get<double>() <= 1.0);
  CHECK(s["predictor_kl"].get<double>() >= 0.0);
  CHECK(s["mean_mask_area"].get<double>() > 0.0);
  CHECK(s["mean_mask_area"].get<double>() <= 1.0);
  CHECK(s["stages"]["predictor"].contains("predictor_agreement"));
  // The selector's saliency metrics (docs/method.md §9): every number where it must lie.
  const json sal = s["stages"]["selector"]["saliency"];
  CAPTURE(sal.dump());
  CHECK(sal["images"].get<int>() == 48);
  for (const char* order : {"map", "random_order", "centred_gaussian"})
    for (const char* k : {"deletion_auc", "insertion_auc"}) {
      CHECK(sal[order][k].get<double>() >= 0.0);
      CHECK(sal[order][k].get<double>() <= 1.0);
    }
  CHECK(sal["map"]["deletion_curve"].size() == 17);
  CHECK(sal["mass_on_object"].get<double>() >= 0.0);
  CHECK(sal["mass_on_object"].get<double>() <= 1.0);
  CHECK(sal["foreground_share"].get<double>() > 0.0);  // synthetic blobs define a foreground
  CHECK(sal["centre_std_row_px"].get<double>() >= 0.0);
  CHECK(fs::exists(dir / "run" / "predictor" / "final.pt"));
  CHECK(fs::exists(dir / "run" / "selector" / "best.pt"));
  {  // Each stage reports the validation figures of the epoch it selected: its metrics line, not a second pass.
    std::map<std::string, std::vector<json>> lines;
    std::ifstream ml(dir / "run" / "metrics.jsonl");
    for (std::string line; std::getline(ml, line);) {
      json j = json::parse(line);
      lines[j.value("stage", "")].push_back(j);
    }
    const json& st = s["stages"];
    const auto line_of = [&](const std::string& stage, const json& epoch) {
      REQUIRE(epoch.is_number_integer());
      const int64_t e = epoch.get<int64_t>();
      REQUIRE(e >= 1);
      REQUIRE(e <= static_cast<int64_t>(lines[stage].size()));
      return lines[stage][static_cast<std::size_t>(e - 1)];
    };
    CHECK(st["classifier"]["val_top1"] == line_of("classifier", st["classifier"]["best_epoch"])["val_top1"]);
    const json p = line_of("predictor", st["predictor"]["predictor_best_epoch"]);
    CHECK(st["predictor"]["predictor_val_kl"] == p["val_kl"]);
    CHECK(st["predictor"]["predictor_val_agreement"] == p["val_agreement"]);
    const json q = line_of("selector", st["selector"]["selector_best_epoch"]);
    CHECK(st["selector"]["selector_val_agreement"] == q["val_agreement"]);
    CHECK(st["selector"]["selector_val_kl"] == q["val_kl"]);
    CHECK(st["selector"]["selector_val_mask_area"] == q["val_mask_area"]);
    // And those are the selected weights' figures: the classifier restored from its final.pt scores the same.
    isp::RestoredRun run = isp::restore_run(isp_test::shared_registry(), (dir / "run").string());
    const auto cls = run.latest<isp::TrainedClassifier>();
    REQUIRE(cls);
    isp::Backbone* net = cls->network.get();
    const isp::Classifier c{net, [net](const at::Tensor& x) { return net->forward(x); }};
    const isp::EvalResult again =
        isp::evaluate_classifier(c, run.ctx->node<isp::Dataset>("data")->data().val, 64, torch::kCPU);
    CHECK(again.top1 == st["classifier"]["val_top1"].get<double>());
  }

  // `isp explain` on the finished run: the built binary next to the plugin folder.
  const std::string isp_bin = std::string(ISP_TEST_PLUGIN_DIR) + "/../bin/isp";
  REQUIRE(fs::exists(isp_bin));
  const int n = 4;
  const fs::path out = dir / "explain";
  const std::string cmd = "ISP_PLUGIN_PATH= \"" + isp_bin + "\" explain --run \"" + (dir / "run").string() +
                          "\" --images " + std::to_string(n) + " --out \"" + out.string() + "\" > \"" +
                          (dir / "explain.log").string() + "\" 2>&1";
  int rc = std::system(cmd.c_str());
  if (rc != 0) MESSAGE(isp::read_text_file((dir / "explain.log").string()));
  REQUIRE(rc == 0);
  int w = 0, h = 0, c = 0;
  unsigned char* px = stbi_load((out / "saliency.png").string().c_str(), &w, &h, &c, 3);
  REQUIRE(px != nullptr);
  stbi_image_free(px);
  CHECK(w == isp_app::figure_width(32));
  CHECK(h == isp_app::figure_height(32, n));
  CHECK(w == 4 + 5 * (128 + 4));  // the documented geometry, spelled out
  json params = json::parse(isp::read_text_file((out / "params.json").string()));
  REQUIRE(params.size() == static_cast<std::size_t>(n));
  for (const auto& e : params) {
    CHECK(e["sigma"].get<double>() > 0.0);
    CHECK(e["u"].size() == 3);
    CHECK(e["c_row"].get<double>() > 0.0);
    CHECK(e["c_row"].get<double>() < 32.0);
    CHECK(fs::exists(out / e["file"].get<std::string>()));
    CHECK(e["deletion_auc"].get<double>() >= 0.0);
    CHECK(e["insertion_auc"].get<double>() <= 1.0);
    CHECK(e["mass_on_object"].get<double>() >= 0.0);
  }
  // The deletion/insertion figure and the metrics over the images shown.
  CHECK(fs::exists(out / "curves.png"));
  const json shown = json::parse(isp::read_text_file((out / "saliency_metrics.json").string()));
  CHECK(shown["images"].get<int>() == n);
  CHECK(shown["map"]["insertion_curve"].size() == 17);
  // A checkpoint file stands for the run folder that contains it.
  rc = std::system(("\"" + isp_bin + "\" explain --checkpoint \"" + (dir / "run" / "selector" / "final.pt").string() +
                    "\" --images 2 --label predicted --out \"" + (dir / "explain2").string() + "\" > /dev/null 2>&1")
                       .c_str());
  CHECK(rc == 0);
  CHECK(fs::exists(dir / "explain2" / "saliency.png"));

  // The two ways to score a selector's maps agree exactly: from maps the caller already has (`isp explain`) and
  // from the selector run inside (the stages), on the same images and labels in one batch.
  {
    isp::RestoredRun run = isp::restore_run(isp_test::shared_registry(), (dir / "run").string());
    const auto aem = run.latest<isp::ExplanationModel>();
    REQUIRE(aem);
    isp::SelectorNet& sel = *aem->selector;
    const isp::DataBundle& data = run.ctx->node<isp::Dataset>("data")->data();
    torch::NoGradGuard ng;
    const at::Tensor x = data.test.images.narrow(0, 0, 8), y = data.test.labels.narrow(0, 0, 8);
    isp::SaliencyMetricOptions mo;
    mo.steps = 8;
    const json inside = isp::measure_selector_saliency(sel, x, y, data, mo, /*batch_size=*/8).to_json(true);
    sel.eval();
    sel.encoder->eval();
    const isp::MaskDistribution dist = sel.forward(x, y, false);
    const json given = isp::measure_selector_saliency(sel, x, dist, data, mo).to_json(true);
    CHECK(inside["images"] == 8);
    CHECK(inside["map"]["deletion_curve"].size() == 9);
    CHECK(inside.dump() == given.dump());
    // Maps of the wrong size are refused.
    isp::MaskDistribution short_dist = dist;
    short_dist.probs = dist.probs.narrow(0, 0, 4);
    CHECK(isp_test::error_of([&] { isp::measure_selector_saliency(sel, x, short_dist, data, mo); })
              .find("one map per image") != std::string::npos);
  }
  fs::remove_all(dir);
}

// ---------------------------------------------------------------------------------------------------------
// Saliency metrics on hand-made maps whose values are known.
namespace {
// 8x8 one-channel images whose evidence is the 2x2 block E at the top-left (value 1, the rest 0). The classifier
// says class 0 with probability s = mean of E (softmax of log s, log(1 - s)): exactly the share of E still there.
at::Tensor evidence_images(int64_t n) {
  at::Tensor x = at::zeros({n, 1, 8, 8});
  x.narrow(2, 0, 2).narrow(3, 0, 2).fill_(1.0);
  return x;
}
at::Tensor evidence_logits(const at::Tensor& x) {
  const at::Tensor s = x.narrow(2, 0, 2).narrow(3, 0, 2).flatten(1).mean(1).clamp(1e-9, 1 - 1e-9);
  return at::stack({s.log(), (1 - s).log()}, 1);
}
// Maps ranking E first (perfect) or last (reversed), every pixel distinct.
at::Tensor ranked_map(int64_t n, bool evidence_first) {
  at::Tensor m = at::arange(64, at::kFloat).div(64).view({1, 1, 8, 8}).repeat({n, 1, 1, 1});
  m.narrow(2, 0, 2).narrow(3, 0, 2).add_(evidence_first ? 10.0 : -10.0);
  return m - m.min();
}
}  // namespace

TEST_CASE("saliency metrics: deletion and insertion AUC of a perfect and a reversed ordering are known exactly") {
  const at::Tensor x = evidence_images(3);
  isp::SaliencyMetricOptions o;
  o.steps = 16;  // 4 pixels a step: E goes in the first step (perfect) or the last (reversed)
  const auto perfect = isp::measure_saliency(evidence_logits, {x, ranked_map(3, true), {}, {}}, o);
  const auto reversed = isp::measure_saliency(evidence_logits, {x, ranked_map(3, false), {}, {}}, o);
  // Perfect: deletion 1, 0, ..., 0 -> (1 - 1/2)/16; insertion 0, 1, ..., 1 -> (16 - 1/2)/16. Reversed: mirrored.
  CHECK(perfect.map.deletion_auc == doctest::Approx(0.5 / 16).epsilon(1e-6));
  CHECK(perfect.map.insertion_auc == doctest::Approx(15.5 / 16).epsilon(1e-6));
  CHECK(reversed.map.deletion_auc == doctest::Approx(15.5 / 16).epsilon(1e-6));
  CHECK(reversed.map.insertion_auc == doctest::Approx(0.5 / 16).epsilon(1e-6));
  CHECK(perfect.map.deletion.size() == 17);
  CHECK(perfect.map.deletion.front() == doctest::Approx(1.0));
  CHECK(perfect.map.deletion.back() == doctest::Approx(0.0).epsilon(1e-6));
  CHECK(perfect.deletion_auc_per_image.size() == 3);
  // The baselines are the same for both maps (same images, seed), and lie between the two extremes.
  CHECK(perfect.random.deletion_auc == reversed.random.deletion_auc);
  CHECK(perfect.random.deletion_auc > perfect.map.deletion_auc);
  CHECK(perfect.random.deletion_auc < reversed.map.deletion_auc);
  // The centred Gaussian takes the middle pixels first; E's pixels (a corner block) go in steps 9, 14 and 16:
  // deletion 1 (x9), 0.75 (x5), 0.25 (x2), 0 -> 12.75/16.
  CHECK(perfect.centred.deletion_auc == doctest::Approx(12.75 / 16).epsilon(1e-6));
  // Without a foreground or centres those metrics stay empty.
  CHECK_FALSE(perfect.mass_on_object.has_value());
  CHECK_FALSE(perfect.centre_std_row.has_value());
}

TEST_CASE("saliency metrics: curves measured before are taken as they are, and only the other images are run") {
  const at::Tensor x = evidence_images(4);
  const at::Tensor map = ranked_map(4, true);
  int64_t images_scored = 0;
  auto counting_logits = [&](const at::Tensor& t) {
    images_scored += t.size(0);
    return evidence_logits(t);
  };
  isp::SaliencyMetricOptions o;
  o.steps = 16;
  const auto full = isp::measure_saliency(counting_logits, {x, map, {}, {}}, o);
  const int64_t full_cost = images_scored;
  CHECK(full_cost == 4 * (2 + 3 * 15 * 2));  // both ends, then 3 orderings x 15 inner steps x deletion + insertion
  REQUIRE(full.curves.sizes() == at::IntArrayRef({4, 3, 2, 17}));
  CHECK(full.curves[0][0][0][0].item<double>() == doctest::Approx(1.0));  // image 0, map, deletion, nothing removed

  // Three of the four images known: a quarter of the classifier passes, the same report.
  images_scored = 0;
  isp::SaliencyInputs in{x, map, {}, {}, full.curves.narrow(0, 0, 3)};
  const auto reused = isp::measure_saliency(counting_logits, in, o);
  CHECK(images_scored == full_cost / 4);
  CHECK(reused.to_json(true).dump() == full.to_json(true).dump());
  CHECK(at::equal(reused.curves, full.curves));
  // All known: no pass at all.
  images_scored = 0;
  in.known_curves = full.curves;
  CHECK(isp::measure_saliency(counting_logits, in, o).to_json(true).dump() == full.to_json(true).dump());
  CHECK(images_scored == 0);
  // The known curves are what the report uses (not recomputed): image 0's deletion curve made flat at 1.
  at::Tensor edited = full.curves.clone();
  edited[0][0][0].fill_(1.0);
  in.known_curves = edited.narrow(0, 0, 2);
  const auto with_edit = isp::measure_saliency(counting_logits, in, o);
  CHECK(with_edit.deletion_auc_per_image[0] == doctest::Approx(1.0));
  CHECK(with_edit.deletion_auc_per_image[1] == full.deletion_auc_per_image[1]);
  // Curves of another shape (other steps, more images than measured) are refused with the shape expected.
  in.known_curves = full.curves.narrow(3, 0, 9);
  CHECK(isp_test::error_of([&] { isp::measure_saliency(counting_logits, in, o); })
            .find("known_curves must be [k <= 4, 3, 2, 17], got [4, 3, 2, 9]") != std::string::npos);
  in.known_curves = at::cat({full.curves, full.curves}, 0);
  CHECK(isp_test::error_of([&] { isp::measure_saliency(counting_logits, in, o); }).find("known_curves") !=
        std::string::npos);

  // The fingerprint that decides whether curves may be taken: equal for equal weights, different after any change.
  torch::nn::Linear a(3, 2), b(3, 2);
  {
    torch::NoGradGuard ng;
    b->weight.copy_(a->weight);
    b->bias.copy_(a->bias);
  }
  CHECK(isp::weights_fingerprint(*a) == isp::weights_fingerprint(*b));
  {
    torch::NoGradGuard ng;
    b->weight[1][2].add_(1e-4);
  }
  CHECK(isp::weights_fingerprint(*a) != isp::weights_fingerprint(*b));
}

TEST_CASE("saliency metrics: mass on the object for a map on it, off it and flat, and centre spread") {
  const at::Tensor x = evidence_images(2);
  const at::Tensor fg = x.squeeze(1).gt(0.5);  // E is the object
  at::Tensor on = at::zeros({2, 1, 8, 8}), off = at::zeros({2, 1, 8, 8});
  on.narrow(2, 0, 2).narrow(3, 0, 2).fill_(1.0);
  off.narrow(2, 6, 2).narrow(3, 6, 2).fill_(1.0);
  const at::Tensor flat = at::full({2, 1, 8, 8}, 0.5);
  const at::Tensor centres = at::tensor({1.0, 2.0, 3.0, 6.0}).view({2, 2});
  isp::SaliencyMetricOptions o;
  o.steps = 4;
  const auto r_on = isp::measure_saliency(evidence_logits, {x, on, fg, centres}, o);
  const auto r_off = isp::measure_saliency(evidence_logits, {x, off, fg, {}}, o);
  const auto r_flat = isp::measure_saliency(evidence_logits, {x, flat, fg, {}}, o);
  CHECK(*r_on.mass_on_object == doctest::Approx(1.0));
  CHECK(*r_off.mass_on_object == doctest::Approx(0.0));
  CHECK(*r_flat.mass_on_object == doctest::Approx(4.0 / 64));
  CHECK(*r_on.foreground_share == doctest::Approx(4.0 / 64));
  CHECK(r_on.mass_on_object_per_image.size() == 2);
  CHECK(r_on.mean_map_area == doctest::Approx(4.0 / 64));
  // The same-area centred Gaussian sits in the middle, away from the corner object.
  CHECK(*r_on.mass_on_object_centred < 0.05);
  // Population std of rows (1, 3) and columns (2, 6).
  CHECK(*r_on.centre_std_row == doctest::Approx(1.0));
  CHECK(*r_on.centre_std_col == doctest::Approx(2.0));
  // The objects' own centroids: both E's sit in the same corner, so a map that follows them would not move.
  CHECK(*r_on.object_centroid_std_row == doctest::Approx(0.0));
  CHECK(*r_on.object_centroid_std_col == doctest::Approx(0.0));
  // Objects that move: centroids (0.5, 0.5) and (4.5, 2.5); a third image without foreground is left out.
  at::Tensor moving = at::zeros({3, 8, 8}, at::kBool);
  moving[0].narrow(0, 0, 2).narrow(1, 0, 2).fill_(true);
  moving[1].narrow(0, 4, 2).narrow(1, 2, 2).fill_(true);
  const auto r_moving = isp::measure_saliency(evidence_logits, {evidence_images(3), at::full({3, 1, 8, 8}, 0.5), moving, {}}, o);
  CHECK(*r_moving.object_centroid_std_row == doctest::Approx(2.0));
  CHECK(*r_moving.object_centroid_std_col == doctest::Approx(1.0));
  // Centres on the objects' centroids are 0 px away; the 8x8 image's centre (3.5, 3.5) is 3*sqrt(2) and sqrt(2) away.
  const auto r_track = isp::measure_saliency(
      evidence_logits,
      {evidence_images(3), at::full({3, 1, 8, 8}, 0.5), moving, at::tensor({0.5, 0.5, 4.5, 2.5, 0.0, 0.0}).view({3, 2})}, o);
  CHECK(*r_track.centre_to_object == doctest::Approx(0.0));
  CHECK(*r_track.image_centre_to_object == doctest::Approx((3 * std::sqrt(2.0) + std::sqrt(2.0)) / 2));
  CHECK_FALSE(r_moving.centre_to_object.has_value());  // no centres given
  CHECK_FALSE(r_off.centre_std_row.has_value());
  CHECK_FALSE(isp::measure_saliency(evidence_logits, {x, on, {}, centres}, o).object_centroid_std_row.has_value());
  // The foreground of normalised images: raw = x * std + mean above the threshold.
  const at::Tensor normalised = (x - 0.25) / 0.5;
  CHECK(at::equal(isp::foreground_of(normalised, {0.25}, {0.5}, 0.0), fg));
}
