// Pruning: gate statistics, R_res, one-shot allocation at a FLOPs target, and a tiny prune -> finetune ->
// export -> reload pipeline whose reloaded logits equal the finetuned network's.
#include "test_support.h"

#include <torch/script.h>

#include <algorithm>
#include <cmath>
#include <fstream>
#include <set>
#include <sstream>

#include <fcntl.h>
#include <sys/file.h>
#include <sys/wait.h>

#include "isp/artifacts.h"
#include "isp/checkpoint.h"
#include "isp/cost.h"
#include "isp/interfaces/backbone.h"
#include "isp/interfaces/pruner.h"
#include "isp/interfaces/regularizer.h"
#include "isp/interfaces/stage.h"
#include "isp/registry/recipe.h"
#include "isp/runner.h"
#include <stb/stb_image.h>

namespace fs = std::filesystem;
using isp::json;

namespace {

isp::Registry& registry() { return isp_test::shared_registry(); }

struct Built {
  std::unique_ptr<isp::BuildContext> ctx;
  std::shared_ptr<isp::Backbone> backbone;
  std::unique_ptr<isp::CostModel> cost;
};
Built build(const json& nodes) {
  Built b;
  b.ctx = std::make_unique<isp::BuildContext>(registry(), json{{"nodes", nodes}},
                                              [](const std::string& p) { return isp::Where{"t.json", p}; });
  b.backbone = b.ctx->node<isp::Backbone>("backbone");
  b.cost = std::make_unique<isp::CostModel>(b.backbone->layer_shapes(), b.backbone->gated_layers());
  return b;
}

// classifier -> prune -> finetune -> export on 160 synthetic images: seconds on a CPU.
json tiny_pipeline_recipe() {
  return {
      {"seed", 5},
      {"runtime", {{"threads", 2}, {"device", "cpu"}}},
      {"nodes",
       {{"data", {{"type", "SyntheticImages"}, {"num_train", 160}, {"num_test", 40}, {"num_classes", 4}}},
        {"backbone", {{"type", "ResNetCifar"}, {"depth", 20}, {"num_classes", 4}}},
        {"classifier", {{"type", "TrainClassifier"}, {"model", {{"$ref", "backbone"}}}, {"data", {{"$ref", "data"}}},
                        {"epochs", 2}, {"batch_size", 32}, {"lr", 0.05}, {"milestones", json::array()}}},
        {"gates", {{"type", "FreeLogitGates"}}},
        {"flops", {{"type", "FlopsBudget"}, {"target", 0.5}, {"weight", 5.0}}},
        {"ce", {{"type", "CrossEntropyTerm"}, {"weight", 1.0}}},
        {"prune", {{"type", "PruneChannels"}, {"classifier", {{"$ref", "classifier"}}}, {"pruner", {{"$ref", "gates"}}},
                   {"data", {{"$ref", "data"}}}, {"regularizers", {{{"$ref", "flops"}}, {{"$ref", "ce"}}}},
                   {"subset_fraction", 0.5}, {"epochs", 6}, {"batch_size", 36}, {"lr", 0.2}, {"eval_every", 2}}},
        {"finetune", {{"type", "Finetune"}, {"pruned", {{"$ref", "prune"}}}, {"data", {{"$ref", "data"}}},
                      {"epochs", 1}, {"batch_size", 32}, {"lr", 0.01}, {"milestones", json::array()}}},
        {"export", {{"type", "Export"}, {"model", {{"$ref", "finetune"}}}, 
                    {"data", {{"$ref", "data"}}}}}}},
      {"stages", {{{"$ref", "classifier"}}, {{"$ref", "prune"}}, {{"$ref", "finetune"}}, {{"$ref", "export"}}}}};
}

json ref(const std::string& n) { return {{"$ref", n}}; }

// The tiny pipeline without finetuning: classifier -> prune -> export of the pruned network.
json tiny_prune_export_recipe() {
  json r = tiny_pipeline_recipe();
  r["stages"] = {ref("classifier"), ref("prune"), ref("export")};
  r["nodes"]["export"]["model"] = ref("prune");
  return r;
}

// classifier -> predictor -> selector -> prune -> export with a real (tiny) AEM on synthetic blobs.
json selector_pipeline_recipe() {
  json nodes = {
      {"data", {{"type", "SyntheticImages"}, {"num_train", 160}, {"num_test", 40}, {"num_classes", 4},
                {"val_fraction", 0.2}, {"crop_padding", 0}, {"horizontal_flip", false}}},
      {"backbone", {{"type", "ResNetCifar"}, {"depth", 20}, {"num_classes", 4}}},
      {"classifier", {{"type", "TrainClassifier"}, {"model", ref("backbone")}, {"data", ref("data")}, {"epochs", 2},
                      {"batch_size", 32}, {"lr", 0.05}, {"milestones", json::array()}}},
      {"mask_source", {{"type", "RandomRbfMasks"}}},
      {"predictor", {{"type", "TrainPredictor"}, {"classifier", ref("classifier")}, {"data", ref("data")},
                     {"mask_source", ref("mask_source")}, {"epochs", 1}, {"batch_size", 32}, {"lr", 2e-3},
                     {"init_from_classifier", true}}},
      {"filter", {{"type", "ClassEmbeddingFilter"}, {"encoder", ref("backbone")}}},
      {"decoder", {{"type", "UNetDecoder"}, {"encoder", ref("backbone")}}},
      {"head", {{"type", "RbfMaskHead"}, {"decoder", ref("decoder")}, {"encoder", ref("backbone")}}},
      {"mask_sampler", {{"type", "RelaxedBernoulli"}, {"temperature", 1.0}}},
      {"area", {{"type", "MaskArea"}}},
      {"selector", {{"type", "TrainSelector"}, {"predictor", ref("predictor")},
                    {"filter", ref("filter")}, {"decoder", ref("decoder")}, {"head", ref("head")},
                    {"sampler", ref("mask_sampler")}, {"regularizers", {ref("area")}}, {"data", ref("data")},
                    {"epochs", 1}, {"batch_size", 16}, {"lr", 1e-3}, {"max_steps_per_epoch", 4},
                    {"metrics_images", 8}}},
      {"interp", {{"type", "RbfParamDistance"}, {"weight", 10.0}, {"mode", "raw"}}},
      {"gates", {{"type", "FreeLogitGates"}, {"offset", 0.0}, {"init_std", 0.0}}},
      {"prune", {{"type", "PruneChannels"}, {"classifier", ref("classifier")}, {"selector", ref("selector")},
                 {"pruner", ref("gates")}, {"data", ref("data")}, {"regularizers", {ref("interp")}},
                 {"subset_fraction", 0.5}, {"epochs", 8}, {"batch_size", 16}, {"lr", 0.2}, {"eval_every", 4},
                 {"bn_policy", "frozen"}}},
      // The saliency metrics (about 90 classifier passes per image) on 8 images: these tests check pruning and
      // export, and test_aem_stages.cpp checks the metrics themselves.
      {"export", {{"type", "Export"}, {"model", ref("prune")}, {"selector", ref("selector")},
                  {"data", ref("data")}, {"agreement_images", 40}, {"metrics_images", 8}}}};
  return {{"seed", 3},
          {"runtime", {{"threads", 2}, {"device", "cpu"}}},
          {"nodes", nodes},
          {"stages", {ref("classifier"), ref("predictor"), ref("selector"), ref("prune"), ref("export")}}};
}

std::vector<json> metrics_of(const fs::path& run, const std::string& stage) {
  std::vector<json> out;
  std::ifstream in(run / "metrics.jsonl");
  for (std::string line; std::getline(in, line);)
    if (json j = json::parse(line); j["stage"] == stage) out.push_back(j);
  return out;
}

}  // namespace

TEST_CASE("gates: Gumbel-sigmoid statistics, straight-through, deterministic final architecture") {
  auto b = build({{"backbone", {{"type", "ResNetCifar"}, {"depth", 20}}},
                  {"gates", {{"type", "FreeLogitGates"}, {"init_std", 0.0}, {"offset", 3.0}, {"temperature", 0.4}}}});
  auto pruner = b.ctx->node<isp::Pruner>("gates");
  pruner->attach(*b.backbone, *b.cost);
  CHECK(pruner->learns_gates());
  const int64_t W = b.backbone->total_gate_width();
  CHECK(W == 3 * 16 + 3 * 32 + 3 * 64);  // ResNet-20: 3 blocks per stage
  // theta = -3: P(on) = P(theta + g + 3 >= 0) = 1 - exp(-e^(theta+3)) = 1 - 1/e (docs/method.md §2.4)
  {
    torch::NoGradGuard ng;
    pruner->parameters()[0].fill_(-3.0);
  }
  double on = 0;
  const int reps = 200;
  for (int i = 0; i < reps; ++i) on += pruner->hard_gates().mean().item<double>();
  on /= reps;
  CHECK(on == doctest::Approx(1.0 - std::exp(-1.0)).epsilon(0.02));
  at::Tensor h = pruner->hard_gates();
  CHECK(at::logical_or(h.eq(0), h.eq(1)).all().item<bool>());
  // Straight-through: the gradient of the soft gate reaches the logits.
  h.sum().backward();
  CHECK(pruner->parameters()[0].grad().abs().sum().item<double>() > 0);
  // Deterministic architecture, and a layer pushed fully off still keeps one channel.
  {
    torch::NoGradGuard ng;
    pruner->parameters()[0].fill_(1.0);
    pruner->parameters()[0].narrow(0, 0, 16).fill_(-10.0);
  }
  at::Tensor f1 = pruner->final_gates(), f2 = pruner->final_gates();
  CHECK(at::equal(f1, f2));
  CHECK(f1.narrow(0, 0, 16).sum().item<double>() == 1.0);
  CHECK(f1.narrow(0, 16, W - 16).min().item<double>() == 1.0);
}

TEST_CASE("gates: the final rule keeps a channel iff its keep-probability is >= 0.5 (median), zero and official rules") {
  const double lnln2 = std::log(std::log(2.0));  // -0.3665
  auto make = [&](const char* rule) {
    auto b = build({{"backbone", {{"type", "ResNetCifar"}, {"depth", 20}}},
                    {"gates", {{"type", "FreeLogitGates"}, {"offset", 3.0}, {"final_rule", rule}}}});
    auto pruner = b.ctx->node<isp::Pruner>("gates");
    pruner->attach(*b.backbone, *b.cost);
    // Hand-set logits in the first layer (16 channels): theta + b = lnln2 -/+ 0.05 alternately, and
    // theta + b = -0.2 (between lnln2 and 0) on channels 0..3; the rest clearly on.
    torch::NoGradGuard ng;
    at::Tensor theta = pruner->parameters()[0];
    theta.fill_(5.0);
    for (int64_t i = 0; i < 16; ++i) theta[i] = lnln2 - 3.0 + (i % 2 ? 0.05 : -0.05);
    for (int64_t i = 0; i < 4; ++i) theta[i] = -0.2 - 3.0;
    return std::make_pair(std::move(b), pruner);
  };
  {
    auto [b, pruner] = make("median");
    at::Tensor g = pruner->final_gates().narrow(0, 0, 16);
    // channels 0..3 (P = 0.56) and the odd ones from 5 on (P = 0.52) are kept; even ones from 4 on (P = 0.48) are not
    for (int64_t i = 0; i < 16; ++i) CHECK_MESSAGE(g[i].item<double>() == (i < 4 || i % 2 ? 1.0 : 0.0), "channel " << i);
    at::Tensor p = pruner->keep_probabilities();
    CHECK(p[0].item<double>() == doctest::Approx(1.0 - std::exp(-std::exp(-0.2))).epsilon(1e-6));
    CHECK(p[5].item<double>() > 0.5);
    CHECK(p[4].item<double>() < 0.5);
    // The rule is the median of the training noise: the empirical keep frequency is on the same side of 0.5.
    CHECK(p[5].item<double>() == doctest::Approx(1.0 - std::pow(2.0, -std::exp(0.05))).epsilon(1e-6));
    // (4000 draws: the frequency's standard deviation is 0.008; the tolerance is 4.4 of them.)
    torch::manual_seed(11);
    int64_t on5 = 0, on4 = 0;
    for (int k = 0; k < 4000; ++k) {
      at::Tensor h = pruner->hard_gates();
      on5 += h[5].item<double>() > 0.5;
      on4 += h[4].item<double>() > 0.5;
    }
    MESSAGE("empirical keep frequency: P=" << p[5].item<double>() << " -> " << on5 / 4000.0 << ", P=" << p[4].item<double>()
                                           << " -> " << on4 / 4000.0);
    CHECK(std::abs(on5 / 4000.0 - p[5].item<double>()) < 0.035);
    CHECK(std::abs(on4 / 4000.0 - p[4].item<double>()) < 0.035);
    CHECK(at::equal(pruner->keep_scores().ge(0).to(at::kFloat), pruner->final_gates()));
  }
  {
    auto [b, pruner] = make("zero");  // theta + b >= 0: none of the 16 is kept but the strongest (forced)
    at::Tensor g = pruner->final_gates().narrow(0, 0, 16);
    CHECK(g.sum().item<double>() == 1.0);
  }
  {
    auto [b, pruner] = make("official");  // one noisy sample with a fixed seed: repeatable, and not the median
    at::Tensor g1 = pruner->final_gates(), g2 = pruner->final_gates();
    CHECK(at::equal(g1, g2));
    at::Tensor noise_free = pruner->keep_scores();
    CHECK(at::logical_or(g1.eq(0), g1.eq(1)).all().item<bool>());
    CHECK(noise_free.numel() == g1.numel());
  }
}

TEST_CASE("GRU hypernetwork gates: one logit per channel, trainable") {
  auto b = build({{"backbone", {{"type", "ResNetCifar"}, {"depth", 20}}}, {"gates", {{"type", "GruHypernetGates"}}}});
  auto pruner = b.ctx->node<isp::Pruner>("gates");
  pruner->attach(*b.backbone, *b.cost);
  at::Tensor s = pruner->soft_gates();
  CHECK(s.numel() == b.backbone->total_gate_width());
  CHECK(s.min().item<double>() >= 0.0);
  CHECK(s.max().item<double>() <= 1.0);
  s.sum().backward();
  int64_t with_grad = 0;
  for (auto& p : pruner->parameters()) with_grad += p.grad().defined() && p.grad().abs().sum().item<double>() > 0;
  CHECK(with_grad >= 3);  // GRU, LayerNorm and heads all learn
}

TEST_CASE("FlopsBudget log_ratio: R_res = log(max(r, p) / p)") {
  json nodes = {{"r", {{"type", "FlopsBudget"}, {"target", 0.25}, {"mode", "log_ratio"}}}};
  isp::BuildContext ctx(registry(), json{{"nodes", nodes}}, [](const std::string& p) { return isp::Where{"t.json", p}; });
  auto reg = ctx.node<isp::Regularizer>("r");
  isp::LossInputs in;
  in.flops_ratio = torch::tensor(0.4907);
  CHECK(reg->compute(in).item<double>() == doctest::Approx(std::log(0.4907 / 0.25)).epsilon(1e-6));
  in.flops_ratio = torch::tensor(0.2);
  CHECK(reg->compute(in).item<double>() == doctest::Approx(0.0));
  isp::LossInputs empty;
  CHECK_THROWS_AS(reg->compute(empty), isp::Error);
  CHECK(reg->state().empty());
  REQUIRE(reg->flops_budget());
  CHECK(reg->flops_budget()->target == 0.25);
}

TEST_CASE("FlopsBudget lagrangian: lambda * (r - p) with dual ascent on the extracted ratio, state restored in place") {
  json nodes = {{"r", {{"type", "FlopsBudget"}, {"target", 0.5}, {"dual_lr", 0.5}}}};
  isp::BuildContext ctx(registry(), json{{"nodes", nodes}}, [](const std::string& p) { return isp::Where{"t.json", p}; });
  auto reg = ctx.node<isp::Regularizer>("r");
  auto step = [&](double r, double r_final) {
    isp::LossInputs in;
    in.flops_ratio = torch::tensor(r, torch::requires_grad());
    in.final_flops_ratio = torch::tensor(r_final);
    at::Tensor t = reg->compute(in);
    t.backward();
    return std::make_pair(t.item<double>(), in.flops_ratio.grad().item<double>());
  };
  // lambda starts at 0: no pressure, then lambda = 0.5 * (0.9 - 0.5) = 0.2
  auto [t0, g0] = step(0.8, 0.9);
  CHECK(t0 == 0.0);
  CHECK(g0 == 0.0);
  auto [t1, g1] = step(0.8, 0.9);  // term = 0.2 * (0.8 - 0.5); lambda -> 0.4
  CHECK(t1 == doctest::Approx(0.2 * 0.3));
  CHECK(g1 == doctest::Approx(0.2));
  auto [t2, g2] = step(0.6, 0.2);  // term = 0.4 * 0.1; lambda -> max(0, 0.4 - 0.15) = 0.25
  CHECK(t2 == doctest::Approx(0.04));
  CHECK(g2 == doctest::Approx(0.4));
  auto st = reg->state();
  REQUIRE(st.size() == 1);
  CHECK(st[0].second.item<double>() == doctest::Approx(0.25));
  step(0.3, 0.0);  // lambda -> max(0, 0.25 - 0.25) = 0
  CHECK(reg->state()[0].second.item<double>() == doctest::Approx(0.0));
  step(0.3, 0.0);  // never negative
  CHECK(reg->state()[0].second.item<double>() == 0.0);
  // Resume: the saved multiplier is copied into the term's own tensor.
  reg->state()[0].second.copy_(torch::tensor(0.7, torch::kDouble));
  CHECK(step(0.6, 0.6).first == doctest::Approx(0.7 * 0.1));
  // The extracted architecture's ratio is required.
  isp::LossInputs no_final;
  no_final.flops_ratio = torch::tensor(0.5);
  CHECK(isp_test::error_of([&] { reg->compute(no_final); }).find("extracted architecture") != std::string::npos);
}

TEST_CASE("L1-norm and random pruners meet the whole-network FLOPs target") {
  for (const char* type : {"L1NormPruner", "RandomPruner"}) {
    auto b = build({{"backbone", {{"type", "ResNetCifar"}, {"depth", 20}}},
                    {"p", {{"type", type}, {"target_flops_ratio", 0.5}}}});
    auto pruner = b.ctx->node<isp::Pruner>("p");
    pruner->attach(*b.backbone, *b.cost);
    CHECK_FALSE(pruner->learns_gates());
    at::Tensor g = pruner->final_gates();
    at::Tensor kept = b.cost->kept_per_layer(g);
    std::vector<int64_t> widths;
    for (int64_t i = 0; i < kept.numel(); ++i) widths.push_back(static_cast<int64_t>(kept[i].item<double>()));
    double ratio = b.cost->count(widths).flops / b.cost->full_flops();
    MESSAGE(type << ": kept FLOPs ratio " << ratio);
    CHECK(ratio <= 0.5);
    CHECK(ratio > 0.4);
    CHECK(*std::min_element(widths.begin(), widths.end()) >= 1);
  }
}

TEST_CASE("tiny pipeline on synthetic data: prune -> finetune -> export -> reload gives identical logits") {
  auto dir = isp_test::temp_dir("pipeline");
  json recipe = tiny_pipeline_recipe();
  std::ofstream(dir / "recipe.json") << recipe.dump(2);
  isp::RunOptions o;
  o.recipe_path = (dir / "recipe.json").string();
  o.work_dir = (dir / "run").string();
  REQUIRE(isp::run_recipe(registry(), o) == 0);
  json report = json::parse(isp::read_text_file((dir / "run" / "report.json").string()));
  for (const char* key : {"baseline_top1", "pruned_top1", "finetuned_top1", "flops_before", "flops_after", "params_before", "params_after"})
    CHECK_MESSAGE(report.contains(key), key);
  CHECK(report["flops_after"].get<double>() < report["flops_before"].get<double>());
  CHECK(report["params_after"].get<double>() < report["params_before"].get<double>());
  CHECK(fs::exists(dir / "run" / "report.md"));

  // Reload the export without the run and compare with the finetuned network restored from the run folder.
  isp::LoadedExport ex = isp::load_export(registry(), (dir / "run" / "export").string());
  isp::RestoredRun run = isp::restore_run(registry(), (dir / "run").string());
  std::string producer;
  const auto pruned = run.latest<isp::PrunedNetwork>(&producer);
  REQUIRE(pruned);
  CHECK(producer == "finetune");
  auto finetuned = pruned->network;
  finetuned->eval();
  torch::NoGradGuard ng;
  at::Tensor x = torch::randn({8, 3, 32, 32});
  double diff = (ex.model->forward(x) - finetuned->forward(x)).abs().max().item<double>();
  MESSAGE("export reload max |logit difference|: " << diff);
  CHECK(diff == 0.0);
  CHECK(ex.structure["layers"].size() == 9);
}

TEST_CASE("stage fingerprints: --reuse takes over matching stages, --resume --force reruns only what changed") {
  auto dir = isp_test::temp_dir("reuse");
  json a = tiny_pipeline_recipe();
  json b = a;
  b["nodes"]["finetune"]["epochs"] = 2;  // changes finetune and, through the chain, export
  std::ofstream(dir / "a.json") << a.dump(2);
  std::ofstream(dir / "b.json") << b.dump(2);
  auto read = [](const fs::path& p) { return json::parse(isp::read_text_file(p.string())); };

  isp::RunOptions oa;
  oa.recipe_path = (dir / "a.json").string();
  oa.work_dir = (dir / "a").string();
  REQUIRE(isp::run_recipe(registry(), oa) == 0);

  isp::RunOptions ob;
  ob.recipe_path = (dir / "b.json").string();
  ob.work_dir = (dir / "b").string();
  ob.reuse_from = {oa.work_dir};
  REQUIRE(isp::run_recipe(registry(), ob) == 0);
  json sb = read(dir / "b" / "summary.json");
  CHECK(sb["stages"]["classifier"].contains("reused_from"));
  CHECK(sb["stages"]["prune"].contains("reused_from"));
  CHECK_FALSE(sb["stages"]["finetune"].contains("reused_from"));
  CHECK_FALSE(sb["stages"]["export"].contains("reused_from"));
  // Reused files are the same files (hard links), not retrained copies.
  CHECK(fs::equivalent(dir / "a" / "prune" / "gates.pt", dir / "b" / "prune" / "gates.pt"));
  CHECK(fs::equivalent(dir / "a" / "classifier" / "final.pt", dir / "b" / "classifier" / "final.pt"));
  CHECK(read(dir / "b" / "report.json")["baseline_top1"] == read(dir / "a" / "report.json")["baseline_top1"]);
  int classifier_lines = 0;
  {
    std::ifstream in(dir / "b" / "metrics.jsonl");
    for (std::string line; std::getline(in, line);) classifier_lines += json::parse(line)["stage"] == "classifier";
  }
  CHECK(classifier_lines > 0);
  // --reuse only starts new runs.
  CHECK_THROWS_AS(isp::run_recipe(registry(), ob), isp::Error);

  // Resuming run a with recipe b: refused without --force, naming the changed stages.
  isp::RunOptions ra = oa;
  ra.recipe_path = ob.recipe_path;
  ra.resume = true;
  std::string err = isp_test::error_of([&] { isp::run_recipe(registry(), ra); });
  CHECK(err.find("finetune, export") != std::string::npos);
  CHECK(err.find("--force") != std::string::npos);
  ra.force = true;
  REQUIRE(isp::run_recipe(registry(), ra) == 0);
  CHECK(fs::exists(dir / "a" / "finetune.replaced-1" / "final.pt"));
  CHECK(fs::exists(dir / "a" / "export.replaced-1"));
  CHECK_FALSE(fs::exists(dir / "a" / "prune.replaced-1"));
  CHECK(read(dir / "a" / "state.json")["completed"].size() == 4);
  // Resuming again with the same recipe reruns nothing.
  ra.force = false;
  REQUIRE(isp::run_recipe(registry(), ra) == 0);
  CHECK_FALSE(fs::exists(dir / "a" / "finetune.replaced-2"));
}

TEST_CASE("gate learning interrupted mid-epoch and resumed learns exactly the gates of an uninterrupted run") {
  auto dir = isp_test::temp_dir("prune_resume");
  json recipe = tiny_pipeline_recipe();
  recipe["stages"] = {{{"$ref", "classifier"}}, {{"$ref", "prune"}}};
  std::ofstream(dir / "recipe.json") << recipe.dump(2);
  isp::RunOptions straight;
  straight.recipe_path = (dir / "recipe.json").string();
  straight.work_dir = (dir / "straight").string();
  ::unsetenv("ISP_INTERRUPT_AFTER_STEPS");
  REQUIRE(isp::run_recipe(registry(), straight) == 0);

  // Each stage stops after 7 of its own steps: the classifier (5 steps per epoch) in its 2nd epoch, then,
  // after a resume, gate learning (2 steps per epoch: 80 images in batches of 36) in its 4th epoch.
  isp::RunOptions broken = straight;
  broken.work_dir = (dir / "broken").string();
  ::setenv("ISP_INTERRUPT_AFTER_STEPS", "7", 1);
  CHECK(isp::run_recipe(registry(), broken) == 130);
  broken.resume = true;
  CHECK(isp::run_recipe(registry(), broken) == 130);
  ::unsetenv("ISP_INTERRUPT_AFTER_STEPS");
  isp::CheckpointReader ck((dir / "broken" / "prune" / "checkpoint.pt").string());
  CHECK(ck.meta()["epoch"] == 3);
  CHECK(ck.meta()["step"] == 1);
  REQUIRE(isp::run_recipe(registry(), broken) == 0);

  at::Tensor a = isp::CheckpointReader((dir / "straight" / "prune" / "gates.pt").string()).tensor("gates");
  at::Tensor b = isp::CheckpointReader((dir / "broken" / "prune" / "gates.pt").string()).tensor("gates");
  at::Tensor la = isp::CheckpointReader((dir / "straight" / "prune" / "checkpoint.pt").string()).tensor("rng");
  at::Tensor lb = isp::CheckpointReader((dir / "broken" / "prune" / "checkpoint.pt").string()).tensor("rng");
  CHECK(a.equal(b));
  CHECK(la.equal(lb));  // the same random stream was consumed
  json sa = json::parse(isp::read_text_file((dir / "straight" / "summary.json").string()));
  json sb = json::parse(isp::read_text_file((dir / "broken" / "summary.json").string()));
  CHECK(sa["pruned_top1"] == sb["pruned_top1"]);
  CHECK(sa["selected_epoch"] == sb["selected_epoch"]);
}

TEST_CASE("export weights.pt follows torch.load's zip + pickle protocol (read back without this project)") {
  // python3 is installed by scripts/setup.sh; without it this test fails (it never passes by skipping).
  REQUIRE_MESSAGE(std::system("command -v python3 >/dev/null 2>&1") == 0, "python3 is required (scripts/setup.sh installs it)");
  struct Net : torch::nn::Module {
    Net() {
      fc = register_module("fc", torch::nn::Linear(3, 2));
      steps = register_buffer("steps", torch::tensor({7, -3}, torch::kLong));
    }
    torch::nn::Linear fc{nullptr};
    at::Tensor steps;
  } net;
  {
    torch::NoGradGuard ng;
    net.fc->weight.copy_(torch::arange(6, torch::kFloat).reshape({2, 3}) * 0.25 - 0.5);
    net.fc->bias.copy_(torch::tensor({1.5f, -2.0f}));
  }
  auto dir = isp_test::temp_dir("python_weights");
  const std::string path = (dir / "weights.pt").string(), out = (dir / "read.json").string();
  isp::save_state_dict_for_python(net, path);
  const std::string cmd = "python3 " + std::string(ISP_SOURCE_DIR) + "/scripts/read_torch_weights.py " + path + " > " + out;
  REQUIRE(std::system(cmd.c_str()) == 0);
  json r = json::parse(isp::read_text_file(out));
  REQUIRE(r.size() == 3);
  CHECK(r["fc.weight"]["dtype"] == "float32");
  CHECK(r["fc.weight"]["shape"] == json({2, 3}));
  CHECK(r["fc.weight"]["values"] == json({-0.5, -0.25, 0.0, 0.25, 0.5, 0.75}));
  CHECK(r["fc.bias"]["values"] == json({1.5, -2.0}));
  CHECK(r["steps"]["dtype"] == "int64");
  CHECK(r["steps"]["values"] == json({7, -3}));
}

TEST_CASE("budget: the extracted architecture is projected onto the target, and a missed budget is loud") {
  auto dir = isp_test::temp_dir("budget");
  auto read = [](const fs::path& p) { return json::parse(isp::read_text_file(p.string())); };
  // Met: the tiny pipeline's target 0.5 (learned gates, Lagrangian budget, projection to the target).
  json met = tiny_prune_export_recipe();
  std::ofstream(dir / "met.json") << met.dump(2);
  isp::RunOptions o;
  o.recipe_path = (dir / "met.json").string();
  o.work_dir = (dir / "met").string();
  REQUIRE(isp::run_recipe(registry(), o) == 0);
  json r = read(dir / "met" / "report.json");
  REQUIRE(r.contains("budget_met"));
  CHECK(r["budget_met"] == true);
  CHECK(r["budget_target"] == 0.5);
  // Projection: the largest architecture at or under the target, so within one channel's cost of it.
  CHECK(r["budget_achieved"].get<double>() <= 0.5);
  CHECK(r["budget_achieved"].get<double>() >= 0.48);
  CHECK(r["flops_ratio"].get<double>() == doctest::Approx(r["budget_achieved"].get<double>()));
  CHECK(r.contains("selected_expected_flops_ratio"));
  CHECK(r.contains("selected_deterministic_flops_ratio"));
  CHECK(isp::read_text_file((dir / "met" / "report.md").string()).rfind("# Pruning report", 0) == 0);
  // Every evaluated candidate was at the budget.
  for (const auto& line : metrics_of(dir / "met", "prune"))
    if (line.contains("final_flops_ratio")) CHECK(line["final_flops_ratio"].get<double>() <= 0.5);

  // Missed: a target below what one channel per layer costs can never be met.
  json miss = met;
  miss["nodes"]["flops"]["target"] = 0.01;
  std::ofstream(dir / "miss.json") << miss.dump(2);
  o.recipe_path = (dir / "miss.json").string();
  o.work_dir = (dir / "miss").string();
  o.reuse_from = {(dir / "met").string()};  // the classifier is shared
  CHECK(isp::run_recipe(registry(), o) == 4);  // after writing the report and the export
  r = read(dir / "miss" / "report.json");
  CHECK(r["budget_met"] == false);
  CHECK(r["budget_achieved"].get<double>() > 0.01);
  CHECK(fs::exists(dir / "miss" / "export" / "weights.pt"));
  std::string md = isp::read_text_file((dir / "miss" / "report.md").string());
  CHECK(md.rfind("**WARNING: FLOPs budget missed**", 0) == 0);
  // ... unless the recipe says warn.
  miss["nodes"]["prune"]["on_budget_miss"] = "warn";
  std::ofstream(dir / "warn.json") << miss.dump(2);
  o.recipe_path = (dir / "warn.json").string();
  o.work_dir = (dir / "warn").string();
  CHECK(isp::run_recipe(registry(), o) == 0);
  CHECK(read(dir / "warn" / "report.json")["budget_met"] == false);

  // Only architectures that can be selected are extracted and scored: none up to select_after_epoch, and after it
  // those within the budget (target + budget_tolerance) whose ratio before projection is within candidate_slack of
  // the target. A slack of 1 admits any ratio before projection, and the projection puts every architecture at the
  // target (checked above), so exactly the last evaluation (epoch 6) is a candidate, and it is the one selected.
  json late = met;
  late["nodes"]["prune"]["select_after_epoch"] = 4;
  late["nodes"]["prune"]["candidate_slack"] = 1.0;
  std::ofstream(dir / "late.json") << late.dump(2);
  o.recipe_path = (dir / "late.json").string();
  o.work_dir = (dir / "late").string();
  REQUIRE(isp::run_recipe(registry(), o) == 0);
  const json late_prune = read(dir / "late" / "summary.json")["stages"]["prune"];
  REQUIRE(late_prune.contains("selected_epoch"));
  const int64_t chosen = late_prune["selected_epoch"].get<int64_t>();
  int evaluated = 0, scored = 0;
  for (const auto& line : metrics_of(dir / "late", "prune")) {
    if (!line.contains("final_flops_ratio")) continue;
    ++evaluated;
    const int64_t epoch = line["epoch"].get<int64_t>();
    CHECK_MESSAGE(line.contains("val_top1_gated") == (epoch > 4), line.dump());
    scored += line.contains("val_top1_gated");
  }
  CHECK(evaluated == 3);  // epochs 2, 4 and 6 (eval_every 2)
  CHECK(scored == 1);
  CHECK(chosen == 6);
  // The report says how the architecture was chosen: here by a candidate's validation accuracy.
  CHECK(late_prune["selected_by"] == "validation accuracy");
  CHECK(isp::read_text_file((dir / "late" / "report.md").string())
            .find("The architecture (epoch 6) was the candidate with the best validation accuracy") != std::string::npos);
  // With the default slack, whichever way the met run went, the report says it in the same terms.
  const json met_prune = read(dir / "met" / "summary.json")["stages"]["prune"];
  const std::string met_md = isp::read_text_file((dir / "met" / "report.md").string());
  bool met_line_scored = false;
  for (const auto& line : metrics_of(dir / "met", "prune"))
    if (line["epoch"] == met_prune["selected_epoch"]) met_line_scored = line.contains("val_top1_gated");
  if (met_prune["selected_by"] == "validation accuracy") {
    CHECK(met_line_scored);
    CHECK(met_md.find("was the candidate with the best validation accuracy") != std::string::npos);
  } else {
    CHECK(met_prune["selected_by"] == "closest to the budget");
    CHECK_FALSE(met_line_scored);
    CHECK(met_md.find("its widths are mostly the projection's") != std::string::npos);
  }

  // Aligned widths: channel_multiple 8 keeps a multiple of 8 channels (or all 16 / 32 / 64) in every gated layer,
  // at the same target. The projection steps one channel group at a time, so the achieved ratio is within the
  // dearest group's cost of it (8 channels of a 16-wide layer at 32x32: under 6 % of ResNet-20's FLOPs).
  json aligned = met;
  aligned["nodes"]["prune"]["channel_multiple"] = 8;
  std::ofstream(dir / "aligned.json") << aligned.dump(2);
  o.recipe_path = (dir / "aligned.json").string();
  o.work_dir = (dir / "aligned").string();
  REQUIRE(isp::run_recipe(registry(), o) == 0);
  r = read(dir / "aligned" / "report.json");
  CHECK(r["budget_met"] == true);
  CHECK(r["budget_achieved"].get<double>() <= 0.5);
  CHECK(r["budget_achieved"].get<double>() >= 0.44);
  REQUIRE(r["kept_widths"].size() == r["full_widths"].size());
  REQUIRE(r["kept_widths"].size() == 9);
  bool any_pruned = false;
  for (std::size_t i = 0; i < r["kept_widths"].size(); ++i) {
    const int64_t kept = r["kept_widths"][i].get<int64_t>(), full = r["full_widths"][i].get<int64_t>();
    CHECK((kept % 8 == 0 || kept == full));
    CHECK(kept >= 8);
    any_pruned = any_pruned || kept < full;
  }
  CHECK(any_pruned);
  for (const auto& line : metrics_of(dir / "aligned", "prune"))
    if (line.contains("final_flops_ratio")) CHECK(line["final_flops_ratio"].get<double>() <= 0.5);
}

TEST_CASE("budget: recipe errors for a term that can never be active or cannot be computed") {
  auto dir = isp_test::temp_dir("budget_errors");
  auto error_for = [&](json recipe) {
    std::ofstream(dir / "r.json") << recipe.dump(2);
    isp::RunOptions o;
    o.recipe_path = (dir / "r.json").string();
    o.validate_only = true;
    return isp_test::error_of([&] { isp::run_recipe(registry(), o); });
  };
  json base = tiny_pipeline_recipe();
  // The official numerator of the unpruned ResNet-20 is below 1, so a target above it is never active.
  json official = base;
  official["nodes"]["flops"]["counting"] = "official";
  official["nodes"]["flops"]["target"] = 0.95;
  std::string err = error_for(official);
  CHECK(err.find("/nodes/flops/target") != std::string::npos);
  CHECK(err.find("never active") != std::string::npos);
  official["nodes"]["flops"]["target"] = 0.3;
  CHECK(error_for(official).empty());
  // An interpretation term without a selector.
  json no_selector = base;
  no_selector["nodes"]["interp"] = {{"type", "RbfParamDistance"}};
  no_selector["nodes"]["prune"]["regularizers"].push_back(ref("interp"));
  err = error_for(no_selector);
  CHECK(err.find("/nodes/interp/type") != std::string::npos);
  CHECK(err.find("needs a selector") != std::string::npos);
  // RBF-parameter distance with a head that predicts no RBF parameters.
  json pixel = selector_pipeline_recipe();
  pixel["nodes"]["head"] = {{"type", "RealXPixelHead"}, {"decoder", ref("decoder")}};
  err = error_for(pixel);
  CHECK(err.find("/nodes/interp/mode") != std::string::npos);
  pixel["nodes"]["interp"]["mode"] = "map";
  CHECK(error_for(pixel).empty());
  // Aligned widths are chosen by the budget projection: without one the option would be ignored, so it is refused.
  json aligned = base;
  aligned["nodes"]["prune"]["channel_multiple"] = 8;
  CHECK(error_for(aligned).empty());
  aligned["nodes"]["prune"]["budget_projection"] = "none";
  err = error_for(aligned);
  CHECK(err.find("/nodes/prune/channel_multiple") != std::string::npos);
  CHECK(err.find("budget_projection") != std::string::npos);
  json one_shot = base;
  one_shot["nodes"]["gates"] = {{"type", "L1NormPruner"}, {"target_flops_ratio", 0.5}};
  one_shot["nodes"]["prune"]["channel_multiple"] = 8;
  err = error_for(one_shot);
  CHECK(err.find("/nodes/prune/channel_multiple") != std::string::npos);
  CHECK(err.find("one-shot") != std::string::npos);
}

TEST_CASE("interpretation-steered pruning: the RBF-parameter term is minimised, and moves saliency less than random channels at the same FLOPs") {
  // PruneChannels with a real selector and the interpretation term alone (no budget): gate learning must
  // bring the selector's RBF parameters on the gated network towards the unpruned network's, and the
  // extracted architecture must move the saliency maps less than random channel choices with the same FLOPs.
  auto dir = isp_test::temp_dir("interp_steers");
  auto read = [](const fs::path& p) { return json::parse(isp::read_text_file(p.string())); };
  json recipe = selector_pipeline_recipe();
  recipe["nodes"]["prune"]["epochs"] = 40;
  recipe["nodes"]["prune"]["eval_every"] = 20;
  // The unpruned BN statistics, as during gate learning: this compares which channels were chosen, not how
  // re-estimated statistics move features (adaptive BN alone moves this tiny selector's centres by pixels).
  recipe["nodes"]["prune"]["bn_recalibration_images"] = 0;
  std::ofstream(dir / "r.json") << recipe.dump(2);
  isp::RunOptions o;
  o.recipe_path = (dir / "r.json").string();
  o.work_dir = (dir / "isp").string();
  REQUIRE(isp::run_recipe(registry(), o) == 0);
  auto lines = metrics_of(dir / "isp", "prune");
  REQUIRE(lines.size() == 40);
  const double first = lines.front()["train_interp"], last = lines.back()["train_interp"];
  MESSAGE("interpretation term: epoch 1 " << first << ", epoch 40 " << last);
  CHECK(last < 0.2 * first);
  json isp_report = read(dir / "isp" / "report.json");
  const double ratio = isp_report["flops_ratio"], isp_shift = isp_report["saliency"]["mean_center_shift_px"];
  {  // `isp explain --network pruned`: the pruned network's own maps under the same AEM, and report.html shows both.
    auto explain = [&](const std::string& network, const std::string& out) {
      const std::string cmd = std::string(ISP_TEST_BINARY) + " explain --run " + (dir / "isp").string() + " --images 3 --network " +
                              network + " --out " + (dir / "isp" / out).string() + " > " + (dir / (out + ".log")).string() + " 2>&1";
      return std::system(cmd.c_str());
    };
    REQUIRE(explain("original", "explain") == 0);
    REQUIRE(explain("pruned", "explain_pruned") == 0);
    const json po = read(dir / "isp" / "explain" / "params.json"), pp = read(dir / "isp" / "explain_pruned" / "params.json");
    CHECK(po.dump() != pp.dump());  // a different encoder gives different maps
    REQUIRE(std::system((std::string(ISP_TEST_BINARY) + " report " + (dir / "isp").string() + " > /dev/null").c_str()) == 0);
    const std::string html = isp::read_text_file((dir / "isp" / "report.html").string());
    CHECK(html.find("Pruned network, same AEM") != std::string::npos);
    CHECK(html.find("data:image/png;base64,") != std::string::npos);
  }
  CHECK(ratio < 0.95);  // gates were cut, so the comparison is not trivial
  std::vector<double> random_shifts;
  for (int seed : {1, 2, 3, 4, 5}) {
    json random = recipe;
    random["nodes"]["gates"] = {{"type", "RandomPruner"}, {"target_flops_ratio", ratio}, {"allocation", "global"}, {"seed", seed}};
    const std::string name = "random" + std::to_string(seed);
    std::ofstream(dir / (name + ".json")) << random.dump(2);
    isp::RunOptions ro;
    ro.recipe_path = (dir / (name + ".json")).string();
    ro.work_dir = (dir / name).string();
    ro.reuse_from = {o.work_dir};
    REQUIRE(isp::run_recipe(registry(), ro) == 0);
    json r = read(dir / name / "report.json");
    const double shift = r["saliency"]["mean_center_shift_px"];
    MESSAGE("FLOPs ratio " << ratio << " vs " << r["flops_ratio"] << ": centre shift ISP " << isp_shift << " px, random(seed "
                           << seed << ") " << shift << " px");
    CHECK(r["flops_ratio"].get<double>() <= ratio + 1e-9);
    random_shifts.push_back(shift);
  }
  // Better than the typical random architecture (the median of five), not necessarily than every one.
  std::sort(random_shifts.begin(), random_shifts.end());
  CHECK(isp_shift < random_shifts[2]);
}

TEST_CASE("export saliency agreement: 1 for an unpruned copy, lower for a pruned network") {
  auto dir = isp_test::temp_dir("agreement");
  auto read = [](const fs::path& p) { return json::parse(isp::read_text_file(p.string())); };
  json recipe = selector_pipeline_recipe();
  recipe["nodes"]["gates"] = {{"type", "L1NormPruner"}, {"target_flops_ratio", 1.0}};
  recipe["nodes"]["prune"]["regularizers"] = json::array();
  recipe["nodes"]["prune"]["bn_recalibration_images"] = 0;  // an exact copy of the classifier
  std::ofstream(dir / "full.json") << recipe.dump(2);
  isp::RunOptions o;
  o.recipe_path = (dir / "full.json").string();
  o.work_dir = (dir / "full").string();
  REQUIRE(isp::run_recipe(registry(), o) == 0);
  json sal = read(dir / "full" / "report.json")["saliency"];
  CHECK(sal["mask_iou_at_0.5"].get<double>() == doctest::Approx(1.0));
  CHECK(sal["mean_center_shift_px"].get<double>() < 1e-4);
  // The original's metrics take the selector stage's curves of the same 8 images; the unpruned copy's are measured
  // afresh and agree with them.
  CHECK(sal["original"]["curves_from_selector_stage"] == 8);
  CHECK(sal["pruned"]["curves_from_selector_stage"].is_null());
  const auto same_figures = [](const json& a, const json& b) {
    for (const char* order : {"map", "random_order", "centred_gaussian"})
      for (const char* auc : {"deletion_auc", "insertion_auc"})
        CHECK(a[order][auc].get<double>() == doctest::Approx(b[order][auc].get<double>()).epsilon(1e-6));
    CHECK(a["mass_on_object"].dump() == b["mass_on_object"].dump());
    CHECK(a["images"] == b["images"]);
  };
  same_figures(sal["original"], sal["pruned"]);
  {  // Measured again (reuse_selector_curves: false), the original's row is the same.
    json again = recipe;
    again["nodes"]["export"]["reuse_selector_curves"] = false;
    std::ofstream(dir / "again.json") << again.dump(2);
    isp::RunOptions ao;
    ao.recipe_path = (dir / "again.json").string();
    ao.work_dir = (dir / "again").string();
    ao.reuse_from = {(dir / "full").string()};
    REQUIRE(isp::run_recipe(registry(), ao) == 0);
    const json measured = read(dir / "again" / "report.json")["saliency"]["original"];
    CHECK(measured["curves_from_selector_stage"] == 0);
    same_figures(measured, sal["original"]);
  }

  recipe["nodes"]["gates"]["target_flops_ratio"] = 0.3;
  std::ofstream(dir / "pruned.json") << recipe.dump(2);
  o.recipe_path = (dir / "pruned.json").string();
  o.work_dir = (dir / "pruned").string();
  o.reuse_from = {(dir / "full").string()};
  REQUIRE(isp::run_recipe(registry(), o) == 0);
  json pr = read(dir / "pruned" / "report.json");
  MESSAGE("pruned to " << pr["flops_ratio"] << ": mask IoU " << pr["saliency"]["mask_iou_at_0.5"] << ", centre shift "
                       << pr["saliency"]["mean_center_shift_px"] << " px");
  CHECK(pr["budget_met"] == true);
  CHECK(pr["saliency"]["mean_center_shift_px"].get<double>() > 1e-3);
  // The selector stage taken over from the first run brings its curves (saliency_curves.pt) with it.
  CHECK(pr["saliency"]["original"]["curves_from_selector_stage"] == 8);
  same_figures(pr["saliency"]["original"], sal["original"]);
}

TEST_CASE("stage fingerprints follow a stage's real inputs: a new unrelated stage reruns nothing else") {
  auto dir = isp_test::temp_dir("fp_inputs");
  json a = tiny_pipeline_recipe();
  json c = a;
  // A second classifier stage listed before prune: no other stage takes its result.
  c["nodes"]["probe"] = c["nodes"]["classifier"];
  c["nodes"]["probe"]["epochs"] = 1;
  c["stages"] = {{{"$ref", "classifier"}}, {{"$ref", "probe"}}, {{"$ref", "prune"}}, {{"$ref", "finetune"}}, {{"$ref", "export"}}};
  std::ofstream(dir / "a.json") << a.dump(2);
  std::ofstream(dir / "c.json") << c.dump(2);
  auto read = [](const fs::path& p) { return json::parse(isp::read_text_file(p.string())); };
  isp::RunOptions o;
  o.recipe_path = (dir / "a.json").string();
  o.work_dir = (dir / "run").string();
  REQUIRE(isp::run_recipe(registry(), o) == 0);
  const json before = read(dir / "run" / "state.json")["fingerprints"];
  const auto gates_time = fs::last_write_time(dir / "run" / "prune" / "gates.pt");
  o.recipe_path = (dir / "c.json").string();
  o.resume = true;
  REQUIRE(isp::run_recipe(registry(), o) == 0);  // no --force needed: nothing that ran has changed
  const json after = read(dir / "run" / "state.json")["fingerprints"];
  for (const char* s : {"classifier", "prune", "finetune", "export"}) CHECK_MESSAGE(after[s] == before[s], s);
  CHECK(after.contains("probe"));
  CHECK(fs::last_write_time(dir / "run" / "prune" / "gates.pt") == gates_time);
  CHECK_FALSE(fs::exists(dir / "run" / "prune.replaced-1"));
  // The resolved recipe pins what was built and records where it came from.
  const json resolved = read(dir / "run" / "recipe.resolved.json");
  CHECK(resolved["nodes"]["prune"]["type"] == "isp::PruneChannels@1");
  CHECK(resolved["components"]["/nodes/gates"]["library_name"] == "isp_pruners_free_logits");
}

TEST_CASE("stage fingerprints include the plugin file: --resume notices a replaced .so") {
  auto dir = isp_test::temp_dir("fp_plugin");
  fs::create_directories(dir / "plugins");
  for (const char* lib : {"isp_datasets_synthetic", "isp_backbones_resnet_cifar", "isp_stages_train_classifier"})
    fs::copy_file(isp_test::plugin(lib), dir / "plugins" / ("lib" + std::string(lib) + ".so"));
  json recipe = {{"seed", 1}, {"plugins", {(dir / "plugins").string()}}, {"runtime", {{"threads", 1}, {"device", "cpu"}}},
                 {"nodes", {{"data", {{"type", "SyntheticImages"}, {"num_train", 64}, {"num_test", 16}, {"num_classes", 4}}},
                            {"backbone", {{"type", "ResNetCifar"}, {"depth", 20}, {"num_classes", 4}}},
                            {"classifier", {{"type", "TrainClassifier"}, {"model", ref("backbone")}, {"data", ref("data")},
                                            {"epochs", 1}, {"batch_size", 32}, {"milestones", json::array()}}}}},
                 {"stages", {ref("classifier")}}};
  std::ofstream(dir / "r.json") << recipe.dump(2);
  isp::RunOptions o;
  o.recipe_path = (dir / "r.json").string();
  o.work_dir = (dir / "run").string();
  {
    isp::Registry reg;  // only the copies: the shared registry already holds these names
    REQUIRE(isp::run_recipe(reg, o) == 0);
  }
  o.resume = true;
  {
    isp::Registry reg;
    CHECK(isp::run_recipe(reg, o) == 0);  // the same files: nothing to rerun
  }
  std::ofstream(dir / "plugins" / "libisp_backbones_resnet_cifar.so", std::ios::app) << "a rebuilt plugin";
  isp::Registry reg;
  const std::string err = isp_test::error_of([&] { isp::run_recipe(reg, o); });
  CHECK(err.find("the recipe or a plugin changed for stage(s) classifier") != std::string::npos);
}

TEST_CASE("one run folder, one writer: a second run on a folder in use is refused, and the lock ends with it") {
  auto dir = isp_test::temp_dir("lock");
  json recipe = tiny_pipeline_recipe();
  recipe["stages"] = {{{"$ref", "classifier"}}};
  std::ofstream(dir / "r.json") << recipe.dump(2);
  isp::RunOptions o;
  o.recipe_path = (dir / "r.json").string();
  o.work_dir = (dir / "run").string();
  fs::create_directories(dir / "run");
  {
    // Another writer: a lock held through its own open file description, as a second process would hold it.
    const int fd = ::open((dir / "run" / ".lock").c_str(), O_RDWR | O_CREAT, 0644);
    REQUIRE(fd >= 0);
    REQUIRE(::flock(fd, LOCK_EX | LOCK_NB) == 0);
    REQUIRE(::pwrite(fd, "4242", 4, 0) == 4);
    const std::string err = isp_test::error_of([&] { isp::run_recipe(registry(), o); });
    CHECK(err.find("is in use by another isp run (pid 4242") != std::string::npos);
    CHECK_FALSE(fs::exists(dir / "run" / "state.json"));  // refused before touching anything
    ::close(fd);  // the other writer exits (a crash releases the lock the same way)
  }
  CHECK(isp::run_recipe(registry(), o) == 0);
  o.resume = true;
  CHECK(isp::run_recipe(registry(), o) == 0);  // our own lock was released when the run returned
}

namespace {

// Runs scripts/check_export_torch.py on export folders, in one Python start (importing torch takes seconds):
// 0 = PyTorch reproduced every folder's sample.json logits, 1 = not for at least one, 77 = no PyTorch here.
using isp_test::python_with_torch;

int check_with_python_torch(const std::vector<fs::path>& export_dirs, const fs::path& log) {
  std::string cmd = python_with_torch() + " " + std::string(ISP_SOURCE_DIR) + "/scripts/check_export_torch.py";
  for (const fs::path& d : export_dirs) cmd += " " + d.string();
  cmd += " > " + log.string() + " 2>&1";
  const int rc = std::system(cmd.c_str());
  return WIFEXITED(rc) ? WEXITSTATUS(rc) : -1;
}

bool python_has_torch() { return !python_with_torch().empty(); }

// The line scripts/check_export_torch.py ends a folder with, {"export_dir": ..., "ok": ...} (plus "error" where
// the folder could not be checked at all), parsed from its output; null where there is none.
json folder_verdict(const std::string& output, const fs::path& export_dir) {
  std::istringstream lines(output);
  for (std::string line; std::getline(lines, line);) {
    const json j = json::parse(line, nullptr, /*allow_exceptions=*/false);
    if (j.is_object() && j.contains("ok") && j.value("export_dir", std::string()) == export_dir.string()) return j;
  }
  return json();
}

// scripts/check_export_onnxruntime.js with the onnxruntime-node that scripts/setup.sh installs into .node/, one
// start for all folders: 0 = onnxruntime reproduced every sample.json's logits, 77 = no Node.js or no
// onnxruntime-node.
int check_with_onnxruntime(const std::vector<fs::path>& export_dirs, const fs::path& log) {
  if (std::system("command -v node >/dev/null 2>&1") != 0) return 77;
  const std::string src = ISP_SOURCE_DIR;
  std::string cmd = "NODE_PATH=" + src + "/.node/node_modules node " + src + "/scripts/check_export_onnxruntime.js";
  for (const fs::path& d : export_dirs) cmd += " " + d.string();
  cmd += " > " + log.string() + " 2>&1";
  const int rc = std::system(cmd.c_str());
  return WIFEXITED(rc) ? WEXITSTATUS(rc) : -1;
}

}  // namespace

TEST_CASE("export: PyTorch loads weights.pt into a plain model from structure.json and reproduces sample.json") {
  // scripts/setup.sh installs Debian's python3-torch; where it cannot be installed this test says so and stops.
  if (!python_has_torch()) {
    MESSAGE("skipped: python3 cannot import torch (scripts/setup.sh installs python3-torch)");
    return;
  }
  auto dir = isp_test::temp_dir("export_torch");
  // The export stage of the tiny pipeline writes sample.json, and PyTorch agrees with it.
  std::ofstream(dir / "tiny.json") << tiny_prune_export_recipe().dump(2);
  isp::RunOptions o;
  o.recipe_path = (dir / "tiny.json").string();
  o.work_dir = (dir / "tiny").string();
  REQUIRE(isp::run_recipe(registry(), o) == 0);
  const json sample = json::parse(isp::read_text_file((dir / "tiny" / "export" / "sample.json").string()));
  CHECK(sample["input"]["shape"] == json({4, 3, 32, 32}));
  CHECK(sample["logits"]["shape"] == json({4, 4}));
  CHECK(fs::exists(dir / "tiny" / "export" / "model.ts.pt"));
  CHECK(fs::exists(dir / "tiny" / "export" / "model.onnx"));
  // The original (unpruned) classifier is exported beside it, in the same formats, and checks the same way.
  const fs::path original = dir / "tiny" / "export" / "original";
  REQUIRE(fs::exists(original / "model.onnx"));
  CHECK(json::parse(isp::read_text_file((original / "sample.json").string()))["input"] == sample["input"]);
  CHECK(check_with_python_torch({dir / "tiny" / "export", original}, dir / "tiny.log") == 0);
  MESSAGE(isp::read_text_file((dir / "tiny.log").string()));
  const int ort = check_with_onnxruntime({dir / "tiny" / "export", original}, dir / "ort.log");
  if (ort == 77) MESSAGE("onnxruntime check skipped: " << isp::read_text_file((dir / "ort.log").string()));
  else CHECK(ort == 0);
  MESSAGE(isp::read_text_file((dir / "ort.log").string()));
  // `isp export --run` writes both folders again, from structure.json + weights.pt alone, and they check too.
  const fs::path again = dir / "again";
  const std::string cmd = std::string(ISP_TEST_BINARY) + " export --run " + (dir / "tiny").string() + " --out " +
                          again.string() + " > " + (dir / "again.log").string() + " 2>&1";
  REQUIRE_MESSAGE(std::system(cmd.c_str()) == 0, isp::read_text_file((dir / "again.log").string()));
  {
    const json again_sample = json::parse(isp::read_text_file((again / "sample.json").string()));
    CHECK(again_sample["input"] == sample["input"]);
    const auto a = again_sample["logits"]["values"].get<std::vector<float>>(), e = sample["logits"]["values"].get<std::vector<float>>();
    REQUIRE(a.size() == e.size());
    for (std::size_t i = 0; i < a.size(); ++i) CHECK(std::abs(a[i] - e[i]) <= 1e-5f * std::max(1.0f, std::abs(e[i])));
  }
  CHECK(check_with_python_torch({again, again / "original"}, dir / "again_torch.log") == 0);
  {  // one line per folder, each passed
    const std::string text = isp::read_text_file((dir / "again_torch.log").string());
    for (const fs::path& d : {again, again / "original"})
      CHECK_MESSAGE(folder_verdict(text, d) == json({{"export_dir", d.string()}, {"ok", true}}), text);
  }
  if (ort != 77) CHECK(check_with_onnxruntime({again, again / "original"}, dir / "ort.log") == 0);
  const std::string bad = std::string(ISP_TEST_BINARY) + " export --run " + (dir / "tiny").string() + " --out " +
                          again.string() + " --format tflite > " + (dir / "bad.log").string() + " 2>&1";
  CHECK(std::system(bad.c_str()) != 0);
  CHECK(isp::read_text_file((dir / "bad.log").string()).find("--format: tflite not in") != std::string::npos);

  // Both prunable backbones, pruned to odd widths and with non-trivial BN statistics, as an export folder
  // written here; a wrong weight changes the logits far beyond the tolerance. PyTorch checks them all at once
  // below: the intact folders, and copies with one damaged weight each.
  std::vector<fs::path> intact, damaged;
  for (const json& spec : {json{{"type", "ResNetCifar"}, {"depth", 20}, {"num_classes", 7}, {"in_channels", 1},
                                {"widths", {3, 16, 5, 9, 32, 1, 64, 17, 40}}},
                           json{{"type", "MobileNetV2Cifar"}, {"num_classes", 5}, {"input_size", 16},
                                {"widths", {7, 30, 99, 5, 144, 60, 1, 192, 100, 384, 17, 576, 300, 200, 960, 33, 9}}},
                           // ImageNet layouts (max pool, downsample convs, bottlenecks), small pruned widths
                           json{{"type", "ResNet"}, {"depth", 18}, {"num_classes", 6}, {"input_size", 64},
                                {"widths", {5, 64, 3, 17, 1, 40, 9, 33}}},
                           json{{"type", "ResNet"}, {"depth", 18}, {"num_classes", 6}, {"input_size", 64},
                                {"gate_residual", true}, {"widths", {40, 100, 200, 300, 5, 64, 3, 17, 1, 40, 9, 33}}},
                           json{{"type", "MobileNetV2"}, {"num_classes", 3}, {"input_size", 32}, {"width_mult", 0.5},
                                {"widths", {7, 30, 99, 5, 44, 60, 1, 92, 100, 84, 17, 76, 30, 20, 96, 33}}},
                           json{{"type", "ResNet"}, {"depth", 50}, {"num_classes", 4}, {"input_size", 32},
                                {"widths", {3, 5, 8, 1, 6, 7, 9, 10, 4, 4, 12, 3, 16, 2, 5, 5, 8, 8, 1, 1, 9, 4,
                                            24, 7, 3, 3, 17, 30, 8, 2, 6, 6}}}}) {
    CAPTURE(spec.dump());
    Built b = build(json{{"backbone", spec}});
    torch::manual_seed(5);
    {
      torch::NoGradGuard ng;
      for (auto& m : b.backbone->modules(false))
        if (auto* bn = m->as<torch::nn::BatchNorm2d>()) {
          bn->running_mean.normal_(0, 0.2);
          bn->running_var.uniform_(0.5, 2.0);
          bn->weight.uniform_(0.5, 1.5);
          bn->bias.normal_(0, 0.2);
        }
    }
    b.backbone->eval();
    const int64_t c = spec.value("in_channels", 3), hw = spec.value("input_size", 32);
    const at::Tensor x = torch::randn({3, c, hw, hw});
    at::Tensor logits;
    {
      torch::NoGradGuard ng;
      logits = b.backbone->forward(x);
    }
    // One folder per spec (two are ResNet-18s): all are checked together after the loop.
    const fs::path out = dir / (std::to_string(intact.size()) + "_" + spec["type"].get<std::string>());
    const auto written = isp::write_export(*b.backbone, isp::export_structure(spec, isp::unpruned_layers(*b.backbone),
                                                                              json(), json::array()), x, out.string());
    CHECK(written.size() == 5);
    {  // LibTorch loads the TorchScript file without any isp code: BN folded, the same logits.
      torch::jit::Module script = torch::jit::load((out / "model.ts.pt").string());
      torch::NoGradGuard ng;
      const at::Tensor ts = script.forward({x}).toTensor();
      const double delta = (ts - logits).abs().max().item<double>();
      MESSAGE(spec["type"].get<std::string>() << ": torch::jit::load(model.ts.pt) max |delta logit| " << delta);
      CHECK(delta < 1e-5);
      CHECK(ts.argmax(1).equal(logits.argmax(1)));
    }
    intact.push_back(out);
    // And a damaged weight is caught: the check can fail.
    {
      torch::NoGradGuard ng;
      const std::string head = spec["type"] == "MobileNetV2Cifar" ? "linear.weight"
                               : spec["type"] == "MobileNetV2"    ? "classifier.1.weight"
                                                                  : "fc.weight";
      b.backbone->named_parameters()[head].mul_(1.5);
    }
    const fs::path bad_out = out.string() + "_damaged";
    fs::create_directories(bad_out);
    for (const char* f : {"structure.json", "sample.json"}) fs::copy_file(out / f, bad_out / f);
    isp::save_state_dict_for_python(*b.backbone, (bad_out / "weights.pt").string());
    damaged.push_back(bad_out);
  }
  CHECK(check_with_python_torch(intact, dir / "backbone.log") == 0);
  MESSAGE(isp::read_text_file((dir / "backbone.log").string()));
  const int ort_backbones = check_with_onnxruntime(intact, dir / "ort.log");
  if (ort_backbones != 77) CHECK(ort_backbones == 0);
  MESSAGE(isp::read_text_file((dir / "ort.log").string()));
  if (ort_backbones != 77) {  // a folder onnxruntime cannot load (no model.onnx) fails alone; the next is still checked
    CHECK(check_with_onnxruntime({damaged.front(), intact.front()}, dir / "ort_mixed.log") == 1);
    const std::string mixed = isp::read_text_file((dir / "ort_mixed.log").string());
    const json failed = folder_verdict(mixed, damaged.front());
    CHECK_MESSAGE((failed.is_object() && failed["ok"] == false && failed.contains("error")), mixed);
    CHECK_MESSAGE(folder_verdict(mixed, intact.front()) == json({{"export_dir", intact.front().string()}, {"ok", true}}),
                  mixed);
  }
  // The check can fail: every damaged folder, not just one of them, is reported as failed.
  CHECK(check_with_python_torch(damaged, dir / "damaged.log") == 1);
  const std::string text = isp::read_text_file((dir / "damaged.log").string());
  for (const fs::path& d : damaged)  // each caught by its logits, not by a file that could not be read (no "error")
    CHECK_MESSAGE(folder_verdict(text, d) == json({{"export_dir", d.string()}, {"ok", false}}), text);
}

// Debian's chromium (or another Chromium build) for rendering report.html; empty where none is installed.
static std::string find_chromium() {
  for (const char* b : {"chromium", "chromium-browser", "google-chrome"})
    if (std::system(("command -v " + std::string(b) + " >/dev/null 2>&1").c_str()) == 0) return b;
  return "";
}

TEST_CASE("isp sweep: every point validated first, shared stages reused, one table with mean +- std over seeds") {
  auto dir = isp_test::temp_dir("sweep");
  json r = tiny_pipeline_recipe();
  r["nodes"]["export"]["original"] = false;
  std::ofstream(dir / "tiny.json") << r.dump(2);
  auto isp_cmd = [&](const std::string& args, const std::string& log) {
    const std::string cmd = std::string(ISP_TEST_BINARY) + " " + args + " > " + (dir / log).string() + " 2>&1";
    return std::system(cmd.c_str());
  };
  // A bad value in one point: refused before anything runs, naming the point.
  std::ofstream(dir / "bad.json") << json{{"recipe", "tiny.json"},
                                          {"axes", {{{"path", "nodes.finetune.lr"}, {"values", {0.01, "fast"}}}}}}.dump();
  CHECK(isp_cmd("sweep " + (dir / "bad.json").string() + " --work-dir " + (dir / "bad").string(), "bad.log") != 0);
  const std::string bad_log = isp::read_text_file((dir / "bad.log").string());
  CHECK(bad_log.find("point lr=fast") != std::string::npos);
  CHECK(bad_log.find("1 of 2 points are invalid") != std::string::npos);
  CHECK_FALSE(fs::exists(dir / "bad"));

  // Two pruning learning rates x two finetuning seeds... as a grid: 4 points; the classifier is trained once.
  const json sweep = {{"description", "tiny"},
                      {"recipe", "tiny.json"},
                      {"axes", {{{"path", "nodes.prune.lr"}, {"name", "prune_lr"}, {"values", {0.2, 0.1}}},
                                {{"path", "nodes.finetune.lr"}, {"name", "ft_lr"}, {"values", {0.01, 0.02}},
                                 {"labels", {"low", "high"}}}}}};
  std::ofstream(dir / "sweep.json") << sweep.dump(2);
  const std::string run = "sweep " + (dir / "sweep.json").string() + " --work-dir " + (dir / "out").string();
  REQUIRE_MESSAGE(isp_cmd(run, "sweep.log") == 0, isp::read_text_file((dir / "sweep.log").string()));
  const json table = json::parse(isp::read_text_file((dir / "out" / "sweep.json").string()));
  REQUIRE(table["points"].size() == 4);
  std::set<std::string> names;
  for (const auto& p : table["points"]) {
    names.insert(p["run"].get<std::string>());
    CHECK(p["status"] == "finished");
    CHECK(p["metrics"]["FLOPs ratio"].is_number());
    CHECK(p["metrics"]["finetuned top-1 %"].is_number());
  }
  CHECK(names == std::set<std::string>{"prune_lr=0.2,ft_lr=low", "prune_lr=0.2,ft_lr=high", "prune_lr=0.1,ft_lr=low",
                                        "prune_lr=0.1,ft_lr=high"});
  // Later points took the classifier (and, with the same pruning lr, the pruning stage) from earlier ones.
  const std::string second = isp::read_text_file((dir / "out" / "prune_lr=0.2,ft_lr=high.log").string());
  CHECK(second.find("classifier prune") != std::string::npos);
  const std::string third = isp::read_text_file((dir / "out" / "prune_lr=0.1,ft_lr=low.log").string());
  CHECK(third.find(": classifier\n") != std::string::npos);
  const json s1 = json::parse(isp::read_text_file((dir / "out" / "prune_lr=0.2,ft_lr=low" / "summary.json").string()));
  const json s2 = json::parse(isp::read_text_file((dir / "out" / "prune_lr=0.1,ft_lr=high" / "summary.json").string()));
  CHECK_FALSE(s1["stages"]["classifier"].contains("reused_from"));
  CHECK(s2["stages"]["classifier"].contains("reused_from"));
  CHECK(table["summary"].size() == 4);  // no seed axis: one row per point
  const std::string md = isp::read_text_file((dir / "out" / "sweep.md").string());
  CHECK(md.find("| 0.1 | high | 1/1 |") != std::string::npos);
  CHECK(isp::read_text_file((dir / "out" / "sweep.csv").string()).find("prune_lr,ft_lr,run,status,") == 0);
  // report.html for the sweep (accuracy vs FLOPs with the Pareto front, a link per point) and for each run
  // (curves per stage, kept widths): self-contained, no script, no external resource.
  auto count = [](const std::string& text, const std::string& what) {
    std::size_t n = 0;
    for (auto at = text.find(what); at != std::string::npos; at = text.find(what, at + 1)) ++n;
    return n;
  };
  const std::string html = isp::read_text_file((dir / "out" / "report.html").string());
  CHECK(count(html, "<svg class=\"plot\"") == 1);
  CHECK(html.find("Pareto front") != std::string::npos);
  CHECK(count(html, "/report.html\">") == 4);
  CHECK(count(html, "<circle") == 4);
  const std::string run_html = isp::read_text_file((dir / "out" / "prune_lr=0.1,ft_lr=high" / "report.html").string());
  for (const char* plot : {"classifier: losses", "classifier: accuracy, agreement, FLOPs ratio", "prune: losses",
                           "prune: accuracy, agreement, FLOPs ratio", "finetune: losses", "Kept channels per gated layer"})
    CHECK_MESSAGE(run_html.find(plot) != std::string::npos, plot);
  CHECK(count(run_html, "<svg class=\"plot\"") >= 6);
  CHECK(run_html.find("<script") == std::string::npos);
  CHECK(run_html.find("http://") == run_html.find("http://www.w3.org/2000/svg"));  // the SVG namespace only
  // Rendered by a real browser: headless Chromium (scripts/setup.sh installs Debian's chromium) parses as many
  // plots as the file holds, and its screenshot is not blank.
  const std::string chromium = find_chromium();
  if (chromium.empty()) {
    MESSAGE("Chromium check skipped: no chromium on PATH (scripts/setup.sh installs Debian's chromium)");
  } else {
    for (const fs::path page : {dir / "out" / "report.html", dir / "out" / "prune_lr=0.1,ft_lr=high" / "report.html"}) {
      const std::string text = isp::read_text_file(page.string());
      const std::string flags = " --headless --no-sandbox --disable-gpu --hide-scrollbars --window-size=1000,1400 ";
      const std::string url = "'file://" + fs::absolute(page).string() + "'";
      const fs::path dom = dir / "dom.html", shot = dir / "shot.png";
      REQUIRE(std::system((chromium + flags + "--dump-dom " + url + " > " + dom.string() + " 2>/dev/null").c_str()) == 0);
      CHECK(count(isp::read_text_file(dom.string()), "<svg class=\"plot\"") == count(text, "<svg class=\"plot\""));
      REQUIRE(std::system((chromium + flags + "--screenshot=" + shot.string() + " " + url + " > /dev/null 2>&1").c_str()) == 0);
      int w = 0, h = 0, c = 0;
      unsigned char* px = stbi_load(shot.string().c_str(), &w, &h, &c, 3);
      REQUIRE(px != nullptr);
      CHECK(w == 1000);
      std::size_t dark = 0, coloured = 0;
      for (int i = 0; i < w * h; ++i) {
        const int r = px[3 * i], g = px[3 * i + 1], b = px[3 * i + 2];
        dark += r + g + b < 200;                                        // text
        coloured += std::abs(r - g) > 60 || std::abs(g - b) > 60;       // plot lines, dots, bars
      }
      stbi_image_free(px);
      MESSAGE(page.string() << ": " << dark << " dark and " << coloured << " coloured pixels of " << w * h);
      CHECK(dark > 1000);
      CHECK(coloured > 200);
    }
  }

  // A seed axis: rows that differ only in the seed become one row, mean +- std (population) over the seeds.
  const json seeds = {{"recipe", "tiny.json"},
                      {"mode", "zip"},
                      {"axes", {{{"path", "seed"}, {"values", {1, 2}}}}}};
  std::ofstream(dir / "seeds.json") << seeds.dump(2);
  REQUIRE(isp_cmd("sweep " + (dir / "seeds.json").string() + " --work-dir " + (dir / "seeds").string() + " --jobs 2",
                  "seeds.log") == 0);
  const json st = json::parse(isp::read_text_file((dir / "seeds" / "sweep.json").string()));
  REQUIRE(st["summary"].size() == 1);
  const json flops = st["summary"][0]["metrics"]["FLOPs ratio"];
  const double a = st["points"][0]["metrics"]["FLOPs ratio"].get<double>(), b = st["points"][1]["metrics"]["FLOPs ratio"].get<double>();
  CHECK(flops["n"] == 2);
  CHECK(flops["mean"].get<double>() == doctest::Approx((a + b) / 2));
  CHECK(flops["std"].get<double>() == doctest::Approx(std::abs(a - b) / 2));
  // Rerunning a finished sweep resumes every point and runs nothing again.
  REQUIRE(isp_cmd("sweep " + (dir / "seeds.json").string() + " --work-dir " + (dir / "seeds").string(), "again.log") == 0);
  CHECK(isp::read_text_file((dir / "seeds" / "seed=1.log").string()).find("[classifier] epoch") == std::string::npos);
}

TEST_CASE("the whole pipeline with the ImageNet-layout ResNet-18: AEM over four scales, pruning inside blocks, export") {
  auto dir = isp_test::temp_dir("resnet18_pipeline");
  auto read = [](const fs::path& p) { return json::parse(isp::read_text_file(p.string())); };
  json recipe = selector_pipeline_recipe();
  recipe["nodes"]["backbone"] = {{"type", "ResNet"}, {"depth", 18}, {"num_classes", 4}, {"input_size", 32}};
  recipe["nodes"]["head"]["kernel_size"] = 8;  // the finest scale: 32 px / 4
  recipe["nodes"]["flops"] = {{"type", "FlopsBudget"}, {"target", 0.6}};
  recipe["nodes"]["prune"]["regularizers"] = {ref("interp"), ref("flops")};
  std::ofstream(dir / "r18.json") << recipe.dump(2);
  isp::RunOptions o;
  o.recipe_path = (dir / "r18.json").string();
  o.work_dir = (dir / "run").string();
  REQUIRE(isp::run_recipe(registry(), o) == 0);
  const json report = read(dir / "run" / "report.json");
  MESSAGE("ResNet-18 tiny pipeline: FLOPs ratio " << report["flops_ratio"] << ", mask IoU "
                                                  << report["saliency"]["mask_iou_at_0.5"]);
  CHECK(report["budget_met"] == true);
  CHECK(report["flops_ratio"].get<double>() <= 0.6 + 0.005);
  const json structure = read(dir / "run" / "export" / "structure.json");
  CHECK(structure["spec"]["type"].get<std::string>().find("ResNet") != std::string::npos);
  CHECK(structure["spec"]["widths"].size() == 8);
  CHECK(fs::exists(dir / "run" / "export" / "model.onnx"));
  if (python_has_torch()) CHECK(check_with_python_torch({dir / "run" / "export"}, dir / "check.log") == 0);
  fs::remove_all(dir);
}
