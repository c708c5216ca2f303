// Classifier evaluation and training (SGD schedules), adaptive BatchNorm, and small training utilities.
#include <torch/torch.h>

#include <unistd.h>

#include <chrono>
#include <cmath>
#include <cstdio>
#include <cstdlib>
#include <filesystem>
#include <limits>
#include <sstream>

#include "isp/accel.h"
#include "isp/interfaces/backbone.h"
#include "isp/checkpoint.h"
#include "isp/optim.h"
#include "isp/data.h"
#include "isp/distributed.h"
#include "isp/registry/recipe.h"
#include "isp/train.h"

namespace isp {

// ------------------------------------------------------------------------------------------ training loop

double lr_at_epoch(const SgdScheduleOptions& o, int64_t epoch) {
  double lr = o.lr;
  if (o.warmup_epochs > 0 && epoch < o.warmup_epochs) return o.lr * static_cast<double>(epoch + 1) / o.warmup_epochs;
  if (o.lr_schedule == "multistep") {
    for (auto m : o.milestones)
      if (epoch >= m) lr *= o.gamma;
  } else if (o.lr_schedule == "cosine") {
    double t = static_cast<double>(epoch - o.warmup_epochs) / std::max<int64_t>(1, o.epochs - o.warmup_epochs);
    lr = 0.5 * o.lr * (1.0 + std::cos(M_PI * t));
  }
  return lr;
}

EvalResult evaluate_classifier(const Classifier& c, const ImageSplit& split, int64_t batch_size, c10::Device device) {
  EvalResult r;
  if (split.size() == 0) return r;
  torch::NoGradGuard ng;
  bool was_training = c.module->is_training();
  c.module->eval();
  // Data-parallel: each rank evaluates its contiguous share of the split; the sums are added over the ranks.
  BatchLoader loader(rank_share(split), batch_size, false, Augmentation{}, device);
  loader.start_epoch(0, 0);
  at::Tensor correct = torch::zeros({}, torch::TensorOptions().dtype(torch::kLong).device(device));
  at::Tensor loss = torch::zeros({}, torch::TensorOptions().dtype(torch::kDouble).device(device));
  for (int64_t i = 0; i < loader.num_batches(); ++i) {
    Batch b = loader.get(i);
    at::Tensor x = b.x.to(device), y = b.y.to(device);
    at::Tensor logits = c.forward(x);
    correct += logits.argmax(1).eq(y).sum();
    loss += torch::nn::functional::cross_entropy(logits, y, torch::nn::functional::CrossEntropyFuncOptions().reduction(torch::kSum)).to(torch::kDouble);
  }
  at::Tensor sums = torch::stack({correct.to(torch::kDouble), loss});
  dist::allreduce_sum(sums, "evaluation sums");
  r.n = split.size();
  r.top1 = sums[0].item<double>() / static_cast<double>(r.n);
  r.loss = sums[1].item<double>() / static_cast<double>(r.n);
  c.module->train(was_training);
  return r;
}

at::Tensor kl_per_sample(const at::Tensor& target_logits, const at::Tensor& logits) {
  at::Tensor lq = torch::log_softmax(target_logits, 1), lp = torch::log_softmax(logits, 1);
  return (lq.exp() * (lq - lp)).sum(1);
}

Augmentation augmentation_by_name(const std::string& mode, const DataBundle& data) {
  if (mode == "dataset") return data.augmentation;
  Augmentation a;
  a.pad_value = data.augmentation.pad_value;
  a.horizontal_flip = mode == "flip";
  return a;
}

void recalibrate_batchnorm(const Classifier& c, const ImageSplit& split, int64_t images, int64_t batch_size,
                           c10::Device device) {
  torch::nn::Module& model = *c.module;
  std::vector<std::pair<torch::nn::BatchNorm2dImpl*, c10::optional<double>>> bns;
  for (const auto& m : model.modules(/*include_self=*/true))
    if (auto* bn = m->as<torch::nn::BatchNorm2d>(); bn && bn->options.track_running_stats()) {
      bns.emplace_back(bn, bn->options.momentum());
      bn->reset_running_stats();
      bn->options.momentum(c10::nullopt);  // cumulative average over the batches seen
    }
  const int64_t n = std::min<int64_t>(images, split.size());
  if (!bns.empty() && n > 0) {
    torch::NoGradGuard ng;
    model.train();
    ImageSplit sub{split.images.narrow(0, 0, n), split.labels.narrow(0, 0, n)};
    BatchLoader loader(sub, batch_size, /*shuffle=*/false, Augmentation{}, device);
    loader.start_epoch(0, 0);
    for (int64_t i = 0; i < loader.num_batches(); ++i) c.forward(loader.get(i).x.to(device));
  }
  for (auto& [bn, momentum] : bns) bn->options.momentum(momentum);
  model.eval();
}

CpuRngGuard::CpuRngGuard() : state_(at::detail::getDefaultCPUGenerator().get_state()) {}
CpuRngGuard::~CpuRngGuard() { at::Generator(at::detail::getDefaultCPUGenerator()).set_state(state_); }

json fit_classifier(const Classifier& c, const DataBundle& data, const SgdScheduleOptions& opt, RunContext& ctx) {
  torch::nn::Module& model = *c.module;
  model.to(ctx.device);
  apply_memory_format(model, ctx.speed);
  FlatSgd sgd(model.parameters(), FlatSgdOptions{opt.lr, opt.momentum, opt.weight_decay, opt.nesterov});
  BatchLoader train(data.train, opt.batch_size, /*shuffle=*/true, data.augmentation, ctx.device);
  const bool has_val = data.val.size() > 0;

  TrainLoopSpec spec;
  spec.epochs = opt.epochs;
  spec.eval_every = opt.eval_every;
  spec.max_steps_per_epoch = opt.max_steps_per_epoch;
  spec.metrics = {"loss", "top1"};
  TrainLoopHooks hooks;
  hooks.start_epoch = [&](int64_t epoch) {
    const double lr = lr_at_epoch(opt, epoch);
    sgd.set_lr(lr);  // a device tensor: a captured step reads the new value
    model.train();
    return json{{"lr", lr}};
  };
  TrainStep step(ctx, [&](const Batch& b) {
    sgd.zero_grad();
    at::Tensor logits = c.forward(b.x);
    at::Tensor loss = torch::nn::functional::cross_entropy(logits, b.y);
    loss.backward();
    sgd.step();
    return torch::stack({loss.detach().to(torch::kDouble), logits.detach().argmax(1).eq(b.y).to(torch::kDouble).mean()});
  });
  hooks.step = [&](const Batch& b) { return step(b); };
  hooks.checkpoint(model, sgd);
  if (has_val) {
    hooks.evaluate = [&](int64_t) {
      EvalResult v = evaluate_classifier(c, data.val, opt.eval_batch_size, ctx.device);
      return json{{"val_top1", v.top1}, {"val_loss", v.loss}};
    };
    hooks.score = [](const json& line, int64_t) { return line["val_top1"].get<double>(); };
  }
  TrainLoopResult res;  // epochs 0: the network as it came (pretrained weights), evaluated only
  if (opt.epochs > 0) res = run_train_loop(spec, hooks, train, ctx);

  // Model selection on the validation split, never on the test split.
  if (has_val && res.best_epoch > 0) CheckpointReader(res.best_path).module("model", model);
  // The selected epoch's validation figures are those of the weights just loaded: taken from its line.
  EvalResult val;
  if (has_val && res.best_epoch > 0 && res.best_line.contains("val_top1"))
    val = {res.best_line["val_top1"].get<double>(), res.best_line["val_loss"].get<double>(), data.val.size()};
  else if (has_val)
    val = evaluate_classifier(c, data.val, opt.eval_batch_size, ctx.device);
  EvalResult test = evaluate_classifier(c, data.test, opt.eval_batch_size, ctx.device);
  {
    CheckpointWriter w;
    w.module("model", model);
    w.meta({{"val_top1", val.top1}, {"test_top1", test.top1}, {"recipe", ctx.resolved_recipe}});
    w.save_atomic(ctx.stage_dir + "/final.pt");
  }
  json summary = {{"test_top1", test.top1},         {"test_loss", test.loss},
                  {"val_top1", has_val ? json(val.top1) : json(nullptr)},
                  {"best_epoch", has_val && opt.epochs > 0 ? json(res.best_epoch) : json(opt.epochs)},
                  {"selected_on", opt.epochs == 0 ? "not_trained" : has_val ? "val_top1" : "last_epoch"},
                  {"epochs", opt.epochs},
                  {"train_seconds", res.train_seconds},
                  {"train_images_per_s", static_cast<double>(res.images_seen) / std::max(1e-9, res.train_seconds)},
                  {"n_train", data.train.size()}, {"n_val", data.val.size()}, {"n_test", data.test.size()}};
  std::fprintf(stderr, "[%s] selected epoch %s: val %.2f%%, test %.2f%%\n", ctx.stage_name.c_str(),
               summary["best_epoch"].dump().c_str(), 100.0 * val.top1, 100.0 * test.top1);
  return summary;
}

FrozenParameters::FrozenParameters(torch::nn::Module& m) {
  for (auto& p : m.parameters()) {
    params_.push_back(p);
    flags_.push_back(p.requires_grad());
    p.set_requires_grad(false);
  }
  keep_batchnorm_folds(this, m);
}

FrozenParameters::~FrozenParameters() {
  drop_batchnorm_folds(this);
  for (std::size_t i = 0; i < params_.size(); ++i) params_[i].set_requires_grad(flags_[i]);
}

}  // namespace isp
