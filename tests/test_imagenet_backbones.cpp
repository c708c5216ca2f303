// The ImageNet backbone plugins in torchvision's layout ("ResNet", "MobileNetV2"): sizes and counts against
// torchvision's published figures, gates and channel surgery, and torchvision's own models loaded by name
// (python3-torchvision).
#include "test_support.h"

#include <cstdlib>
#include <fstream>
#include <memory>
#include <string>
#include <vector>

#include "isp/checkpoint.h"
#include "isp/cost.h"
#include "isp/interfaces/backbone.h"
#include "isp/registry/registry.h"

using isp::json;

namespace {

struct ResNetFixture {
  isp::Registry reg;
  std::unique_ptr<isp::BuildContext> ctx;
  ResNetFixture() {
    reg.load_library(isp_test::plugin("isp_backbones_resnet"));
    reg.load_library(isp_test::plugin("isp_backbones_mobilenetv2"));
  }
  std::shared_ptr<isp::Backbone> build(json spec) {
    if (!spec.contains("type")) spec["type"] = "ResNet";
    ctx = std::make_unique<isp::BuildContext>(reg, json{{"nodes", {{"backbone", spec}}}},
                                              [](const std::string& p) { return isp::Where{"t.json", p}; });
    return ctx->node<isp::Backbone>("backbone");
  }
};

double parameter_count(const torch::nn::Module& m) {
  double n = 0;
  for (const auto& p : m.parameters()) n += static_cast<double>(p.numel());
  return n;
}

// Multiply-accumulates of the convolutions and the fc (weights only): torchvision's "GFLOPS" convention.
double macs(const isp::Backbone& b) {
  double total = 0;
  for (const auto& l : b.layer_shapes()) {
    if (l.op == isp::LayerOp::Conv)
      total += static_cast<double>(l.kernel * l.kernel * (l.in_channels / l.groups) * l.out_channels * l.out_h * l.out_w);
    else if (l.op == isp::LayerOp::Linear)
      total += static_cast<double>(l.in_channels * l.out_channels);
  }
  return total;
}

void randomise_batchnorms(torch::nn::Module& m) {
  torch::NoGradGuard ng;
  for (auto& sub : m.modules())
    if (auto* bn = sub->as<torch::nn::BatchNorm2d>()) {
      bn->running_mean.copy_(torch::randn_like(bn->running_mean) * 0.1);
      bn->running_var.copy_(torch::rand_like(bn->running_var) + 0.5);
      bn->weight.copy_(torch::rand_like(bn->weight) + 0.5);
      bn->bias.copy_(torch::randn_like(bn->bias) * 0.1);
    }
}

}  // namespace

TEST_CASE_FIXTURE(ResNetFixture, "ResNet at 224: parameters and multiply-accumulates equal torchvision's, every depth") {
  // torchvision 0.14's models at 224x224 (parameters; conv + fc multiply-accumulates, which its documentation
  // rounds to "GFLOPS" 1.81 / 3.66 / 4.09 / 7.80 / 11.51).
  struct Ref {
    int depth;
    double params, macs;
  };
  for (const Ref& r : {Ref{18, 11689512, 1814073344.0}, Ref{34, 21797672, 3663761408.0}, Ref{50, 25557032, 4089184256.0},
                       Ref{101, 44549160, 7801405440.0}, Ref{152, 60192808, 11513626624.0}}) {
    CAPTURE(r.depth);
    auto bb = build({{"depth", r.depth}});
    const isp::CostModel cost(bb->layer_shapes(), bb->gated_layers());
    CHECK(parameter_count(*bb) == r.params);
    CHECK(cost.full_params() == r.params);
    CHECK(macs(*bb) == r.macs);
    MESSAGE("ResNet-" << r.depth << ": " << cost.full_params() << " parameters, " << macs(*bb) / 1e9
                      << " GMACs (torchvision's convention), " << cost.full_flops() / 1e9
                      << " GFLOPs in the official counter's convention (BN, ReLU and pooling included)");
    CHECK(cost.full_flops() > r.macs);
    CHECK(static_cast<int>(bb->gated_layers().size()) == (r.depth >= 50 ? 2 : 1) * static_cast<int>(
        r.depth == 18 ? 8 : r.depth == 34 || r.depth == 50 ? 16 : r.depth == 101 ? 33 : 50));
  }
}

TEST_CASE_FIXTURE(ResNetFixture, "ResNet: feature scales, names as torchvision's, gates per sample, bad options") {
  auto bb = build({{"depth", 50}, {"num_classes", 7}, {"input_size", 64}});
  const auto x = torch::randn({2, 3, 64, 64});
  const auto f = bb->forward_features(x);
  REQUIRE(f.scales.size() == 4);
  const std::vector<int64_t> channels = {256, 512, 1024, 2048}, sides = {16, 8, 4, 2};
  CHECK(bb->feature_channels() == channels);
  for (std::size_t i = 0; i < 4; ++i) {
    CHECK(f.scales[i].size(1) == channels[i]);
    CHECK(f.scales[i].size(2) == sides[i]);
  }
  CHECK(f.logits.sizes() == at::IntArrayRef({2, 7}));
  const auto names = bb->named_parameters();
  for (const char* n : {"conv1.weight", "bn1.weight", "layer1.0.conv3.weight", "layer1.0.downsample.0.weight",
                        "layer1.0.downsample.1.bias", "layer4.2.bn3.weight", "fc.bias"})
    CHECK_MESSAGE(names.contains(n), n);
  CHECK(bb->named_buffers().contains("layer3.5.bn2.running_var"));
  // A zero gate on one sample changes that sample only.
  bb->eval();
  torch::NoGradGuard ng;
  const auto ref = bb->forward(x);
  at::Tensor gates = torch::ones({2, bb->total_gate_width()});
  gates[1].slice(0, 0, 32).zero_();  // part of layer1.0's first gate, second sample
  bb->set_gates(gates);
  const auto gated = bb->forward(x);
  bb->set_gates(at::Tensor());
  CHECK(torch::allclose(gated[0], ref[0]));
  CHECK((gated[1] - ref[1]).abs().max().item<double>() > 1e-4);
  CHECK(isp_test::error_of([&] { build({{"depth", 50}, {"input_size", 100}}); }).find("multiple of 32") !=
        std::string::npos);
  CHECK(isp_test::error_of([&] { build({{"depth", 18}, {"widths", {1, 2}}}); }).find("8 values") != std::string::npos);
  CHECK(isp_test::error_of([&] { build({{"depth", 26}}); }).find("/nodes/backbone/depth") != std::string::npos);
}

TEST_CASE_FIXTURE(ResNetFixture, "ResNet: channel surgery gives the gated network's logits, basic and bottleneck") {
  int seed = 0;
  for (const json& spec : {json{{"depth", 18}}, json{{"depth", 50}}, json{{"depth", 18}, {"gate_residual", true}},
                           json{{"depth", 50}, {"gate_residual", true}}, json{{"type", "MobileNetV2"}, {"width_mult", 0.75}}}) {
    CAPTURE(spec.dump());
    torch::manual_seed(++seed);
    json with_size = spec;
    with_size["num_classes"] = 10, with_size["input_size"] = 64;
    auto bb = build(with_size);
    randomise_batchnorms(*bb);
    bb->eval();
    // Keep a random ~60 % of every gated layer's channels.
    at::Tensor gates = (torch::rand({bb->total_gate_width()}) < 0.6).to(torch::kFloat);
    const auto ext = isp::extract_pruned(*bb, gates);
    at::Tensor kept_gates = torch::zeros_like(gates);
    int64_t off = 0;
    const auto gl = bb->gated_layers();
    for (std::size_t l = 0; l < gl.size(); ++l) {
      for (int64_t k : ext.kept_indices[l]) kept_gates[off + k] = 1.0;
      off += gl[l].width;
    }
    const auto x = torch::randn({3, 3, 64, 64});
    torch::NoGradGuard ng;
    bb->set_gates(kept_gates);
    const auto ref = bb->forward(x);
    bb->set_gates(at::Tensor());
    const auto got = ext.model->forward(x);
    const double d = (got - ref).abs().max().item<double>();
    MESSAGE(spec.dump() << " surgery: max |logit difference| " << d << " (logits up to "
                      << ref.abs().max().item<double>() << ")");
    CHECK(d < 1e-4 * ref.abs().max().item<double>() + 1e-5);
    const isp::CostModel full(bb->layer_shapes(), bb->gated_layers()), small(ext.model->layer_shapes(), ext.model->gated_layers());
    std::vector<int64_t> w;
    for (const auto& k : ext.kept_indices) w.push_back(static_cast<int64_t>(k.size()));
    CHECK(ext.model->widths() == w);
    CHECK(small.full_flops() == full.count(w).flops);
    CHECK(small.full_params() == parameter_count(*ext.model));
    CHECK(small.full_flops() < 0.9 * full.full_flops());
  }
}

TEST_CASE_FIXTURE(ResNetFixture, "ResNet: torchvision's models load by name and give the same logits, and back") {
  const std::string py = isp_test::python_with_torch();
  REQUIRE_MESSAGE(!py.empty(), "python3 with torch is required (scripts/setup.sh installs python3-torch)");
  // A hard requirement, not a silent pass: scripts/setup.sh installs python3-torchvision.
  REQUIRE_MESSAGE(std::system((py + " -c 'import torchvision' 2>/dev/null").c_str()) == 0,
                  "python3-torchvision is required (scripts/setup.sh installs it)");
  const auto dir = isp_test::temp_dir("torchvision_resnet");
  const std::string script = (dir / "tv.py").string();
  {
    // One Python start per direction for all three models (importing torch and torchvision takes seconds).
    std::ofstream s(script);
    s << "import sys, torch, torchvision\n"
         "mode, d = sys.argv[1], sys.argv[2]\n"
         "for name in sys.argv[3:]:\n"
         "    torch.manual_seed(0)\n"
         "    m = (torchvision.models.mobilenet_v2(num_classes=10, width_mult=0.5) if name == 'mbv2'\n"
         "         else getattr(torchvision.models, name)(num_classes=10)).eval()\n"
         "    p = d + '/' + name + '_'\n"
         "    if mode == 'make':\n"
         "        with torch.no_grad():\n"
         "            for b in m.modules():\n"
         "                if isinstance(b, torch.nn.BatchNorm2d):\n"
         "                    b.running_mean.normal_(0, 0.1); b.running_var.uniform_(0.5, 1.5)\n"
         "                    b.weight.uniform_(0.5, 1.5); b.bias.normal_(0, 0.1)\n"
         "            x = torch.randn(2, 3, 64, 64)\n"
         "            torch.save(m.state_dict(), p + 'tv.pt')\n"
         "            torch.save({'x': x, 'logits': m(x)}, p + 'io.pt')\n"
         "    else:  # isp's weights.pt into torchvision's model, strictly, with torch.load's safe unpickler\n"
         "        m.load_state_dict(torch.load(p + 'isp.pt', weights_only=True), strict=True)\n"
         "        io = torch.load(p + 'io.pt')\n"
         "        with torch.no_grad():\n"
         "            print(name, 'max |dlogit| %.3g' % (m(io['x']) - io['logits']).abs().max().item())\n";
  }
  struct Model {
    std::string name;  // torchvision's
    json spec;         // isp's backbone
  };
  const std::vector<Model> models{{"resnet18", {{"depth", 18}, {"num_classes", 10}, {"input_size", 64}}},
                                  {"resnet50", {{"depth", 50}, {"num_classes", 10}, {"input_size", 64}}},
                                  {"mbv2", {{"type", "MobileNetV2"}, {"width_mult", 0.5}, {"num_classes", 10},
                                            {"input_size", 64}}}};
  std::string names;
  for (const Model& m : models) names += " " + m.name;
  REQUIRE(std::system((py + " " + script + " make " + dir.string() + names).c_str()) == 0);
  for (const Model& m : models) {
    CAPTURE(m.name);
    auto bb = build(m.spec);
    const std::string prefix = (dir / (m.name + "_")).string();
    isp::load_state_dict_from_python(*bb, prefix + "tv.pt");
    bb->eval();
    // io.pt is read back through the same loader: a module with buffers named x and logits.
    struct Io : torch::nn::Module {
      at::Tensor x = register_buffer("x", torch::zeros({2, 3, 64, 64}));
      at::Tensor logits = register_buffer("logits", torch::zeros({2, 10}));
    } io;
    isp::load_state_dict_from_python(io, prefix + "io.pt");
    torch::NoGradGuard ng;
    const double d = (bb->forward(io.x) - io.logits).abs().max().item<double>();
    MESSAGE("torchvision " << m.name << " loaded into isp's backbone: max |dlogit| " << d << " (logits up to "
                                  << io.logits.abs().max().item<double>() << ")");
    CHECK(d < 1e-4 * io.logits.abs().max().item<double>() + 1e-5);
    isp::save_state_dict_for_python(*bb, prefix + "isp.pt");
  }
  // And back: each isp.pt loads strictly into torchvision's model (a missing or misshapen tensor fails the start).
  CHECK(std::system((py + " " + script + " back " + dir.string() + names).c_str()) == 0);
  std::filesystem::remove_all(dir);
}

TEST_CASE_FIXTURE(ResNetFixture, "MobileNetV2 at 224: parameters and multiply-accumulates equal torchvision's, every width") {
  // torchvision 0.14's mobilenet_v2(width_mult=w) at 224x224 (its documentation: 3,504,872 parameters, 0.30 GFLOPS).
  struct Ref {
    double width, params, macs;
  };
  for (const Ref& r : {Ref{1.0, 3504872, 300774272.0}, Ref{0.5, 1968680, 97131840.0}, Ref{0.75, 2636424, 209069792.0},
                       Ref{1.4, 6108776, 582195824.0}}) {
    CAPTURE(r.width);
    auto bb = build({{"type", "MobileNetV2"}, {"width_mult", r.width}});
    const isp::CostModel cost(bb->layer_shapes(), bb->gated_layers());
    CHECK(parameter_count(*bb) == r.params);
    CHECK(cost.full_params() == r.params);
    CHECK(macs(*bb) == r.macs);
    CHECK(bb->gated_layers().size() == 16);
    MESSAGE("MobileNetV2 x" << r.width << ": " << cost.full_params() << " parameters, " << macs(*bb) / 1e6
                           << " M MACs, " << cost.full_flops() / 1e6 << " M FLOPs (official counter's convention)");
  }
  auto bb = build({{"type", "MobileNetV2"}, {"input_size", 64}, {"num_classes", 5}});
  const auto f = bb->forward_features(torch::randn({2, 3, 64, 64}));
  const std::vector<int64_t> channels = {24, 32, 96, 1280}, sides = {16, 8, 4, 2};
  CHECK(bb->feature_channels() == channels);
  REQUIRE(f.scales.size() == 4);
  for (std::size_t i = 0; i < 4; ++i) {
    CHECK(f.scales[i].size(1) == channels[i]);
    CHECK(f.scales[i].size(2) == sides[i]);
  }
  const auto names = bb->named_parameters();
  for (const char* n : {"features.0.0.weight", "features.1.conv.0.0.weight", "features.1.conv.1.weight",
                        "features.2.conv.1.0.weight", "features.2.conv.3.bias", "features.18.1.weight", "classifier.1.weight"})
    CHECK_MESSAGE(names.contains(n), n);
}

TEST_CASE_FIXTURE(ResNetFixture, "ResNet gate_residual: one more gate per stage on the residual stream, cut everywhere it flows") {
  auto plain = build({{"depth", 18}, {"input_size", 64}});
  auto gated = build({{"depth", 18}, {"input_size", 64}, {"gate_residual", true}});
  CHECK(gated->gated_layers().size() == plain->gated_layers().size() + 4);
  CHECK(gated->gated_layers()[0].width == 64);  // stage 1's stream, the stem's output channels too
  CHECK(gated->gated_layers()[3].width == 512);
  CHECK(parameter_count(*gated) == parameter_count(*plain));
  // Pruned streams rebuild with the stem and every block's output at the stream's width.
  std::vector<int64_t> w = gated->widths();
  w[0] = 40, w[1] = 100, w[2] = 200, w[3] = 300;
  auto small = gated->with_widths(w);
  const auto names = small->named_parameters();
  CHECK(names["conv1.weight"].size(0) == 40);
  CHECK(names["layer1.1.conv2.weight"].size(0) == 40);
  CHECK(names["layer2.0.downsample.0.weight"].sizes() == at::IntArrayRef({100, 40, 1, 1}));
  CHECK(names["fc.weight"].size(1) == 300);
  CHECK(small->forward(torch::randn({1, 3, 64, 64})).size(1) == 1000);
  auto bottleneck = build({{"depth", 50}, {"input_size", 64}, {"gate_residual", true}});
  CHECK(bottleneck->gated_layers()[0].width == 256);
  CHECK(bottleneck->named_parameters()["conv1.weight"].size(0) == 64);  // the stem is outside: stage 1 projects
  CHECK(isp_test::error_of([&] { build({{"depth", 18}, {"gate_residual", true}, {"widths", std::vector<int64_t>(8, 4)}}); })
            .find("12 values") != std::string::npos);
}
