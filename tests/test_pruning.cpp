// Pruning: gate statistics, R_res, one-shot allocation at a FLOPs target, and a tiny prune -> finetune ->
// export -> reload pipeline whose reloaded logits equal the finetuned network's.
#include "test_support.h"

#include <cmath>
#include <fstream>

#include "isp/checkpoint.h"
#include "isp/cost.h"
#include "isp/interfaces/backbone.h"
#include "isp/interfaces/pruner.h"
#include "isp/interfaces/regularizer.h"
#include "isp/interfaces/stage.h"
#include "isp/recipe.h"
#include "isp/runner.h"

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
        {"prune", {{"type", "PruneChannels"}, {"classifier", {{"$ref", "backbone"}}}, {"pruner", {{"$ref", "gates"}}},
                   {"data", {{"$ref", "data"}}}, {"regularizers", {{{"$ref", "flops"}}, {{"$ref", "ce"}}}},
                   {"subset_fraction", 0.5}, {"epochs", 6}, {"batch_size", 36}, {"lr", 0.2}, {"eval_every", 2}}},
        {"finetune", {{"type", "Finetune"}, {"pruned", {{"$ref", "prune"}}}, {"data", {{"$ref", "data"}}},
                      {"epochs", 1}, {"batch_size", 32}, {"lr", 0.01}, {"milestones", json::array()}}},
        {"export", {{"type", "Export"}, {"model", {{"$ref", "finetune"}}}, {"baseline", {{"$ref", "backbone"}}},
                    {"data", {{"$ref", "data"}}}}}}},
      {"stages", {{{"$ref", "classifier"}}, {{"$ref", "prune"}}, {{"$ref", "finetune"}}, {{"$ref", "export"}}}}};
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
  // theta = -3: P(on) = P(theta + g + 3 >= 0) = 1 - exp(-e^(theta+3)) = 1 - 1/e (isp-spec §2.4)
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

TEST_CASE("FlopsBudget: R_res = log(max(r, p) / p)") {
  json nodes = {{"r", {{"type", "FlopsBudget"}, {"target", 0.25}}}};
  isp::BuildContext ctx(registry(), json{{"nodes", nodes}}, [](const std::string& p) { return isp::Where{"t.json", p}; });
  auto reg = ctx.node<isp::Regularizer>("r");
  isp::LossInputs in;
  in.flops_ratio = torch::tensor(0.4907);
  CHECK(reg->compute(in).item<double>() == doctest::Approx(std::log(0.4907 / 0.25)).epsilon(1e-6));
  in.flops_ratio = torch::tensor(0.2);
  CHECK(reg->compute(in).item<double>() == doctest::Approx(0.0));
  isp::LossInputs empty;
  CHECK_THROWS_AS(reg->compute(empty), isp::Error);
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
  auto finetuned = std::dynamic_pointer_cast<isp::Backbone>(run.stage("finetune")->model());
  REQUIRE(finetuned);
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
  ob.reuse_from = oa.work_dir;
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
  if (std::system("command -v python3 >/dev/null 2>&1") != 0) {
    MESSAGE("python3 is not installed; skipping");
    return;
  }
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
