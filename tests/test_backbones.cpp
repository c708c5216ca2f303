// Backbone plugins ResNetCifar and MobileNetV2Cifar (docs/method.md §2.1, §2.2, §3.4), built through the registry.
#include "test_support.h"  // torch first, glog's CHECK macros dropped, then doctest

#include <ATen/autocast_mode.h>
#include <torch/version.h>

#include <algorithm>
#include <memory>
#include <string>
#include <utility>
#include <vector>

#include "isp/registry/error.h"
#include "isp/interfaces/backbone.h"
#include "isp/train.h"
#include "isp/registry/registry.h"

using isp::json;

namespace {

struct BackboneFixture {
  isp::Registry reg;
  std::unique_ptr<isp::BuildContext> ctx;
  int counter = 0;

  BackboneFixture() {
    reg.load_library(ISP_TEST_PLUGIN_DIR "/libisp_backbones_resnet_cifar.so");
    reg.load_library(ISP_TEST_PLUGIN_DIR "/libisp_backbones_mobilenetv2_cifar.so");
    ctx = std::make_unique<isp::BuildContext>(reg, json{{"nodes", json::object()}},
                                              [](const std::string& p) { return isp::Where{"test", p}; });
  }

  std::shared_ptr<isp::Backbone> build(const json& spec) {
    const std::string ptr = "/nodes/backbone" + std::to_string(counter++);
    return std::static_pointer_cast<isp::Backbone>(ctx->build(spec, isp::Where{"test", ptr}, "backbone"));
  }
};

int64_t count_params(torch::nn::Module& m) {
  int64_t n = 0;
  for (const auto& p : m.parameters()) n += p.numel();
  return n;
}

int64_t sum_widths(const std::vector<isp::GatedLayer>& g) {
  int64_t n = 0;
  for (const auto& l : g) n += l.width;
  return n;
}

// The layer tables the backbones wrote by hand before they declared their topology: the reference that the
// derived tables must reproduce field by field (FLOPs counts depend on every one of them).
struct RefTable {
  std::vector<isp::LayerShape> v;
  void operator()(std::string name, isp::LayerOp op, int64_t in, int64_t out, int64_t k, int64_t in_hw,
                  int64_t out_hw, int ig = -1, int og = -1, int64_t groups = 1) {
    v.push_back({std::move(name), op, in, out, k, groups, out_hw, out_hw, in_hw, in_hw, false, ig, og});
  }
};

std::vector<isp::LayerShape> resnet_reference(int64_t n, const std::vector<int64_t>& w) {
  using isp::LayerOp;
  RefTable add;
  int64_t hw = 32, in = 16;
  add("conv1", LayerOp::Conv, 3, 16, 3, hw, hw);
  add("bn1", LayerOp::BatchNorm, 16, 16, 1, hw, hw);
  add("relu", LayerOp::Relu, 16, 16, 1, hw, hw);
  for (int64_t i = 0; i < 3 * n; ++i) {
    const int64_t planes = 16 << (i / n), stride = (i > 0 && i % n == 0) ? 2 : 1, o = hw / stride, m = w[i];
    const int g = static_cast<int>(i);
    const std::string p = "layer" + std::to_string(i / n + 1) + "." + std::to_string(i % n) + ".";
    add(p + "conv1", LayerOp::Conv, in, m, 3, hw, o, -1, g);
    add(p + "bn1", LayerOp::BatchNorm, m, m, 1, o, o, g, g);
    add(p + "relu1", LayerOp::Relu, m, m, 1, o, o, g, g);
    add(p + "conv2", LayerOp::Conv, m, planes, 3, o, o, g, -1);
    add(p + "bn2", LayerOp::BatchNorm, planes, planes, 1, o, o);
    if (stride != 1) add(p + "shortcut", LayerOp::FunctionalAvgPool, in, in, stride, hw, o);
    add(p + "add", LayerOp::Add, planes, planes, 1, o, o);
    add(p + "relu2", LayerOp::Relu, planes, planes, 1, o, o);
    in = planes;
    hw = o;
  }
  add("avgpool", LayerOp::AvgPool, 64, 64, hw, hw, 1);
  add.v.push_back({"fc", isp::LayerOp::Linear, 64, 10, 1, 1, 1, 1, 1, 1, /*bias=*/true, -1, -1});
  return add.v;
}

std::vector<isp::LayerShape> mobilenet_reference(const std::vector<int64_t>& w) {
  using isp::LayerOp;
  const int64_t stages[7][4] = {{1, 16, 1, 1}, {6, 24, 2, 1}, {6, 32, 3, 1}, {6, 64, 4, 2},
                                {6, 96, 3, 1}, {6, 160, 3, 2}, {6, 320, 1, 1}};
  RefTable add;
  int64_t hw = 32, in = 32;
  std::size_t k = 0;
  add("conv1", LayerOp::Conv, 3, 32, 3, hw, hw);
  add("bn1", LayerOp::BatchNorm, 32, 32, 1, hw, hw);
  add("relu", LayerOp::FunctionalRelu, 32, 32, 1, hw, hw);
  for (const auto& s : stages) {
    for (int64_t b = 0; b < s[2]; ++b, ++k) {
      const int64_t stride = b == 0 ? s[3] : 1, o = (hw + stride - 1) / stride, h = w[k], out = s[1];
      const int g = static_cast<int>(k);
      const std::string p = "layers." + std::to_string(k) + ".";
      add(p + "conv1", LayerOp::Conv, in, h, 1, hw, hw, -1, g);
      add(p + "bn1", LayerOp::BatchNorm, h, h, 1, hw, hw, g, g);
      add(p + "relu1", LayerOp::FunctionalRelu, h, h, 1, hw, hw, g, g);
      add(p + "conv2", LayerOp::Conv, h, h, 3, hw, o, g, g, h);
      add(p + "bn2", LayerOp::BatchNorm, h, h, 1, o, o, g, g);
      add(p + "relu2", LayerOp::FunctionalRelu, h, h, 1, o, o, g, g);
      add(p + "conv3", LayerOp::Conv, h, out, 1, o, o, g, -1);
      add(p + "bn3", LayerOp::BatchNorm, out, out, 1, o, o);
      if (stride == 1) {
        if (in != out) {
          add(p + "shortcut.0", LayerOp::Conv, in, out, 1, hw, hw);
          add(p + "shortcut.1", LayerOp::BatchNorm, out, out, 1, hw, hw);
        }
        add(p + "add", LayerOp::Add, out, out, 1, o, o);
      }
      in = out;
      hw = o;
    }
  }
  add("conv2", LayerOp::Conv, 320, 1280, 1, hw, hw);
  add("bn2", LayerOp::BatchNorm, 1280, 1280, 1, hw, hw);
  add("relu", LayerOp::FunctionalRelu, 1280, 1280, 1, hw, hw);
  add("avgpool", LayerOp::FunctionalAvgPool, 1280, 1280, hw, hw, 1);
  add.v.push_back({"linear", isp::LayerOp::Linear, 1280, 10, 1, 1, 1, 1, 1, 1, /*bias=*/true, -1, -1});
  return add.v;
}

void check_same_layers(const std::vector<isp::LayerShape>& got, const std::vector<isp::LayerShape>& want) {
  REQUIRE(got.size() == want.size());
  auto fields = [](const isp::LayerShape& l) {
    return std::vector<int64_t>{static_cast<int64_t>(l.op), l.in_channels, l.out_channels, l.kernel, l.groups, l.in_h,
                                l.in_w, l.out_h, l.out_w, l.bias, l.in_gate, l.out_gate};
  };
  for (std::size_t i = 0; i < got.size(); ++i) {
    CAPTURE(want[i].name);
    CHECK(got[i].name == want[i].name);
    CHECK(fields(got[i]) == fields(want[i]));
  }
}

using SliceList = std::vector<std::pair<std::string, int64_t>>;
SliceList sorted_slices(const isp::ChannelGroup& g) {
  SliceList v;
  for (const auto& s : g.slices) v.emplace_back(s.param, s.dim);
  std::sort(v.begin(), v.end());
  return v;
}
SliceList bn_rows(const std::string& bn) {
  SliceList v;
  for (const char* t : {"weight", "bias", "running_mean", "running_var"}) v.emplace_back(bn + "." + t, 0);
  return v;
}

// Every slice names a real tensor whose sliced dimension has the gated layer's width.
void check_groups_match_tensors(isp::Backbone& bb) {
  auto named = bb.named_parameters();
  for (const auto& b : bb.named_buffers()) named.insert(b.key(), b.value());
  const auto groups = bb.channel_groups();
  REQUIRE(groups.size() == bb.gated_layers().size());
  for (std::size_t i = 0; i < groups.size(); ++i) {
    CHECK(groups[i].gate == static_cast<int>(i));
    for (const auto& s : groups[i].slices) {
      CAPTURE(s.param);
      const at::Tensor* t = named.find(s.param);
      REQUIRE(t);
      CHECK(t->size(s.dim) == bb.gated_layers()[i].width);
    }
  }
}

}  // namespace

TEST_CASE_FIXTURE(BackboneFixture, "ResNetCifar: ResNet-56 parameters, shapes, features and gates") {
  auto bb = build(json{{"type", "ResNetCifar"}, {"depth", 56}});
  REQUIRE(bb);
  CHECK(count_params(*bb) == 853018);
  CHECK(bb->num_classes() == 10);
  CHECK(bb->input_size() == 32);

  auto params = bb->named_parameters();
  CHECK(params.contains("conv1.weight"));
  CHECK(params.contains("layer1.0.conv1.weight"));
  CHECK(params.contains("layer3.8.bn2.bias"));
  CHECK(params.contains("fc.weight"));
  CHECK(bb->named_buffers().contains("layer1.0.bn1.running_mean"));
  CHECK(params["fc.weight"].sizes() == torch::IntArrayRef({10, 64}));
  CHECK(params["bn1.weight"].eq(0.5).all().item<bool>());  // bn_init_gamma default

  bb->eval();
  torch::NoGradGuard ng;
  auto x = torch::randn({2, 3, 32, 32});
  auto y = bb->forward(x);
  CHECK(y.sizes() == torch::IntArrayRef({2, 10}));

  auto f = bb->forward_features(x);
  REQUIRE(f.scales.size() == 3);
  CHECK(f.scales[0].sizes() == torch::IntArrayRef({2, 16, 32, 32}));
  CHECK(f.scales[1].sizes() == torch::IntArrayRef({2, 32, 16, 16}));
  CHECK(f.scales[2].sizes() == torch::IntArrayRef({2, 64, 8, 8}));
  CHECK(torch::allclose(f.logits, y));
  CHECK(bb->feature_channels() == std::vector<int64_t>{16, 32, 64});

  auto gates = bb->gated_layers();
  REQUIRE(gates.size() == 27);
  CHECK(gates[0].name == "layer1.0.gate");
  CHECK(gates[26].name == "layer3.8.gate");
  CHECK(sum_widths(gates) == 1008);
  CHECK(bb->total_gate_width() == 1008);

  // All-ones equals ungated; zeroing one layer's gates changes the logits; undefined restores.
  const auto n_params = bb->named_parameters().size();
  const auto n_buffers = bb->named_buffers().size();
  bb->set_gates(torch::ones({1008}));
  CHECK(torch::allclose(bb->forward(x), y));
  CHECK(bb->named_parameters().size() == n_params);  // gates are not parameters or buffers
  CHECK(bb->named_buffers().size() == n_buffers);
  bb->set_gates(torch::ones({2, 1008}));
  CHECK(torch::allclose(bb->forward(x), y));
  auto g = torch::ones({1008});
  g.narrow(0, 16 * 9 + 32 * 4, 32).zero_();  // layer2.4.gate
  bb->set_gates(g);
  CHECK_FALSE(torch::equal(bb->forward(x), y));
  bb->set_gates(at::Tensor());
  CHECK(torch::allclose(bb->forward(x), y));
  CHECK_THROWS_WITH_AS(bb->set_gates(torch::ones({1007})), doctest::Contains("ResNetCifar"), isp::Error);
}

TEST_CASE_FIXTURE(BackboneFixture, "ResNetCifar: gates carry gradients and per-sample gates apply per sample") {
  auto bb = build(json{{"type", "ResNetCifar"}, {"depth", 20}});
  bb->eval();
  auto x = torch::randn({2, 3, 32, 32});
  auto g = torch::ones({2, 336}, torch::requires_grad());
  bb->set_gates(g);
  bb->forward(x).sum().backward();
  REQUIRE(g.grad().defined());
  CHECK(g.grad().abs().sum().item<double>() > 0.0);

  torch::NoGradGuard ng;
  bb->set_gates(at::Tensor());
  auto y = bb->forward(x);
  auto g2 = torch::ones({2, 336});
  g2[1].narrow(0, 0, 16).zero_();  // sample 1 only: layer1.0.gate off
  bb->set_gates(g2);
  auto y2 = bb->forward(x);
  CHECK(torch::allclose(y2[0], y[0]));
  CHECK_FALSE(torch::equal(y2[1], y[1]));
}

TEST_CASE_FIXTURE(BackboneFixture, "ResNetCifar: depths, options, with_widths and rejected depth") {
  CHECK(count_params(*build(json{{"type", "ResNetCifar"}, {"depth", 20}})) == 269722);
  CHECK(build(json{{"type", "ResNetCifar"}, {"depth", 110}})->gated_layers().size() == 54);
  CHECK_THROWS_AS(build(json{{"type", "ResNetCifar"}, {"depth", 57}}), isp::RecipeError);

  auto bb = build(json{{"type", "ResNetCifar"}, {"depth", 20}, {"num_classes", 100}, {"in_channels", 1}});
  bb->eval();
  torch::NoGradGuard ng;
  CHECK(bb->forward(torch::randn({3, 1, 32, 32})).sizes() == torch::IntArrayRef({3, 100}));
  CHECK(bb->num_classes() == 100);

  // with_widths keeps every other option.
  const std::vector<int64_t> w = {1, 2, 3, 4, 5, 6, 7, 8, 9};
  auto small = bb->with_widths(w);
  auto p = small->named_parameters();
  CHECK(p["conv1.weight"].sizes() == torch::IntArrayRef({16, 1, 3, 3}));
  CHECK(p["layer1.0.conv1.weight"].sizes() == torch::IntArrayRef({1, 16, 3, 3}));
  CHECK(p["fc.weight"].sizes() == torch::IntArrayRef({100, 64}));
  CHECK(small->widths() == w);
  CHECK(small->structure().at("widths").get<std::vector<int64_t>>() == w);
  CHECK(small->with_widths({})->widths() == w);
  CHECK(bb->with_widths({})->widths() == std::vector<int64_t>{16, 16, 16, 32, 32, 32, 64, 64, 64});
  CHECK_THROWS_AS(bb->with_widths({1, 2, 3}), isp::Error);
  CHECK_THROWS_WITH_AS(small->set_gates(torch::ones({46})), doctest::Contains("ResNetCifar"), isp::Error);
}

TEST_CASE_FIXTURE(BackboneFixture, "ResNetCifar: reduced widths rebuild a pruned network") {
  std::vector<int64_t> w = {1, 2, 3, 4, 5, 6, 7, 8, 9};
  auto bb = build(json{{"type", "ResNetCifar"}, {"depth", 20}, {"widths", w}});
  auto p = bb->named_parameters();
  CHECK(p["layer1.0.conv1.weight"].sizes() == torch::IntArrayRef({1, 16, 3, 3}));
  CHECK(p["layer1.0.conv2.weight"].sizes() == torch::IntArrayRef({16, 1, 3, 3}));
  CHECK(p["layer1.0.bn1.weight"].sizes() == torch::IntArrayRef({1}));
  CHECK(p["layer2.0.conv1.weight"].sizes() == torch::IntArrayRef({4, 16, 3, 3}));
  CHECK(p["layer3.2.conv1.weight"].sizes() == torch::IntArrayRef({9, 64, 3, 3}));
  CHECK(p["layer3.2.conv2.weight"].sizes() == torch::IntArrayRef({64, 9, 3, 3}));
  CHECK(sum_widths(bb->gated_layers()) == 45);
  bb->eval();
  {
    torch::NoGradGuard ng;
    CHECK(bb->forward(torch::randn({2, 3, 32, 32})).sizes() == torch::IntArrayRef({2, 10}));
  }

  // structure() rebuilds the same architecture.
  json s = bb->structure();
  CHECK(s.at("widths").get<std::vector<int64_t>>() == w);
  CHECK(s.at("depth").get<int>() == 20);
  s["type"] = "ResNetCifar";
  auto again = build(s);
  auto q = again->named_parameters();
  REQUIRE(q.size() == p.size());
  for (const auto& kv : p) CHECK(q[kv.key()].sizes() == kv.value().sizes());

  // A full-width structure lists the full widths.
  auto full = build(json{{"type", "ResNetCifar"}, {"depth", 20}})->structure();
  CHECK(full.at("widths").get<std::vector<int64_t>>() ==
        std::vector<int64_t>{16, 16, 16, 32, 32, 32, 64, 64, 64});

  // Wrong length or non-positive widths are rejected.
  CHECK_THROWS_AS(build(json{{"type", "ResNetCifar"}, {"depth", 20}, {"widths", std::vector<int64_t>{1, 2, 3}}}),
                  isp::Error);
  CHECK_THROWS_AS(build(json{{"type", "ResNetCifar"},
                             {"depth", 20},
                             {"widths", std::vector<int64_t>{16, 16, 0, 32, 32, 32, 64, 64, 64}}}),
                  isp::Error);
}

TEST_CASE_FIXTURE(BackboneFixture, "MobileNetV2Cifar: parameters, shapes, features and gates") {
  auto bb = build(json{{"type", "MobileNetV2Cifar"}});
  REQUIRE(bb);
  // Spec table (stage 3 at stride 1, so block 3 has a 24->32 projection): 2 297 754 (~2.30 M).
  CHECK(count_params(*bb) == 2297754);
  auto params = bb->named_parameters();
  CHECK(params.contains("layers.0.conv1.weight"));
  CHECK(params["layers.0.conv1.weight"].sizes() == torch::IntArrayRef({32, 32, 1, 1}));  // t=1 keeps expansion
  CHECK(params["layers.1.shortcut.0.weight"].sizes() == torch::IntArrayRef({24, 16, 1, 1}));
  CHECK(params["conv2.weight"].sizes() == torch::IntArrayRef({1280, 320, 1, 1}));
  CHECK(params["linear.weight"].sizes() == torch::IntArrayRef({10, 1280}));

  auto gates = bb->gated_layers();
  REQUIRE(gates.size() == 17);
  const std::vector<int64_t> expect = {32,  96,  144, 144, 192, 192, 192, 384, 384,
                                       384, 384, 576, 576, 576, 960, 960, 960};
  for (std::size_t i = 0; i < gates.size(); ++i) CHECK(gates[i].width == expect[i]);
  CHECK(gates[0].name == "layers.0.gate");
  CHECK(sum_widths(gates) == 7136);

  bb->eval();
  torch::NoGradGuard ng;
  auto x = torch::randn({2, 3, 32, 32});
  auto y = bb->forward(x);
  CHECK(y.sizes() == torch::IntArrayRef({2, 10}));
  auto f = bb->forward_features(x);
  REQUIRE(f.scales.size() == 3);
  CHECK(f.scales[0].sizes() == torch::IntArrayRef({2, 32, 32, 32}));
  CHECK(f.scales[1].sizes() == torch::IntArrayRef({2, 96, 16, 16}));
  CHECK(f.scales[2].sizes() == torch::IntArrayRef({2, 1280, 8, 8}));
  CHECK(bb->feature_channels() == std::vector<int64_t>{32, 96, 1280});

  bb->set_gates(torch::ones({7136}));
  CHECK(torch::allclose(bb->forward(x), y));
  auto g = torch::ones({7136});
  g.narrow(0, 7136 - 960, 960).zero_();  // layers.16.gate
  bb->set_gates(g);
  CHECK_FALSE(torch::equal(bb->forward(x), y));
  bb->set_gates(at::Tensor());
  CHECK(torch::allclose(bb->forward(x), y));
  CHECK_THROWS_WITH_AS(bb->set_gates(torch::ones({3, 100})), doctest::Contains("MobileNetV2Cifar"), isp::Error);
}

TEST_CASE_FIXTURE(BackboneFixture, "MobileNetV2Cifar: reduced widths") {
  std::vector<int64_t> w(17, 8);
  auto bb = build(json{{"type", "MobileNetV2Cifar"}, {"widths", w}});
  auto p = bb->named_parameters();
  CHECK(p["layers.3.conv1.weight"].sizes() == torch::IntArrayRef({8, 24, 1, 1}));
  CHECK(p["layers.3.conv2.weight"].sizes() == torch::IntArrayRef({8, 1, 3, 3}));
  CHECK(p["layers.3.conv3.weight"].sizes() == torch::IntArrayRef({32, 8, 1, 1}));
  CHECK(sum_widths(bb->gated_layers()) == 17 * 8);
  CHECK(bb->structure().at("widths").get<std::vector<int64_t>>() == w);
  bb->eval();
  {
    torch::NoGradGuard ng;
    CHECK(bb->forward(torch::randn({2, 3, 32, 32})).sizes() == torch::IntArrayRef({2, 10}));
  }
  CHECK_THROWS_AS(build(json{{"type", "MobileNetV2Cifar"}, {"widths", std::vector<int64_t>(16, 8)}}), isp::Error);
}

TEST_CASE_FIXTURE(BackboneFixture, "backbone topology: derived layers and channel groups equal the hand-written ones") {
  const std::vector<int64_t> w20 = {1, 2, 3, 4, 5, 6, 7, 8, 9}, w_mb(17, 8);
  auto r20 = build(json{{"type", "ResNetCifar"}, {"depth", 20}});
  check_same_layers(r20->layer_shapes(), resnet_reference(3, r20->widths()));
  check_same_layers(r20->with_widths(w20)->layer_shapes(), resnet_reference(3, w20));
  auto mb = build(json{{"type", "MobileNetV2Cifar"}});
  check_same_layers(mb->layer_shapes(), mobilenet_reference(mb->widths()));
  check_same_layers(mb->with_widths(w_mb)->layer_shapes(), mobilenet_reference(w_mb));

  SliceList want = bn_rows("layer1.0.bn1");
  want.insert(want.end(), {{"layer1.0.conv1.weight", 0}, {"layer1.0.conv2.weight", 1}});
  std::sort(want.begin(), want.end());
  CHECK(sorted_slices(r20->channel_groups()[0]) == want);
  check_groups_match_tensors(*r20);
  check_groups_match_tensors(*r20->with_widths(w20));

  want = bn_rows("layers.0.bn1");
  for (const auto& s : bn_rows("layers.0.bn2")) want.push_back(s);
  want.insert(want.end(), {{"layers.0.conv1.weight", 0}, {"layers.0.conv2.weight", 0}, {"layers.0.conv3.weight", 1}});
  std::sort(want.begin(), want.end());
  CHECK(sorted_slices(mb->channel_groups()[0]) == want);
  CHECK(mb->channel_groups()[3].slices.size() == want.size());  // the projection shortcut is not gated
  check_groups_match_tensors(*mb);
  check_groups_match_tensors(*mb->with_widths(w_mb));
}

namespace {

// Gives every BN non-trivial statistics and affine parameters, so a fold that mixed them up would show.
void randomise_batchnorms(torch::nn::Module& m, uint64_t seed) {
  torch::manual_seed(seed);
  torch::NoGradGuard ng;
  for (auto& child : m.modules(/*include_self=*/false)) {
    if (auto* bn = child->as<torch::nn::BatchNorm2d>()) {
      bn->running_mean.copy_(torch::randn_like(bn->running_mean) * 0.3);
      bn->running_var.copy_(torch::rand_like(bn->running_var) * 1.5 + 0.5);
      bn->weight.copy_(torch::rand_like(bn->weight) + 0.5);
      bn->bias.copy_(torch::randn_like(bn->bias) * 0.2);
    }
  }
}

// bfloat16 autocast on the CPU for a scope (the API changed in LibTorch 2.4).
class CpuBf16Autocast {
 public:
  CpuBf16Autocast() {
#if TORCH_VERSION_MAJOR > 2 || (TORCH_VERSION_MAJOR == 2 && TORCH_VERSION_MINOR >= 4)
    at::autocast::set_autocast_enabled(at::kCPU, true);
    at::autocast::set_autocast_dtype(at::kCPU, at::kBFloat16);
#else
    at::autocast::set_cpu_enabled(true);
    at::autocast::set_autocast_cpu_dtype(at::kBFloat16);
#endif
    at::autocast::increment_nesting();
  }
  ~CpuBf16Autocast() {
    if (at::autocast::decrement_nesting() == 0) at::autocast::clear_cache();
#if TORCH_VERSION_MAJOR > 2 || (TORCH_VERSION_MAJOR == 2 && TORCH_VERSION_MINOR >= 4)
    at::autocast::set_autocast_enabled(at::kCPU, false);
#else
    at::autocast::set_cpu_enabled(false);
#endif
  }
};

}  // namespace

TEST_CASE("ConvBatchNorm: folds only a frozen eval-mode BN, follows every change, keeps gradients") {
  torch::manual_seed(3);
  isp::ScopedBatchNormFolding on(true);
  torch::nn::Conv2d conv(torch::nn::Conv2dOptions(4, 6, 3).stride(2).padding(1).bias(true));
  torch::nn::BatchNorm2d bn(6);
  randomise_batchnorms(*bn, 4);
  isp::ConvBatchNorm fused;
  const auto x = torch::randn({5, 4, 9, 9});
  auto separate = [&] { return bn->forward(conv->forward(x)); };

  // Training mode: batch statistics, never folded.
  conv->train(), bn->train();
  fused(*conv, *bn, x);
  CHECK_FALSE(fused.last_call_folded());

  conv->eval(), bn->eval();
  {  // Eval mode but parameters that want gradients: not folded, and the conv weight gets its gradient.
    fused(*conv, *bn, x).sum().backward();
    CHECK_FALSE(fused.last_call_folded());
    REQUIRE(conv->weight.grad().defined());
    CHECK(conv->weight.grad().abs().sum().item<double>() > 0);
  }
  {
    torch::NoGradGuard ng;
    const auto folded = fused(*conv, *bn, x);
    CHECK(fused.last_call_folded());
    const double delta = (folded - separate()).abs().max().item<double>();
    MESSAGE("conv(stride 2, bias) + BN folded: max |delta| " << delta);
    CHECK(delta < 1e-5 * separate().abs().max().item<double>() + 1e-6);
    // Training-mode forwards update the running statistics inside the batch_norm kernel (no version bump); the
    // next frozen call must see them (a stale fold once cost the quick classifier half its accuracy).
    {
      torch::GradMode::set_enabled(true);
      bn->train();
      for (int i = 0; i < 3; ++i) fused(*conv, *bn, x * (2.0 + i) + 1.0);
      bn->eval();
      torch::GradMode::set_enabled(false);
      CHECK((fused(*conv, *bn, x) - separate()).abs().max().item<double>() < 1e-4);
      CHECK(fused.last_call_folded());
    }
    // Any other change of a source tensor (an optimizer step, load_state_dict) is seen too.
    conv->weight.mul_(1.5);
    CHECK((fused(*conv, *bn, x) - separate()).abs().max().item<double>() < 1e-4);
    bn->running_var.mul_(3.0);
    CHECK((fused(*conv, *bn, x) - separate()).abs().max().item<double>() < 1e-4);
    // Switched off process-wide: the layers run separately, bit for bit.
    isp::ScopedBatchNormFolding off(false);
    CHECK(torch::equal(fused(*conv, *bn, x), separate()));
    CHECK_FALSE(fused.last_call_folded());
  }
  {  // Frozen parameters in grad mode (gate learning): folded, and the input still gets its gradient.
    for (auto& p : conv->parameters()) p.set_requires_grad(false);
    for (auto& p : bn->parameters()) p.set_requires_grad(false);
    const auto xg = x.clone().requires_grad_(true);
    fused(*conv, *bn, xg).pow(2).sum().backward();
    CHECK(fused.last_call_folded());
    const auto xr = x.clone().requires_grad_(true);
    bn->forward(conv->forward(xr)).pow(2).sum().backward();
    CHECK((xg.grad() - xr.grad()).abs().max().item<double>() < 1e-4 * xr.grad().abs().max().item<double>());
  }
  {  // First folded under inference mode, then used where autograd records: the cache holds ordinary tensors.
    isp::ConvBatchNorm fresh;
    {
      c10::InferenceMode im;
      fresh(*conv, *bn, x);
    }
    const auto xg = x.clone().requires_grad_(true);
    CHECK_NOTHROW(fresh(*conv, *bn, xg).sum().backward());
    CHECK(fresh.last_call_folded());
  }
}

TEST_CASE_FIXTURE(BackboneFixture, "BatchNorm folding: a network held by FrozenParameters folds once and refolds only when it must") {
  isp::ScopedBatchNormFolding on(true);
  auto bb = build(json{{"type", "ResNetCifar"}, {"depth", 20}});
  randomise_batchnorms(*bb, 5);
  bb->eval();
  const auto x = torch::randn({3, 3, 32, 32});
  at::Tensor unfolded;
  {
    isp::ScopedBatchNormFolding off(false);
    torch::NoGradGuard ng;
    unfolded = bb->forward(x);
  }
  auto delta = [&](const at::Tensor& y, const at::Tensor& ref) { return (y - ref).abs().max().item<double>(); };
  const double tol = 1e-4 * unfolded.abs().max().item<double>() + 1e-5;
  at::Tensor bf16_per_call;  // folded on every call, cast by autocast on every call
  {
    torch::NoGradGuard ng;
    CpuBf16Autocast bf16;
    bf16_per_call = bb->forward(x);
  }
  const std::size_t before = isp::kept_batchnorm_folds();
  {
    isp::FrozenParameters frozen(*bb);
    const auto xg = x.clone().requires_grad_(true);
    const auto y1 = bb->forward(xg);  // grad mode on, parameters frozen: folded (the selector's predictor pass)
    const std::size_t kept = isp::kept_batchnorm_folds() - before;
    CHECK(kept == 19);  // ResNet-20: 19 conv + BN pairs (option A shortcuts have no conv)
    CHECK(delta(y1, unfolded) < tol);
    y1.sum().backward();
    CHECK(xg.grad().defined());
    // Reused, not recomputed: same values bit for bit, nothing new kept.
    torch::NoGradGuard ng;
    CHECK(torch::equal(bb->forward(x), y1.detach()));
    CHECK(isp::kept_batchnorm_folds() - before == kept);
    {  // Under bf16 autocast the kept fold's own bf16 copy replaces autocast's cast: the same numbers, bit for bit.
      CpuBf16Autocast bf16;
      const auto y = bb->forward(x);
      CHECK(torch::equal(y, bf16_per_call));
      CHECK(torch::equal(bb->forward(x), bf16_per_call));
    }
    // A training-mode forward changes the running statistics: its folds are dropped, and the next frozen call
    // sees the new statistics.
    bb->train();
    bb->forward(x * 3.0 + 1.0);
    CHECK(isp::kept_batchnorm_folds() == before);
    bb->eval();
    at::Tensor after_train;
    {
      isp::ScopedBatchNormFolding off(false);
      after_train = bb->forward(x);
    }
    CHECK(delta(after_train, unfolded) > 10 * tol);  // the statistics did move
    CHECK(delta(bb->forward(x), after_train) < tol);
    // New storage (channels_last, as runtime.channels_last converts a frozen network) is refolded.
    for (auto& p : bb->parameters())
      if (p.dim() == 4) p.set_data(p.detach().contiguous(at::MemoryFormat::ChannelsLast));
    CHECK(delta(bb->forward(x), after_train) < tol);
    {
      isp::FrozenParameters nested(*bb);  // a second owner of the same network
    }
    CHECK(isp::kept_batchnorm_folds() - before == kept);  // still held by the outer owner
  }
  CHECK(isp::kept_batchnorm_folds() == before);  // gone with the scope
}

TEST_CASE_FIXTURE(BackboneFixture, "BatchNorm folding: frozen ResNet-20 and MobileNetV2 give the unfolded logits") {
  for (const json& spec : {json{{"type", "ResNetCifar"}, {"depth", 20}},
                           json{{"type", "MobileNetV2Cifar"}},
                           json{{"type", "ResNetCifar"}, {"depth", 20}, {"widths", {3, 16, 5, 9, 32, 1, 64, 17, 40}}}}) {
    CAPTURE(spec.dump());
    auto bb = build(spec);
    randomise_batchnorms(*bb, 7);
    bb->eval();
    torch::NoGradGuard ng;
    const auto x = torch::randn({4, 3, 32, 32});
    at::Tensor unfolded, folded;
    {
      isp::ScopedBatchNormFolding off(false);
      unfolded = bb->forward(x);
    }
    {
      isp::ScopedBatchNormFolding on(true);
      folded = bb->forward(x);
      const double delta = (folded - unfolded).abs().max().item<double>();
      MESSAGE(spec.dump() << ": max |delta logit| folded vs unfolded " << delta << " (logits up to "
                          << unfolded.abs().max().item<double>() << ")");
      CHECK(delta < 1e-4 * unfolded.abs().max().item<double>() + 1e-5);
      CHECK(folded.argmax(1).equal(unfolded.argmax(1)));
      // Features (the selector's encoder scales) agree too.
      const auto ff = bb->forward_features(x);
      isp::ScopedBatchNormFolding off(false);
      const auto fu = bb->forward_features(x);
      for (std::size_t i = 0; i < ff.scales.size(); ++i)
        CHECK((ff.scales[i] - fu.scales[i]).abs().max().item<double>() <
              1e-4 * fu.scales[i].abs().max().item<double>() + 1e-5);
    }
  }
}
