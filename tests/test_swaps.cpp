// Every swap works or is refused clearly: each registered gate generator / one-shot pruner, mask head, sampler,
// feature filter, decoder and mask source, named in a tiny recipe (16x16 synthetic images, ResNet-20, a few
// steps per stage), runs classifier -> predictor -> selector -> prune -> finetune -> export to a pruned
// network; a combination that cannot train is an isp::RecipeError naming the JSON path of the offending option,
// raised when the stages are built (`isp validate`), before anything runs.
//
// The components are enumerated from the registry, so a newly registered one is swapped in automatically: its
// required links are filled with the tiny recipe's node of the linked kind; a required non-link argument needs
// an entry in tuned_options() (the test fails naming the component otherwise).
//
// The first run trains every stage; each swap then starts a new run with --reuse of it, so the stages the swap
// does not reach are taken over (fingerprints) and only the affected ones run.
#include "test_support.h"

#include <cctype>
#include <chrono>
#include <cmath>
#include <fstream>
#include <map>
#include <set>

#include "isp/checkpoint.h"
#include "isp/optim.h"
#include "isp/cost.h"
#include "isp/interfaces/aem.h"
#include "isp/interfaces/backbone.h"
#include "isp/interfaces/pruner.h"
#include "isp/registry/recipe.h"
#include "isp/runner.h"

namespace fs = std::filesystem;
using isp::json;

namespace {

isp::Registry& registry() { return isp_test::shared_registry(); }
json ref(const std::string& n) { return {{"$ref", n}}; }
isp::Where where_of(const std::string& p) { return {"swaps.json", p}; }

const std::vector<std::string> kStages = {"classifier", "predictor", "selector", "prune", "finetune", "export"};

// The node of the tiny recipe that a required link of a kind points to (and the node a swap of that kind
// replaces).
const std::map<std::string, std::string>& node_of_kind() {
  static const std::map<std::string, std::string> m = {
      {"backbone", "backbone"}, {"dataset", "data"},          {"decoder", "decoder"},
      {"feature_filter", "filter"}, {"mask_head", "head"},     {"sampler", "mask_sampler"},
      {"mask_source", "mask_source"}, {"pruner", "gates"}};
  return m;
}

// classifier -> predictor -> selector -> prune -> finetune -> export on 96 + 24 synthetic 16x16 images.
json tiny_recipe() {
  json nodes = {
      {"data", {{"type", "SyntheticImages"}, {"num_train", 96}, {"num_test", 24}, {"num_classes", 4}, {"image_size", 16},
                {"channels", 1}, {"pad_to", 0}, {"replicate_channels", false}, {"val_fraction", 0.25}}},
      {"backbone", {{"type", "ResNetCifar"}, {"depth", 20}, {"num_classes", 4}, {"in_channels", 1}, {"input_size", 16}}},
      {"classifier", {{"type", "TrainClassifier"}, {"model", ref("backbone")}, {"data", ref("data")}, {"epochs", 2},
                      {"batch_size", 24}, {"lr", 0.05}, {"milestones", json::array()}, {"eval_batch_size", 64}}},
      {"mask_source", {{"type", "RandomRbfMasks"}, {"center_low", 1.0}, {"center_high", 15.0}, {"sigma_low", 2.5},
                       {"sigma_high", 5.5}}},
      {"predictor", {{"type", "TrainPredictor"}, {"classifier", ref("classifier")}, {"data", ref("data")},
                     {"mask_source", ref("mask_source")}, {"epochs", 1}, {"batch_size", 24}, {"lr", 1e-3},
                     {"max_steps_per_epoch", 2}, {"eval_every", 1}, {"eval_batch_size", 64},
                     {"init_from_classifier", true}}},
      {"filter", {{"type", "ClassEmbeddingFilter"}, {"encoder", ref("backbone")}}},
      {"decoder", {{"type", "UNetDecoder"}, {"encoder", ref("backbone")}}},
      {"head", {{"type", "RbfMaskHead"}, {"decoder", ref("decoder")}, {"encoder", ref("backbone")}}},
      {"mask_sampler", {{"type", "RelaxedBernoulli"}, {"temperature", 1.0}}},
      {"area", {{"type", "MaskArea"}, {"weight", 0.2}, {"power", 0.3}}},
      {"smoothness", {{"type", "MaskSmoothness"}, {"weight", 0.001}}},
      {"selector", {{"type", "TrainSelector"}, {"predictor", ref("predictor")},
                    {"filter", ref("filter")}, {"decoder", ref("decoder")}, {"head", ref("head")},
                    {"sampler", ref("mask_sampler")}, {"regularizers", {ref("area"), ref("smoothness")}},
                    {"data", ref("data")}, {"epochs", 1}, {"batch_size", 16}, {"lr", 1e-3},
                    {"max_steps_per_epoch", 2}, {"eval_batch_size", 64}, {"metrics_images", 8}}},
      {"gates", {{"type", "FreeLogitGates"}}},
      {"interp", {{"type", "RbfParamDistance"}, {"weight", 10.0}, {"mode", "raw"}}},
      {"flops", {{"type", "FlopsBudget"}, {"target", 0.5}, {"weight", 5.0}}},
      {"prune", {{"type", "PruneChannels"}, {"classifier", ref("classifier")}, {"selector", ref("selector")},
                 {"pruner", ref("gates")}, {"data", ref("data")}, {"regularizers", {ref("interp"), ref("flops")}},
                 {"subset_fraction", 0.5}, {"epochs", 3}, {"batch_size", 18}, {"lr", 0.2}, {"eval_every", 1},
                 {"eval_batch_size", 64}}},
      {"finetune", {{"type", "Finetune"}, {"pruned", ref("prune")}, {"data", ref("data")}, {"epochs", 1},
                    {"batch_size", 24}, {"lr", 0.01}, {"milestones", json::array()}, {"max_steps_per_epoch", 2},
                    {"eval_batch_size", 64}}},
      {"export", {{"type", "Export"}, {"model", ref("finetune")}, 
                  {"selector", ref("selector")}, {"data", ref("data")}, {"agreement_images", 8},
                  {"metrics_images", 8}}}};  // the saliency metrics on 8 images, as in test_pruning.cpp
  json stages = json::array();
  for (const auto& s : kStages) stages.push_back(ref(s));
  return {{"seed", 3}, {"runtime", {{"threads", 1}, {"device", "cpu"}}}, {"nodes", nodes}, {"stages", stages}};
}

// Options a component needs in the tiny setting besides its defaults and links.
json tuned_options(const std::string& kind, const std::string& name) {
  if (kind == "mask_source" && name == "RandomRbfMasks")
    return {{"center_low", 1.0}, {"center_high", 15.0}, {"sigma_low", 2.5}, {"sigma_high", 5.5}};
  if (kind == "sampler" && name == "RelaxedBernoulli") return {{"temperature", 1.0}};
  return json::object();
}

// Further variants beyond each component's defaults: the hard straight-through Bernoulli sampler, hard masks
// for the predictor.
std::vector<std::pair<std::string, json>> extra_variants(const std::string& kind) {
  if (kind == "sampler") return {{"Bernoulli", {{"straight_through", true}}}};
  if (kind == "mask_source") return {{"BernoulliMasks", {{"relaxed", false}}}};
  return {};
}

// The spec of component `c` in the tiny recipe: required links to the recipe's node of the linked kind.
json component_spec(const isp::ComponentInfo& c, const json& options) {
  json spec = {{"type", c.name}};
  for (const auto& a : c.schema.args) {
    if (!a.required || options.contains(a.name)) continue;
    auto it = a.type == isp::ArgType::Node ? node_of_kind().find(a.node_kind) : node_of_kind().end();
    if (it == node_of_kind().end())
      throw std::runtime_error(c.kind + " '" + c.name + "' has a required argument '" + a.name +
                               "' the swap test cannot fill: add it to tuned_options() in tests/test_swaps.cpp");
    spec[a.name] = ref(it->second);
  }
  spec.update(options);
  return spec;
}

std::string folder_name(std::string s) {
  for (char& ch : s)
    if (!std::isalnum(static_cast<unsigned char>(ch))) ch = '_';
  return s;
}

json read_json(const fs::path& p) { return json::parse(isp::read_text_file(p.string())); }

int run(const json& recipe, const fs::path& dir, const std::string& reuse = "", bool validate_only = false) {
  fs::create_directories(dir);
  std::ofstream(dir / "recipe.json") << recipe.dump(2);
  isp::RunOptions o;
  o.recipe_path = (dir / "recipe.json").string();
  o.work_dir = (dir / "run").string();
  if (!reuse.empty()) o.reuse_from = {reuse};
  o.validate_only = validate_only;
  return isp::run_recipe(registry(), o);
}

// The invariants of a finished run: every stage completed, a pruned network no wider than the original that
// reloads from the export and gives finite logits, and (learned pruners) gates that received finite gradients.
void check_finished_run(const fs::path& run_dir) {
  json state = read_json(run_dir / "state.json");
  std::set<std::string> done;
  for (const auto& c : state["completed"]) done.insert(c.get<std::string>());
  for (const auto& s : kStages) CHECK_MESSAGE(done.count(s) == 1, "stage not completed: " << s);

  json arch = read_json(run_dir / "prune" / "architecture.json");
  const auto widths = arch["widths"].get<std::vector<int64_t>>();
  const auto full = arch["full_widths"].get<std::vector<int64_t>>();
  REQUIRE(widths.size() == full.size());
  REQUIRE_FALSE(widths.empty());
  for (std::size_t l = 0; l < widths.size(); ++l) {
    CHECK(widths[l] >= 1);
    CHECK(widths[l] <= full[l]);
  }
  json report = read_json(run_dir / "report.json");
  CHECK(report["flops_after"].get<double>() <= report["flops_before"].get<double>());
  CHECK(report["params_after"].get<double>() <= report["params_before"].get<double>());
  CHECK(report["flops_after"].get<double>() > 0.0);

  isp::LoadedExport ex = isp::load_export(registry(), (run_dir / "export").string());
  REQUIRE(ex.structure["layers"].size() == widths.size());
  for (std::size_t l = 0; l < widths.size(); ++l)
    CHECK(static_cast<int64_t>(ex.structure["layers"][l]["kept"].size()) == widths[l]);
  {
    torch::NoGradGuard ng;
    ex.model->eval();
    at::Tensor logits = ex.model->forward(torch::rand({2, 1, 16, 16}));
    CHECK(logits.size(0) == 2);
    CHECK(logits.size(1) == 4);
    CHECK(logits.isfinite().all().item<bool>());
  }

  at::Tensor gates = isp::CheckpointReader((run_dir / "prune" / "gates.pt").string()).tensor("gates");
  CHECK(at::logical_or(gates.eq(0), gates.eq(1)).all().item<bool>());

  // Rebuild the pruner of the resolved recipe and load what gate learning left in its last checkpoint.
  json resolved = read_json(run_dir / "recipe.resolved.json");
  isp::BuildContext ctx(registry(), resolved, where_of);
  auto backbone = ctx.node<isp::Backbone>("backbone");
  auto pruner = ctx.node<isp::Pruner>("gates");
  isp::CostModel cost(backbone->layer_shapes(), backbone->gated_layers());
  pruner->attach(*backbone, cost);
  if (!pruner->learns_gates()) {
    CHECK(gates.numel() == backbone->total_gate_width());
    return;
  }
  isp::CheckpointReader ck((run_dir / "prune" / "checkpoint.pt").string());
  ck.module("pruner", *pruner);
  // Gate learning's optimizer: AdamW over a flat buffer (isp/optim.h), its moments saved as tensors.
  isp::FlatAdam opt(pruner->parameters(), isp::FlatAdamOptions{1e-3, 0.9, 0.999, 1e-8, 0.0, true});
  opt.relink();
  ck.optimizer("optimizer", opt);
  double grad_mass = 0;
  int64_t stepped = 0;
  for (const auto& p : pruner->parameters()) CHECK(p.isfinite().all().item<bool>());
  for (const auto& [name, t] : opt.state()) {
    CHECK(t.isfinite().all().item<bool>());
    if (name == "step") stepped = t.item<int64_t>();
    if (name == "exp_avg") grad_mass = t.abs().sum().item<double>();
  }
  CHECK(stepped > 0);
  CHECK(grad_mass > 0.0);  // gradients reached the gate parameters
  at::Tensor soft = pruner->soft_gates().detach();
  CHECK(soft.isfinite().all().item<bool>());
  CHECK(soft.min().item<double>() >= 0.0);
  CHECK(soft.max().item<double>() <= 1.0);
}

}  // namespace

TEST_CASE("swaps: every registered gate generator, decoder, mask head, sampler, feature filter and mask source "
          "runs the tiny pipeline to a pruned network") {
  const auto t0 = std::chrono::steady_clock::now();
  auto seconds = [](std::chrono::steady_clock::time_point a) {
    return std::chrono::duration<double>(std::chrono::steady_clock::now() - a).count();
  };
  auto root = isp_test::temp_dir("swaps");
  ::unsetenv("ISP_INTERRUPT_AFTER_STEPS");
  const json base = tiny_recipe();
  REQUIRE(run(base, root / "base") == 0);
  MESSAGE("base pipeline: " << seconds(t0) << " s");
  check_finished_run(root / "base" / "run");
  const std::string reuse = (root / "base" / "run").string();

  int runs = 0, refused = 0;
  for (const std::string kind : {"pruner", "decoder", "mask_head", "sampler", "feature_filter", "mask_source"}) {
    const std::string node = node_of_kind().at(kind);
    std::vector<std::pair<std::string, json>> variants;
    for (const isp::ComponentInfo* c : registry().list(kind)) variants.emplace_back(c->name, tuned_options(kind, c->name));
    for (auto& v : extra_variants(kind)) variants.push_back(v);
    REQUIRE_FALSE(variants.empty());
    for (const auto& [name, options] : variants) {
      const std::string label = kind + " " + name + (options.empty() ? "" : " " + options.dump());
      INFO("swap: " << label);
      json recipe = base;
      const isp::ComponentInfo* info = registry().find(kind, name);
      if (!info) {
        FAIL_CHECK("not registered");
        continue;
      }
      try {
        recipe["nodes"][node] = component_spec(*info, options);
      } catch (const std::exception& e) {
        FAIL_CHECK(e.what());
        continue;
      }
      if (recipe["nodes"][node] == base["nodes"][node]) continue;  // the base run is this configuration
      // Companions: a head without RBF parameters is compared by its maps; a one-shot pruner has its own
      // FLOPs target and learns nothing, so the prune stage gets no loss terms.
      isp::BuildContext probe(registry(), recipe, where_of);
      if (kind == "mask_head" && !probe.node<isp::MaskHead>("head")->predicts_rbf_parameters())
        recipe["nodes"]["interp"]["mode"] = "map";
      if (kind == "pruner" && !probe.node<isp::Pruner>("gates")->learns_gates())
        recipe["nodes"]["prune"]["regularizers"] = json::array();
      const fs::path dir = root / folder_name(kind + "_" + name + "_" + std::to_string(runs + refused));
      // A sampler whose masks carry no gradient cannot train the selector: refused when the stages are built.
      if (kind == "sampler" && !probe.node<isp::MaskSampler>("mask_sampler")->differentiable()) {
        ++refused;
        try {
          run(recipe, dir, "", /*validate_only=*/true);
          FAIL_CHECK("not refused");
        } catch (const isp::RecipeError& e) {
          CHECK(e.where().pointer == "/nodes/selector/sampler");
        }
        continue;
      }
      const auto t = std::chrono::steady_clock::now();
      int rc = -1;
      try {
        rc = run(recipe, dir, reuse);
      } catch (const std::exception& e) {
        FAIL_CHECK("run failed: " << e.what());
        continue;
      }
      CHECK(rc == 0);
      if (rc != 0) continue;
      ++runs;
      MESSAGE(label << ": " << seconds(t) << " s");
      check_finished_run(dir / "run");
    }
  }
  // GRU, L1-norm, random; REAL-X head; GumbelSigmoid, straight-through Bernoulli; identity filter; 2 x BernoulliMasks
  CHECK(runs >= 9);
  CHECK(refused >= 1);  // Bernoulli without straight-through
  MESSAGE(runs << " swaps ran, " << refused << " refused; total " << seconds(t0) << " s");
  fs::remove_all(root);
}

TEST_CASE("swaps: a sampler whose masks carry no gradient is a recipe error of the selector's sampler option") {
  auto root = isp_test::temp_dir("swaps_sampler");
  json recipe = tiny_recipe();
  recipe["nodes"]["mask_sampler"] = {{"type", "Bernoulli"}};  // hard samples, no straight-through
  for (bool validate_only : {true, false}) {  // `isp validate` and `isp run` both stop before any stage runs
    std::string what;
    try {
      run(recipe, root / (validate_only ? "validate" : "run"), "", validate_only);
    } catch (const isp::RecipeError& e) {
      CHECK(e.where().pointer == "/nodes/selector/sampler");
      what = e.what();
    }
    CHECK(what.find("/nodes/selector/sampler") != std::string::npos);
    CHECK(what.find("straight_through") != std::string::npos);
  }
  CHECK_FALSE(fs::exists(root / "run" / "run" / "classifier"));
  // With straight-through the same sampler is accepted.
  recipe["nodes"]["mask_sampler"]["straight_through"] = true;
  CHECK(run(recipe, root / "st", "", true) == 0);
  fs::remove_all(root);
}

TEST_CASE("swaps: RbfParamDistance raw or readable with a pixel mask head is a recipe error naming the path") {
  auto root = isp_test::temp_dir("swaps_interp");
  for (const char* mode : {"raw", "readable"}) {
    json recipe = tiny_recipe();
    recipe["nodes"]["head"] = {{"type", "RealXPixelHead"}, {"decoder", ref("decoder")}};
    recipe["nodes"]["interp"]["mode"] = mode;
    std::string pointer, what;
    try {
      run(recipe, root / mode, "", /*validate_only=*/true);
    } catch (const isp::RecipeError& e) {
      pointer = e.where().pointer;
      what = e.what();
    }
    INFO("mode " << mode << ": " << what);
    CHECK((pointer.rfind("/nodes/interp", 0) == 0 || pointer.rfind("/nodes/prune/regularizers", 0) == 0));
    CHECK(what.find(pointer) != std::string::npos);
  }
  // The map mode is fine with a pixel head.
  json recipe = tiny_recipe();
  recipe["nodes"]["head"] = {{"type", "RealXPixelHead"}, {"decoder", ref("decoder")}};
  recipe["nodes"]["interp"]["mode"] = "map";
  CHECK(run(recipe, root / "map", "", true) == 0);
  fs::remove_all(root);
}

TEST_CASE("GRU hypernetwork gates: weight-norm g and v are leaf parameters that AdamW steps") {
  isp::BuildContext ctx(registry(),
                        json{{"nodes", {{"backbone", {{"type", "ResNetCifar"}, {"depth", 20}}},
                                        {"gates", {{"type", "GruHypernetGates"}}}}}},
                        where_of);
  auto backbone = ctx.node<isp::Backbone>("backbone");
  auto pruner = ctx.node<isp::Pruner>("gates");
  isp::CostModel cost(backbone->layer_shapes(), backbone->gated_layers());
  pruner->attach(*backbone, cost);
  int64_t heads = 0;
  for (const auto& p : pruner->named_parameters()) {
    INFO(p.key());
    CHECK(p.value().is_leaf());
    CHECK(p.value().requires_grad());
    heads += p.key().find("_g") != std::string::npos;
  }
  CHECK(heads == static_cast<int64_t>(backbone->gated_layers().size()));
  // g starts at the row norms of v, so the head's initial weight is v itself.
  auto params = pruner->named_parameters();
  CHECK(at::allclose(params["head0_g"], params["head0_v"].norm(2, {1}, true)));
  isp::FlatAdam opt(pruner->parameters(), isp::FlatAdamOptions{0.1, 0.9, 0.999, 1e-8, 0.0, true});
  at::Tensor before = params["head0_g"].detach().clone();
  opt.zero_grad();
  pruner->hard_gates().sum().backward();
  opt.step();
  CHECK_FALSE(at::equal(before, params["head0_g"]));
}
