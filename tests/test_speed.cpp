// The speed path on the CPU: flat optimizers against torch.optim, their checkpoints and parameter links,
// the runtime speed settings, TrainStep, and the loader's gather path against its CPU path.
#include "test_support.h"

#include <torch/torch.h>

#include "isp/accel.h"
#include "isp/checkpoint.h"
#include "isp/data.h"
#include "isp/optim.h"
#include "isp/registry/recipe.h"
#include "isp/runner.h"

using isp::json;
using isp_test::error_of;

namespace {

struct Net : torch::nn::Module {
  Net() {
    // No conv bias before BatchNorm: its true gradient is zero, and Adam turns the rounding noise of such a
    // gradient into full-size steps of either sign (no two implementations would agree on it).
    conv = register_module("conv", torch::nn::Conv2d(torch::nn::Conv2dOptions(3, 8, 3).padding(1).bias(false)));
    bn = register_module("bn", torch::nn::BatchNorm2d(8));
    fc = register_module("fc", torch::nn::Linear(8, 4));
  }
  at::Tensor forward(const at::Tensor& x) {
    return fc->forward(torch::relu(bn->forward(conv->forward(x))).mean({2, 3}));
  }
  torch::nn::Conv2d conv{nullptr};
  torch::nn::BatchNorm2d bn{nullptr};
  torch::nn::Linear fc{nullptr};
};

// Two identical networks from one seed.
std::pair<std::shared_ptr<Net>, std::shared_ptr<Net>> twins() {
  torch::manual_seed(11);
  auto a = std::make_shared<Net>();
  auto b = std::make_shared<Net>();
  torch::NoGradGuard ng;
  for (std::size_t i = 0; i < a->parameters().size(); ++i) b->parameters()[i].copy_(a->parameters()[i]);
  return {a, b};
}

double max_rel_diff(torch::nn::Module& a, torch::nn::Module& b) {
  double worst = 0;
  auto pa = a.parameters(), pb = b.parameters();
  for (std::size_t i = 0; i < pa.size(); ++i)
    worst = std::max(worst, ((pa[i] - pb[i]).abs().max() / pa[i].abs().max().clamp_min(1e-12)).item<double>());
  return worst;
}

template <class Step>
void train(Net& net, Step step, int steps, uint64_t seed) {
  torch::manual_seed(seed);
  for (int s = 0; s < steps; ++s) {
    at::Tensor x = torch::randn({6, 3, 5, 5}), y = torch::randint(0, 4, {6});
    at::Tensor loss = torch::nn::functional::cross_entropy(net.forward(x), y);
    step(loss);
  }
}

}  // namespace

TEST_CASE("speed: FlatSgd, FlatAdam and AdamW follow torch.optim step for step") {
  for (int variant = 0; variant < 4; ++variant) {
    CAPTURE(variant);
    auto [a, b] = twins();
    std::unique_ptr<isp::FlatOptimizer> flat;
    std::unique_ptr<torch::optim::Optimizer> ref;
    if (variant == 0 || variant == 1) {
      const bool nesterov = variant == 1;
      flat = std::make_unique<isp::FlatSgd>(a->parameters(), isp::FlatSgdOptions{0.05, 0.9, 5e-4, nesterov});
      ref = std::make_unique<torch::optim::SGD>(
          b->parameters(), torch::optim::SGDOptions(0.05).momentum(0.9).weight_decay(5e-4).nesterov(nesterov));
    } else if (variant == 2) {
      flat = std::make_unique<isp::FlatAdam>(a->parameters(), isp::FlatAdamOptions{1e-2, 0.9, 0.999, 1e-8, 1e-4, false});
      ref = std::make_unique<torch::optim::Adam>(b->parameters(),
                                                 torch::optim::AdamOptions(1e-2).weight_decay(1e-4));
    } else {
      flat = std::make_unique<isp::FlatAdam>(a->parameters(), isp::FlatAdamOptions{1e-2, 0.9, 0.999, 1e-8, 1e-2, true});
      ref = std::make_unique<torch::optim::AdamW>(b->parameters(),
                                                  torch::optim::AdamWOptions(1e-2).weight_decay(1e-2));
    }
    train(*a, [&](const at::Tensor& l) { flat->zero_grad(); l.backward(); flat->step(); }, 25, 5);
    train(*b, [&](const at::Tensor& l) { ref->zero_grad(); l.backward(); ref->step(); }, 25, 5);
    // Same arithmetic, different association of a few float products: agreement to float rounding.
    CHECK(max_rel_diff(*a, *b) < 2e-5);
    // The weights moved (the comparison is not between two untouched copies).
    auto [c, d] = twins();
    CHECK(max_rel_diff(*a, *c) > 1e-3);
  }
}

TEST_CASE("speed: every parameter view of a flat optimizer starts 256-byte aligned") {
  // cuDNN's NHWC kernels fault on misaligned weights ("misaligned address", seen on an H100 with the odd
  // channel counts of a pruned network).
  struct Odd : torch::nn::Module {
    Odd() {
      a = register_parameter("a", torch::randn({7, 3, 3, 3}));
      b = register_parameter("b", torch::randn({13}));
      c = register_parameter("c", torch::randn({5, 7, 1, 1}));
    }
    at::Tensor a, b, c;
  } odd;
  isp::FlatAdam opt(odd.parameters(), isp::FlatAdamOptions{});
  // Relative to the buffer's start, which has the allocator's own alignment (512 bytes on CUDA, 64 on the CPU).
  const auto base = reinterpret_cast<std::uintptr_t>(odd.a.data_ptr());
  const auto gbase = reinterpret_cast<std::uintptr_t>(odd.a.grad().data_ptr());
  CHECK(base % 64 == 0);
  for (const auto& p : odd.parameters()) {
    CHECK((reinterpret_cast<std::uintptr_t>(p.data_ptr()) - base) % 256 == 0);
    CHECK((reinterpret_cast<std::uintptr_t>(p.grad().data_ptr()) - gbase) % 256 == 0);
  }
  // Each one padded to 64 floats: 189 -> 192, 13 -> 64, 35 -> 64.
  CHECK(opt.numel() == 320);
  // The gaps do not disturb the update: a parameter without gradient stays put, the other one moves.
  const at::Tensor a0 = odd.a.detach().clone(), b0 = odd.b.detach().clone();
  opt.zero_grad();
  odd.a.sum().backward();
  opt.step();
  CHECK(torch::equal(odd.b, b0));
  CHECK(!torch::equal(odd.a, a0));
}

TEST_CASE("speed: a flat optimizer changes its learning rate without rebuilding, and a zero LR freezes weights") {
  auto [a, b] = twins();
  isp::FlatSgd sgd(a->parameters(), isp::FlatSgdOptions{0.1, 0.0, 0.0, false});
  sgd.set_lr(0.0);
  train(*a, [&](const at::Tensor& l) { sgd.zero_grad(); l.backward(); sgd.step(); }, 3, 1);
  CHECK(max_rel_diff(*a, *b) == 0.0);
  sgd.set_lr(0.1);
  CHECK(sgd.lr() == doctest::Approx(0.1));
  train(*a, [&](const at::Tensor& l) { sgd.zero_grad(); l.backward(); sgd.step(); }, 3, 1);
  CHECK(max_rel_diff(*a, *b) > 1e-4);
}

TEST_CASE("speed: flat optimizer state survives a checkpoint, and reloaded weights are linked back") {
  const auto dir = isp_test::temp_dir("flat_ckpt");
  auto [a, b] = twins();
  isp::FlatAdam opt_a(a->parameters(), isp::FlatAdamOptions{1e-2, 0.9, 0.999, 1e-8, 0.0, false});
  auto step_a = [&](const at::Tensor& l) { opt_a.zero_grad(); l.backward(); opt_a.step(); };
  train(*a, step_a, 5, 1);
  {
    isp::CheckpointWriter w;
    w.module("model", *a);
    w.optimizer("optimizer", opt_a);
    w.save_atomic((dir / "c.pt").string());
  }
  train(*a, step_a, 5, 2);  // the uninterrupted run

  isp::FlatAdam opt_b(b->parameters(), isp::FlatAdamOptions{1e-2, 0.9, 0.999, 1e-8, 0.0, false});
  {
    isp::CheckpointReader r((dir / "c.pt").string());
    r.module("model", *b);  // copies into the parameters' storage (views of the optimizer's buffer) ...
    opt_b.relink();         // ... so relink, needed after code that replaces storage, changes nothing here
    r.optimizer("optimizer", opt_b);
  }
  train(*b, [&](const at::Tensor& l) { opt_b.zero_grad(); l.backward(); opt_b.step(); }, 5, 2);
  CHECK(max_rel_diff(*a, *b) == 0.0);  // bit-identical continuation

  // A checkpoint of another optimizer type names what is missing.
  isp::FlatSgd sgd(b->parameters(), isp::FlatSgdOptions{});
  const std::string e = error_of([&] { isp::CheckpointReader((dir / "c.pt").string()).optimizer("optimizer", sgd); });
  CHECK(e.find("optimizer.momentum_buffer") != std::string::npos);
  CHECK(e.find("c.pt") != std::string::npos);
}

TEST_CASE("speed: channels_last layout is kept by the flat optimizer and given to TrainStep's input") {
  auto [a, b] = twins();
  isp::SpeedSettings speed;
  speed.channels_last = true;
  isp::apply_memory_format(*a, speed);
  CHECK(a->conv->weight.is_contiguous(at::MemoryFormat::ChannelsLast));
  isp::FlatSgd sgd(a->parameters(), isp::FlatSgdOptions{0.05, 0.9, 0.0, false});
  CHECK(a->conv->weight.is_contiguous(at::MemoryFormat::ChannelsLast));
  CHECK(a->conv->weight.grad().is_contiguous(at::MemoryFormat::ChannelsLast));
  isp::RunContext ctx;
  ctx.speed = speed;
  bool saw_nhwc = false;
  isp::TrainStep step(ctx, [&](const isp::Batch& batch) {
    saw_nhwc = batch.x.is_contiguous(at::MemoryFormat::ChannelsLast);
    sgd.zero_grad();
    at::Tensor loss = torch::nn::functional::cross_entropy(a->forward(batch.x), batch.y);
    loss.backward();
    sgd.step();
    return loss.detach().reshape({1});
  });
  torch::manual_seed(3);
  isp::Batch batch{torch::randn({6, 3, 5, 5}), torch::randint(0, 4, {6}), torch::arange(6)};
  at::Tensor m = step(batch);
  CHECK(saw_nhwc);
  CHECK(!step.captured());  // no CUDA graphs on the CPU
  CHECK(m.numel() == 1);
  // The same step in NCHW on the twin gives the same weights to float rounding.
  isp::FlatSgd sgd_b(b->parameters(), isp::FlatSgdOptions{0.05, 0.9, 0.0, false});
  sgd_b.zero_grad();
  torch::nn::functional::cross_entropy(b->forward(batch.x), batch.y).backward();
  sgd_b.step();
  CHECK(max_rel_diff(*a, *b) < 1e-5);
}

TEST_CASE("speed: bf16 on the CPU runs the step's convolutions in bfloat16, weights and updates stay fp32") {
  if (!isp::cpu_has_native_bf16()) {
    MESSAGE("skipped: this CPU has neither AVX512-BF16 nor AMX (runtime.precision bf16 is refused here)");
    return;
  }
  auto [a, b] = twins();
  isp::FlatSgd sgd(a->parameters(), isp::FlatSgdOptions{0.05, 0.9, 0.0, false});
  isp::RunContext ctx;
  ctx.speed.bf16 = true;
  at::ScalarType inside = at::kFloat;
  isp::TrainStep step(ctx, [&](const isp::Batch& batch) {
    at::Tensor logits = a->forward(batch.x);
    inside = logits.scalar_type();
    sgd.zero_grad();
    at::Tensor loss = torch::nn::functional::cross_entropy(logits, batch.y);
    loss.backward();
    sgd.step();
    return loss.detach().reshape({1});
  });
  torch::manual_seed(3);
  isp::Batch batch{torch::randn({6, 3, 5, 5}), torch::randint(0, 4, {6}), torch::arange(6)};
  const at::Tensor before = a->conv->weight.detach().clone();
  step(batch);
  // (dtype names compared: doctest cannot print a ScalarType)
  CHECK(std::string(c10::toString(inside)) == "BFloat16");  // autocast was on inside the step ...
  CHECK(std::string(c10::toString(a->forward(batch.x).scalar_type())) == "Float");  // ... and is off after it
  CHECK(std::string(c10::toString(a->conv->weight.scalar_type())) == "Float");
  CHECK(!torch::equal(a->conv->weight, before));         // the fp32 weights were updated
}

TEST_CASE("speed: runtime settings are checked and resolve for the CPU") {
  auto runtime_of = [](const json& rt) {
    return isp::apply_runtime(isp::recipe_from_json(json{{"runtime", rt}, {"nodes", json::object()}, {"stages", json::array()}},
                                                    "speed.json", "."));
  };
  const isp::Runtime r = runtime_of({{"device", "cpu"}, {"threads", 2}});
  CHECK(!r.speed.cuda_graphs);
  CHECK(!r.speed.channels_last);
  CHECK(!r.speed.bf16);
  CHECK(!runtime_of({{"device", "cpu"}, {"precision", "auto"}}).speed.bf16);  // bf16 autocast only on CUDA
  CHECK(!runtime_of({{"device", "cpu"}, {"precision", "fp32"}}).speed.bf16);
  CHECK(runtime_of({{"device", "cpu"}, {"threads", 2}, {"channels_last", true}}).speed.channels_last);
  // "auto" (the default) on the CPU: NHWC only for networks with grouped (depthwise) convolutions.
  CHECK(r.speed.channels_last_if_grouped);
  CHECK(runtime_of({{"device", "cpu"}, {"channels_last", "auto"}}).speed.channels_last_if_grouped);
  CHECK(!runtime_of({{"device", "cpu"}, {"channels_last", false}}).speed.channels_last_if_grouped);
  {
    torch::nn::Sequential plain(torch::nn::Conv2d(torch::nn::Conv2dOptions(3, 8, 3).padding(1)), torch::nn::ReLU(),
                                torch::nn::Conv2d(torch::nn::Conv2dOptions(8, 8, 1)));
    torch::nn::Sequential depthwise(torch::nn::Conv2d(torch::nn::Conv2dOptions(3, 8, 3).padding(1)),
                                    torch::nn::Conv2d(torch::nn::Conv2dOptions(8, 8, 3).padding(1).groups(8)));
    CHECK(!isp::uses_channels_last(*plain, r.speed));
    CHECK(isp::uses_channels_last(*depthwise, r.speed));
    isp::apply_memory_format(*plain, r.speed);
    isp::apply_memory_format(*depthwise, r.speed);
    auto weight = [](torch::nn::Sequential& s, std::size_t i) { return s[i]->as<torch::nn::Conv2d>()->weight; };
    CHECK(!weight(plain, 0).is_contiguous(at::MemoryFormat::ChannelsLast));
    CHECK(weight(depthwise, 0).is_contiguous(at::MemoryFormat::ChannelsLast));
    CHECK(!weight(depthwise, 0).is_contiguous());
    // NCHW inputs: the first NHWC convolution hands NHWC on, so the depthwise layer runs on oneDNN's NHWC path,
    // with the same outputs as the NCHW network to float rounding.
    torch::manual_seed(5);
    const at::Tensor x = torch::randn({2, 3, 6, 6});
    const at::Tensor y = depthwise->forward(x);
    CHECK(y.is_contiguous(at::MemoryFormat::ChannelsLast));
    at::Tensor ref = x;
    for (std::size_t i = 0; i < 2; ++i) {
      auto* c = depthwise[i]->as<torch::nn::Conv2d>();
      ref = at::conv2d(ref, c->weight.contiguous(), c->bias, 1, 1, 1, c->options.groups());
    }
    CHECK((y - ref).abs().max().item<float>() < 1e-5);
    isp::SpeedSettings off;
    CHECK(!isp::uses_channels_last(*depthwise, off));
  }
  CHECK(!runtime_of({{"device", "cpu"}, {"threads", 2}, {"cuda_graphs", "auto"}}).speed.cuda_graphs);
  std::string e = error_of([&] { runtime_of({{"device", "cpu"}, {"cuda_graphs", true}}); });
  CHECK(e.find("speed.json: /runtime/cuda_graphs") != std::string::npos);
  CHECK(e.find("device is cpu") != std::string::npos);
  // bf16 on the CPU: where the CPU computes bfloat16 natively it is granted, elsewhere refused by name.
  // With bf16, "auto" gives NHWC on the CPU (oneDNN's NHWC bfloat16 kernels); false still forces NCHW.
  if (isp::cpu_has_native_bf16()) {
    const isp::Runtime b = runtime_of({{"device", "cpu"}, {"threads", 2}, {"precision", "bf16"}});
    CHECK(b.speed.bf16);
    CHECK(b.speed.channels_last);
    CHECK(!b.speed.channels_last_if_grouped);
    CHECK(!runtime_of({{"device", "cpu"}, {"precision", "bf16"}, {"channels_last", false}}).speed.channels_last);
  } else {
    e = error_of([&] { runtime_of({{"device", "cpu"}, {"precision", "bf16"}}); });
    CHECK(e.find("speed.json: /runtime/precision: bf16 autocast on the CPU needs AVX512-BF16 or AMX") != std::string::npos);
    CHECK(e.find("\"bf16_if_native\" for bf16 only where it is native") != std::string::npos);
  }
  // "bf16_if_native" is never refused: bf16 (and with it NHWC) exactly where the CPU computes bfloat16 natively,
  // otherwise the fp32 defaults.
  {
    const isp::Runtime n = runtime_of({{"device", "cpu"}, {"threads", 2}, {"precision", "bf16_if_native"}});
    CHECK(n.speed.bf16 == isp::cpu_has_native_bf16());
    CHECK(n.speed.channels_last == isp::cpu_has_native_bf16());
    CHECK(n.speed.channels_last_if_grouped == !isp::cpu_has_native_bf16());
  }
  e = error_of([&] { runtime_of({{"device", "cpu"}, {"precision", "fp16"}}); });
  CHECK(e.find("expected \"fp32\", \"bf16\", \"bf16_if_native\" or \"auto\", got \"fp16\"") != std::string::npos);
  e = error_of([&] { runtime_of({{"device", "cpu"}, {"channels_last", 1}}); });
  CHECK(e.find("/runtime/channels_last: expected true, false or \"auto\", got 1") != std::string::npos);
  e = error_of([&] { runtime_of({{"device", "cpu"}, {"graphs", true}}); });
  CHECK(e.find("unknown runtime setting") != std::string::npos);
  CHECK(e.find("cuda_graphs") != std::string::npos);
  at::set_num_threads(2);
}

TEST_CASE("speed: the loader's gather path (accelerators) gives exactly the CPU path's batches") {
  torch::manual_seed(4);
  isp::ImageSplit split{torch::randn({37, 3, 8, 8}), torch::randint(0, 5, {37})};
  isp::Augmentation aug;
  aug.crop_padding = 2;
  aug.horizontal_flip = true;
  aug.pad_value = {-1.0, 0.5, 2.0};
  for (bool augment : {false, true}) {
    CAPTURE(augment);
    isp::BatchLoader cpu(split, 8, true, augment ? aug : isp::Augmentation{}, c10::Device(c10::kCPU));
    isp::BatchLoader gather(split, 8, true, augment ? aug : isp::Augmentation{}, c10::Device(c10::kCPU));
    gather.use_gather_path();
    for (int64_t epoch = 0; epoch < 3; ++epoch) {
      cpu.start_epoch(9, epoch);
      gather.start_epoch(9, epoch);
      REQUIRE(cpu.num_batches() == 5);
      for (int64_t i = 0; i < cpu.num_batches(); ++i) {
        isp::Batch p = cpu.get(i), q = gather.get(i);
        CHECK(torch::equal(p.index, q.index));
        CHECK(torch::equal(p.y, q.y));
        CHECK(torch::equal(p.x, q.x));
      }
    }
  }
}
