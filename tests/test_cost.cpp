// Cost model (FLOPs / params, docs/method.md §1e, §3.3, §8) and channel surgery (extract_pruned, docs/method.md §1e).
#include "test_support.h"

#include <algorithm>
#include <cmath>
#include <memory>
#include <numeric>
#include <string>
#include <utility>
#include <vector>

#include "isp/cost.h"
#include "isp/registry/error.h"
#include "isp/interfaces/backbone.h"
#include "isp/registry/registry.h"

using isp::json;

namespace {

struct CostFixture {
  isp::Registry reg;
  std::unique_ptr<isp::BuildContext> ctx;

  CostFixture() {
    reg.load_library(isp_test::plugin("isp_backbones_resnet_cifar"));
    reg.load_library(isp_test::plugin("isp_backbones_mobilenetv2_cifar"));
  }
  std::shared_ptr<isp::Backbone> build(const json& spec) {
    ctx = std::make_unique<isp::BuildContext>(reg, json{{"nodes", {{"backbone", spec}}}},
                                              [](const std::string& p) { return isp::Where{"t.json", p}; });
    return ctx->node<isp::Backbone>("backbone");
  }
};

isp::CostModel cost_of(const isp::Backbone& b) { return isp::CostModel(b.layer_shapes(), b.gated_layers()); }

double count_params(const torch::nn::Module& m) {
  double n = 0;
  for (const auto& p : m.parameters()) n += static_cast<double>(p.numel());
  return n;
}

std::vector<int64_t> full_widths(const isp::Backbone& b) {
  std::vector<int64_t> w;
  for (const auto& g : b.gated_layers()) w.push_back(g.width);
  return w;
}

// Eval-mode BN with non-trivial statistics and affine parameters, so that dropping channels is meaningful.
void randomise_bn(torch::nn::Module& m) {
  torch::NoGradGuard ng;
  for (auto& mod : m.modules(/*include_self=*/false)) {
    if (auto* bn = mod->as<torch::nn::BatchNorm2d>()) {
      bn->weight.uniform_(0.5, 1.5);
      bn->bias.uniform_(-0.2, 0.2);
      bn->running_mean.normal_(0.0, 0.2);
      bn->running_var.uniform_(0.5, 2.0);
    }
  }
}

// ~50% random {0,1} gates per layer, with gated layer `zero_layer` all zeros.
at::Tensor random_gates(const isp::Backbone& b, int zero_layer) {
  auto gl = b.gated_layers();
  at::Tensor g = torch::bernoulli(torch::full({b.total_gate_width()}, 0.5));
  int64_t off = 0;
  for (int i = 0; i < static_cast<int>(gl.size()); ++i) {
    if (i == zero_layer) g.narrow(0, off, gl[i].width).zero_();
    off += gl[i].width;
  }
  return g;
}

// Surgery equivalence: gated full network vs. the extracted network (no BuildContext), eval mode, same input.
double surgery_max_diff(CostFixture& f, const json& spec, int zero_layer, std::shared_ptr<isp::Backbone>* out_model,
                        isp::ExtractedNetwork* out_ext) {
  torch::manual_seed(7);
  auto bb = f.build(spec);
  randomise_bn(*bb);
  bb->eval();
  at::Tensor gates = random_gates(*bb, zero_layer);
  isp::ExtractedNetwork ext = isp::extract_pruned(*bb, gates);

  // The layer with no kept channel keeps exactly one (the strongest gate: index 0 for an all-zero slice).
  auto gl = bb->gated_layers();
  int64_t off = 0;
  for (int i = 0; i < zero_layer; ++i) off += gl[i].width;
  REQUIRE(ext.kept_indices[zero_layer].size() == 1);
  CHECK(ext.kept_indices[zero_layer][0] == 0);
  at::Tensor adjusted = gates.clone();
  adjusted[off + ext.kept_indices[zero_layer][0]] = 1.0;

  at::Tensor x = torch::randn({4, 3, 32, 32});
  torch::NoGradGuard ng;
  bb->set_gates(adjusted);
  at::Tensor ref = bb->forward(x);
  bb->set_gates(at::Tensor());
  at::Tensor ungated = bb->forward(x);
  CHECK((ungated - ref).abs().max().item<double>() > 1e-3);  // the gates matter: the comparison is meaningful
  at::Tensor got = ext.model->forward(x);
  REQUIRE(got.sizes() == ref.sizes());
  MESSAGE("max |logit| " << ref.abs().max().item<double>());
  *out_model = bb;
  *out_ext = ext;
  return (got - ref).abs().max().item<double>();
}

// A backbone of linear layers only, like the out-of-tree ExampleTinyMLP: gates on [N, C] features, biases cut.
class GatedMlp : public isp::Backbone {
 public:
  explicit GatedMlp(std::vector<int64_t> widths) : widths_(std::move(widths)) {
    int64_t in = 12;
    int in_gate = -1;
    for (std::size_t i = 0; i < widths_.size(); ++i) {
      const std::string name = "fc" + std::to_string(i + 1);
      fc_.push_back(register_module(name, torch::nn::Linear(in, widths_[i])));
      const int g = declare_gate(name + ".gate", widths_[i]);
      declare_linear(name, in, widths_[i], in_gate, g);
      declare_op(name + ".relu", isp::LayerOp::Relu, widths_[i], 1, 1, g);
      in = widths_[i];
      in_gate = g;
    }
    fc_.push_back(register_module("out", torch::nn::Linear(in, 3)));
    declare_linear("out", in, 3, in_gate);
  }
  at::Tensor forward(const at::Tensor& x) override { return forward_features(x).logits; }
  isp::BackboneFeatures forward_features(const at::Tensor& x) override {
    at::Tensor h = x;
    for (std::size_t i = 0; i + 1 < fc_.size(); ++i)
      h = apply_gate(torch::relu(fc_[i]->forward(h)), gate(static_cast<int>(i)));
    return {{h.view({h.size(0), h.size(1), 1, 1})}, fc_.back()->forward(h)};
  }
  std::vector<int64_t> feature_channels() const override { return {widths_.back()}; }
  int64_t num_classes() const override { return 3; }
  int64_t input_size() const override { return 2; }
  json structure() const override { return {{"widths", widths_}}; }
  std::shared_ptr<isp::Backbone> with_widths(const std::vector<int64_t>& w) const override {
    return std::make_shared<GatedMlp>(w.empty() ? widths_ : w);
  }

 private:
  std::vector<int64_t> widths_;
  std::vector<torch::nn::Linear> fc_;
};

}  // namespace

TEST_CASE_FIXTURE(CostFixture, "cost: hand-computed FLOPs of ResNet-20 layers and pruned widths") {
  auto bb = build(json{{"type", "ResNetCifar"}, {"depth", 20}});
  auto cm = cost_of(*bb);
  const auto s = cm.count();
  auto find = [&](const std::string& name) {
    for (const auto& l : s.layers)
      if (l.name == name) return l;
    FAIL("no layer " << name);
    return isp::LayerCostBreakdown{};
  };
  CHECK(find("conv1").flops == 9.0 * 3 * 16 * 32 * 32);                // 442 368
  CHECK(find("layer1.0.conv1").flops == 9.0 * 16 * 16 * 32 * 32);       // 2 359 296
  CHECK(find("layer1.0.conv1").params == 9.0 * 16 * 16);
  CHECK(find("layer1.0.bn1").flops == 2.0 * 16 * 32 * 32);              // 32 768
  CHECK(find("layer1.0.bn1").params == 32);
  CHECK(find("layer1.0.relu1").flops == 16.0 * 32 * 32);                // 16 384
  CHECK(find("layer2.0.conv1").flops == 9.0 * 16 * 32 * 16 * 16);       // stride 2: 1 179 648
  CHECK(find("layer2.0.shortcut").flops == 0);                         // option A: invisible to the counter
  CHECK(find("layer2.0.add").flops == 0);                              // functional add
  CHECK(find("avgpool").flops == 64.0 * 8 * 8);                        // AvgPool2d(8): 4 096
  CHECK(find("fc").flops == 64.0 * 10 + 10);
  CHECK(find("fc").params == 650);
  // Stem 491 520 + stage 1 3·4 816 896 + stage 2 (3 588 096 + 2·4 767 744) + stage 3 (3 563 520 + 2·4 743 168)
  // + pool 4 096 + fc 650.
  CHECK(s.flops == 41120394.0);
  CHECK(s.params == count_params(*bb));
  // Block 0 pruned to 8 channels: conv1 −9·16·8·1024, bn1 −2·8·1024, relu1 −8·1024, conv2 −9·8·16·1024.
  auto w = full_widths(*bb);
  w[0] = 8;
  CHECK(cm.count(w).flops == 41120394.0 - 2383872.0);
  CHECK(cm.count(w).params == count_params(*bb) - 9 * 16 * 8 - 16 - 9 * 8 * 16);
  CHECK_THROWS_AS(cm.count({1, 2, 3}), isp::Error);
}

TEST_CASE_FIXTURE(CostFixture, "cost: unpruned ResNet-56 and MobileNetV2 FLOPs reproduce the official counter") {
  SUBCASE("ResNet-56") {
    auto bb = build(json{{"type", "ResNetCifar"}, {"depth", 56}});
    auto cm = cost_of(*bb);
    // Stem 491 520 + stage 1 9·4 816 896 + stage 2 (3 588 096 + 8·4 767 744) + stage 3 (3 563 520 + 8·4 743 168)
    // + pool 4 096 + fc 650 = 127 087 242 = 0.12709 G (docs/method.md §8).
    CHECK(cm.full_flops() == 127087242.0);
    CHECK(std::round(cm.full_flops() / 1e4) / 1e5 == doctest::Approx(0.12709).epsilon(1e-12));
    CHECK(cm.full_params() == 853018.0);
    CHECK(cm.full_params() == count_params(*bb));
  }
  SUBCASE("MobileNetV2") {
    auto bb = build(json{{"type", "MobileNetV2Cifar"}});
    auto cm = cost_of(*bb);
    // Convs 305 176 576 + shortcut conv/BN 6 791 168 ... : conv + BN + linear (the reference model's ReLUs, pool
    // and adds are functional) = 312 877 578 = 0.31288 G (docs/method.md §8).
    CHECK(cm.full_flops() == 312877578.0);
    CHECK(std::round(cm.full_flops() / 1e4) / 1e5 == doctest::Approx(0.31288).epsilon(1e-12));
    CHECK(cm.full_params() == 2297754.0);
    CHECK(cm.full_params() == count_params(*bb));
    // Block 0 (32@32x32, hidden 32 -> 16): per channel conv1 32 + bn1 2 + dw 9 + bn2 2 + conv3 16 = 61 per pixel.
    auto w = full_widths(*bb);
    w[0] = 16;
    CHECK(cm.count(w).flops == 312877578.0 - 16.0 * 61 * 1024);
  }
}

TEST_CASE_FIXTURE(CostFixture, "cost: differentiable FLOPs equal count() at random and full widths") {
  for (const json& spec : std::vector<json>{json{{"type", "ResNetCifar"}, {"depth", 56}}, json{{"type", "MobileNetV2Cifar"}}}) {
    CAPTURE(spec.dump());
    auto bb = build(spec);
    auto cm = cost_of(*bb);
    auto full = full_widths(*bb);
    at::Tensor kf = torch::tensor(full, torch::kDouble);
    CHECK(cm.flops(kf).item<double>() == doctest::Approx(cm.full_flops()).epsilon(1e-12));
    torch::manual_seed(3);
    for (int trial = 0; trial < 5; ++trial) {
      std::vector<int64_t> w;
      for (int64_t f : full) w.push_back(torch::randint(1, f + 1, {1}).item<int64_t>());
      at::Tensor k = torch::tensor(w, torch::kDouble).requires_grad_(true);
      at::Tensor fl = cm.flops(k);
      CHECK(fl.item<double>() == doctest::Approx(cm.count(w).flops).epsilon(1e-12));
      fl.backward();
      // Gradient = exact FLOPs of one more channel in that layer (the cost is linear in each kept count).
      auto w1 = w;
      w1[1] += 1;
      CHECK(k.grad()[1].item<double>() == doctest::Approx(cm.count(w1).flops - cm.count(w).flops).epsilon(1e-12));
    }
    // Float input stays float and differentiable.
    at::Tensor kfl = kf.to(torch::kFloat).requires_grad_(true);
    at::Tensor ffl = cm.flops(kfl);
    CHECK((ffl.scalar_type() == torch::kFloat));
    CHECK(ffl.requires_grad());
  }
}

TEST_CASE_FIXTURE(CostFixture, "cost: official FLOPs ratio and kept_per_layer") {
  SUBCASE("ResNet-56: conv1-only numerator over T_total") {
    auto bb = build(json{{"type", "ResNetCifar"}, {"depth", 56}});
    auto cm = cost_of(*bb);
    at::Tensor full = torch::tensor(full_widths(*bb), torch::kDouble);
    // 62 115 840 / 126 590 976 (docs/method.md §3.3, §8).
    const double r = cm.official_flops_ratio(full).item<double>();
    CHECK(std::abs(r - 0.49068) < 1e-4);
    CHECK(r == doctest::Approx(62115840.0 / 126590976.0).epsilon(1e-12));
    // Halving every block halves the numerator's channel-linear terms.
    CHECK(cm.official_flops_ratio(full / 2).item<double>() == doctest::Approx(r / 2).epsilon(1e-12));
  }
  SUBCASE("MobileNetV2: quadratic depthwise term, T_total 282 912 768") {
    auto bb = build(json{{"type", "MobileNetV2Cifar"}});
    auto cm = cost_of(*bb);
    auto fw = full_widths(*bb);
    at::Tensor full = torch::tensor(fw, torch::kDouble);
    CHECK(cm.official_flops_ratio(full).item<double>() == doctest::Approx(1.0).epsilon(1e-12));
    // Independent evaluation from the stage table at half width (c = G/2).
    const int64_t st[7][4] = {{1, 16, 1, 1}, {6, 24, 2, 1}, {6, 32, 3, 1}, {6, 64, 4, 2},
                              {6, 96, 3, 1}, {6, 160, 3, 2}, {6, 320, 1, 1}};
    double T = 0, N = 0;
    int64_t in = 32, hw = 32;
    for (auto& s : st) {
      for (int64_t b = 0; b < s[2]; ++b) {
        const int64_t stride = b == 0 ? s[3] : 1, G = s[0] * in, o = hw / stride;
        const double c = G / 2.0, H1 = double(hw * hw), H2 = double(o * o);
        T += in * G * H1 + 3.0 * G * H1 + 9.0 * G * H2 + 3.0 * G * H2 + G * s[1] * H2 + 3.0 * s[1] * H2;
        N += in * c * H1 + 3 * c * H1 + 9 * (c / G) * c * H2 + 3 * c * H2 + c * s[1] * H2 + 3.0 * s[1] * H2;
        in = s[1];
        hw = o;
      }
    }
    CHECK(T == 282912768.0);
    CHECK(cm.official_flops_ratio(full / 2).item<double>() == doctest::Approx(N / T).epsilon(1e-12));
  }
  SUBCASE("kept_per_layer sums each layer's gates, differentiably") {
    auto bb = build(json{{"type", "ResNetCifar"}, {"depth", 20}});
    auto cm = cost_of(*bb);
    at::Tensor g = torch::rand({bb->total_gate_width()}).requires_grad_(true);
    at::Tensor k = cm.kept_per_layer(g);
    REQUIRE(k.sizes() == at::IntArrayRef({9}));
    CHECK(k[0].item<double>() == doctest::Approx(g.narrow(0, 0, 16).sum().item<double>()));
    CHECK(k[8].item<double>() == doctest::Approx(g.narrow(0, 16 * 3 + 32 * 3 + 64 * 2, 64).sum().item<double>()));
    k.sum().backward();
    CHECK(g.grad().eq(1).all().item<bool>());
    at::Tensor batch = torch::ones({2, bb->total_gate_width()});
    CHECK(cm.kept_per_layer(batch).sizes() == at::IntArrayRef({2, 9}));
    CHECK_THROWS_AS(cm.kept_per_layer(torch::ones({5})), isp::Error);
  }
}

TEST_CASE_FIXTURE(CostFixture, "surgery: extracted ResNet-20 and ResNet-56 equal the gated network") {
  for (const int depth : {20, 56}) {
    CAPTURE(depth);
    std::shared_ptr<isp::Backbone> bb;
    isp::ExtractedNetwork ext;
    const double d = surgery_max_diff(*this, json{{"type", "ResNetCifar"}, {"depth", depth}}, 3, &bb, &ext);
    MESSAGE("ResNet-" << depth << " surgery max |logit difference| = " << d);
    CHECK(d < 1e-5);
    std::vector<int64_t> w;
    for (const auto& k : ext.kept_indices) w.push_back(static_cast<int64_t>(k.size()));
    CHECK(ext.spec["widths"].get<std::vector<int64_t>>() == w);
    CHECK(ext.spec == ext.model->structure());
    CHECK(ext.spec["depth"] == depth);
    CHECK(ext.model->widths() == w);
    CHECK(count_params(*ext.model) < count_params(*bb));
    auto small = cost_of(*ext.model);
    CHECK(small.full_flops() == cost_of(*bb).count(w).flops);
    CHECK(small.full_params() == cost_of(*bb).count(w).params);
    CHECK(small.full_params() == count_params(*ext.model));
    CHECK(small.full_flops() < cost_of(*bb).full_flops());
    CHECK_FALSE(ext.model->is_training());
  }
}

TEST_CASE_FIXTURE(CostFixture, "surgery: extracted MobileNetV2 equals the gated network") {
  std::shared_ptr<isp::Backbone> bb;
  isp::ExtractedNetwork ext;
  const double d = surgery_max_diff(*this, json{{"type", "MobileNetV2Cifar"}}, 5, &bb, &ext);
  MESSAGE("MobileNetV2 surgery max |logit difference| = " << d);
  CHECK(d < 1e-5);
  std::vector<int64_t> w;
  for (const auto& k : ext.kept_indices) w.push_back(static_cast<int64_t>(k.size()));
  CHECK(ext.spec["widths"].get<std::vector<int64_t>>() == w);
  CHECK(count_params(*ext.model) < count_params(*bb));
  auto small = cost_of(*ext.model);
  CHECK(small.full_flops() == cost_of(*bb).count(w).flops);
  CHECK(small.full_params() == cost_of(*bb).count(w).params);
  CHECK(small.full_params() == count_params(*ext.model));
}

TEST_CASE_FIXTURE(CostFixture, "surgery: copy_pruned_weights names the mismatching tensor") {
  auto full = build(json{{"type", "ResNetCifar"}, {"depth", 20}});
  std::vector<int64_t> w(9, 16);
  for (int i = 3; i < 6; ++i) w[i] = 32;
  for (int i = 6; i < 9; ++i) w[i] = 64;
  w[0] = 4;
  auto small = std::static_pointer_cast<isp::Backbone>(ctx->build(
      json{{"type", "ResNetCifar"}, {"depth", 20}, {"widths", w}}, isp::Where{"t.json", "/nodes/x"}, "backbone"));
  std::vector<std::vector<int64_t>> kept;
  for (int64_t c : w) {
    kept.emplace_back(c);
    std::iota(kept.back().begin(), kept.back().end(), 0);
  }
  CHECK_NOTHROW(isp::copy_pruned_weights(*full, *small, kept));
  CHECK(torch::equal(small->named_parameters()["layer1.0.conv1.weight"],
                     full->named_parameters()["layer1.0.conv1.weight"].narrow(0, 0, 4)));
  kept[0] = {0, 1, 2};  // one index short
  CHECK_THROWS_WITH_AS(isp::copy_pruned_weights(*full, *small, kept), doctest::Contains("layer1.0.conv1.weight"),
                       isp::Error);
  kept.pop_back();
  CHECK_THROWS_AS(isp::copy_pruned_weights(*full, *small, kept), isp::Error);

}

TEST_CASE_FIXTURE(CostFixture, "surgery: a linear-only backbone is pruned through its declared topology") {
  torch::manual_seed(11);
  GatedMlp mlp({8, 6});
  mlp.eval();
  const auto groups = mlp.channel_groups();
  REQUIRE(groups.size() == 2);
  std::vector<std::pair<std::string, int64_t>> g1;
  for (const auto& sl : groups[1].slices) g1.emplace_back(sl.param, sl.dim);
  std::sort(g1.begin(), g1.end());
  CHECK(g1 == std::vector<std::pair<std::string, int64_t>>{{"fc2.bias", 0}, {"fc2.weight", 0}, {"out.weight", 1}});
  CHECK(isp::CostModel(mlp.layer_shapes(), mlp.gated_layers()).full_params() == count_params(mlp));
  at::Tensor gates = torch::tensor({1, 0, 1, 1, 0, 0, 1, 0, /**/ 0, 1, 1, 0, 1, 0}, torch::kFloat);
  isp::ExtractedNetwork ext = isp::extract_pruned(mlp, gates);
  CHECK(ext.model->widths() == std::vector<int64_t>{4, 3});
  CHECK(ext.spec == json{{"widths", {4, 3}}});
  CHECK_FALSE(ext.model->is_training());
  torch::NoGradGuard ng;
  at::Tensor x = torch::randn({5, 12});
  mlp.set_gates(gates.unsqueeze(0).expand({5, -1}));  // per-sample gates: [N, C] over [N, C] features
  const at::Tensor ref = mlp.forward(x);
  CHECK((ext.model->forward(x) - ref).abs().max().item<double>() < 1e-6);
  mlp.set_gates(at::Tensor());
  CHECK((mlp.forward(x) - ref).abs().max().item<double>() > 1e-4);
}
