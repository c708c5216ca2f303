// Checkpoints, evaluation, the supervised training loop and the progress line.
#include <torch/torch.h>

#include <unistd.h>

#include <chrono>
#include <cmath>
#include <cstdio>
#include <cstdlib>
#include <filesystem>
#include <limits>
#include <sstream>

#include "isp/checkpoint.h"
#include "isp/data.h"
#include "isp/recipe.h"
#include "isp/train.h"
#include "isp/interfaces/backbone.h"
#include "isp/registry.h"

namespace fs = std::filesystem;

namespace isp {

// ------------------------------------------------------------------------------------------- checkpoints

struct CheckpointWriter::Impl {
  torch::serialize::OutputArchive archive;
  json meta = json::object();
  std::vector<std::string> entries;
};
CheckpointWriter::CheckpointWriter() : impl_(std::make_unique<Impl>()) {}
CheckpointWriter::~CheckpointWriter() = default;

void CheckpointWriter::module(const std::string& name, const torch::nn::Module& m) {
  torch::serialize::OutputArchive sub;
  m.save(sub);
  impl_->archive.write(name, sub);
  impl_->entries.push_back(name);
}
void CheckpointWriter::optimizer(const std::string& name, const torch::optim::Optimizer& o) {
  torch::serialize::OutputArchive sub;
  o.save(sub);
  impl_->archive.write(name, sub);
  impl_->entries.push_back(name);
}
void CheckpointWriter::tensor(const std::string& name, const at::Tensor& t) {
  impl_->archive.write(name, t.detach().cpu());
  impl_->entries.push_back(name);
}
void CheckpointWriter::meta(const json& j) { impl_->meta = j; }
void CheckpointWriter::save_atomic(const std::string& path) {
  json m = impl_->meta;
  m["_entries"] = impl_->entries;
  impl_->archive.write("meta", c10::IValue(m.dump()));
  std::ostringstream os;
  impl_->archive.save_to(os);
  write_file_atomic(path, os.str());
}

struct CheckpointReader::Impl {
  std::string path;
  torch::serialize::InputArchive archive;
  json meta;
  std::vector<std::string> entries;
};
CheckpointReader::CheckpointReader(const std::string& path) : impl_(std::make_unique<Impl>()) {
  impl_->path = path;
  if (!fs::exists(path)) throw Error(path + ": checkpoint not found");
  try {
    impl_->archive.load_from(path);
    c10::IValue v;
    impl_->archive.read("meta", v);
    impl_->meta = json::parse(v.toStringRef());
  } catch (const std::exception& e) {
    throw Error(path + ": not a readable isp checkpoint (" + std::string(e.what()).substr(0, 200) + ")");
  }
  impl_->entries = impl_->meta.value("_entries", std::vector<std::string>{});
}
CheckpointReader::~CheckpointReader() = default;
bool CheckpointReader::has(const std::string& name) const {
  return std::find(impl_->entries.begin(), impl_->entries.end(), name) != impl_->entries.end();
}
void CheckpointReader::module(const std::string& name, torch::nn::Module& m) {
  if (!has(name)) throw Error(impl_->path + ": checkpoint has no module '" + name + "'");
  torch::serialize::InputArchive sub;
  impl_->archive.read(name, sub);
  try {
    m.load(sub);
  } catch (const std::exception& e) {
    throw Error(impl_->path + ": module '" + name + "' does not match the recipe's architecture (" +
                std::string(e.what()).substr(0, 300) + ")");
  }
}
void CheckpointReader::optimizer(const std::string& name, torch::optim::Optimizer& o) {
  if (!has(name)) throw Error(impl_->path + ": checkpoint has no optimizer '" + name + "'");
  torch::serialize::InputArchive sub;
  impl_->archive.read(name, sub);
  o.load(sub);
}
at::Tensor CheckpointReader::tensor(const std::string& name) {
  if (!has(name)) throw Error(impl_->path + ": checkpoint has no tensor '" + name + "'");
  at::Tensor t;
  impl_->archive.read(name, t);
  return t;
}
const json& CheckpointReader::meta() const { return impl_->meta; }

void save_state_dict_for_python(const torch::nn::Module& m, const std::string& path) {
  c10::Dict<std::string, at::Tensor> dict;
  for (const auto& p : m.named_parameters()) dict.insert(p.key(), p.value().detach().cpu());
  for (const auto& b : m.named_buffers()) dict.insert(b.key(), b.value().detach().cpu());
  std::vector<char> bytes = torch::pickle_save(c10::IValue(dict));
  write_file_atomic(path, std::string(bytes.begin(), bytes.end()));
}

LoadedExport load_export(Registry& reg, const std::string& dir) {
  const std::string sp = dir + "/structure.json", wp = dir + "/weights.pt";
  if (!fs::exists(sp)) throw Error(dir + ": not an isp export (no structure.json)");
  LoadedExport out;
  out.structure = json::parse(read_text_file(sp));
  if (out.structure.value("format", std::string()) != "isp-export-1")
    throw Error(sp + ": /format: expected \"isp-export-1\"");
  for (const auto& p : out.structure.value("plugins", json::array())) {
    std::string path = p.get<std::string>();
    if (fs::is_directory(path)) reg.scan_directory(path);
    else if (fs::exists(path)) reg.load_library(path);
  }
  json recipe = {{"nodes", {{"model", out.structure.at("spec")}}}};
  BuildContext ctx(reg, recipe, [&sp](const std::string& p) { return Where{sp, p == "/nodes/model" ? "/spec" : p}; });
  out.model = ctx.node<Backbone>("model");
  std::string bytes = read_text_file(wp);
  c10::IValue v = torch::pickle_load(std::vector<char>(bytes.begin(), bytes.end()));
  if (!v.isGenericDict()) throw Error(wp + ": expected a {name: tensor} dict");
  auto dict = v.toGenericDict();
  torch::NoGradGuard ng;
  std::size_t matched = 0;
  auto assign = [&](const std::string& name, at::Tensor& t) {
    c10::IValue key(name);
    if (!dict.contains(key)) throw Error(wp + ": missing tensor '" + name + "'");
    at::Tensor src = dict.at(key).toTensor();
    if (src.sizes() != t.sizes()) throw Error(wp + ": tensor '" + name + "' has shape " + c10::str(src.sizes()) + ", the structure expects " + c10::str(t.sizes()));
    t.copy_(src);
    ++matched;
  };
  for (auto& p : out.model->named_parameters()) assign(p.key(), p.value());
  for (auto& b : out.model->named_buffers()) assign(b.key(), b.value());
  if (matched != dict.size()) throw Error(wp + ": holds " + std::to_string(dict.size()) + " tensors, the structure uses " + std::to_string(matched));
  out.model->eval();
  return out;
}

// --------------------------------------------------------------------------------------------- progress

double now_seconds() {
  using namespace std::chrono;
  return duration<double>(steady_clock::now().time_since_epoch()).count();
}

Progress::Progress(std::string label) : label_(std::move(label)), tty_(::isatty(STDERR_FILENO) != 0) {}
void Progress::update(const std::string& text, bool force) {
  double t = now_seconds();
  if (tty_) {
    if (!force && t - last_ < 0.25) return;
    std::fprintf(stderr, "\r\x1b[K[%s] %s", label_.c_str(), text.c_str());
    std::fflush(stderr);
  } else if (force) {
    std::fprintf(stderr, "[%s] %s\n", label_.c_str(), text.c_str());
  }
  last_ = t;
}
void Progress::finish(const std::string& text) {
  if (tty_) std::fprintf(stderr, "\r\x1b[K");
  std::fprintf(stderr, "[%s] %s\n", label_.c_str(), text.c_str());
}

static std::string fmt_duration(double s) {
  char buf[32];
  if (s >= 3600) std::snprintf(buf, sizeof buf, "%dh%02dm", static_cast<int>(s / 3600), static_cast<int>(s / 60) % 60);
  else std::snprintf(buf, sizeof buf, "%dm%02ds", static_cast<int>(s / 60), static_cast<int>(s) % 60);
  return buf;
}

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
  BatchLoader loader(split, batch_size, false, Augmentation{}, device);
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
  r.n = split.size();
  r.top1 = static_cast<double>(correct.item<int64_t>()) / static_cast<double>(r.n);
  r.loss = loss.item<double>() / static_cast<double>(r.n);
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

namespace {
// "loss 0.4321 top1 85.20%": accuracies and agreements as percentages, the rest with 4 decimals.
std::string describe_metric(const std::string& name, double v) {
  char b[64];
  const bool pct = name.find("top1") != std::string::npos || name.find("agreement") != std::string::npos;
  if (pct) std::snprintf(b, sizeof b, "%s %.2f%%", name.c_str(), 100.0 * v);
  else std::snprintf(b, sizeof b, "%s %.4f", name.c_str(), v);
  return b;
}
}  // namespace

void TrainLoopHooks::checkpoint(torch::nn::Module& module, torch::optim::Optimizer& optimizer, const std::string& name) {
  save = [&module, &optimizer, name](CheckpointWriter& w) {
    w.module(name, module);
    w.optimizer("optimizer", optimizer);
  };
  load = [&module, &optimizer, name](CheckpointReader& r) {
    r.module(name, module);
    r.optimizer("optimizer", optimizer);
  };
  save_best = [&module, name](CheckpointWriter& w) { w.module(name, module); };
}

TrainLoopResult run_train_loop(const TrainLoopSpec& spec, const TrainLoopHooks& h, BatchLoader& loader, RunContext& ctx) {
  if (!h.step || !h.save || !h.load) throw Error("run_train_loop: step, save and load hooks are required");
  if (h.score && !h.save_best) throw Error("run_train_loop: a score hook needs save_best");
  fs::create_directories(ctx.stage_dir);
  const std::string ckpt_path = ctx.stage_dir + "/checkpoint.pt";
  const double no_score = -std::numeric_limits<double>::infinity();
  TrainLoopResult res;
  res.best_path = ctx.stage_dir + "/best.pt";
  res.best_score = no_score;
  const std::size_t k = spec.metrics.size();
  std::vector<double> sums(k, 0.0);  // host copies of this epoch's running sums (batch-size weighted)
  int64_t start_epoch = 0, start_step = 0, seen_in_epoch = 0;

  if (ctx.resume && fs::exists(ckpt_path)) {
    CheckpointReader r(ckpt_path);
    h.load(r);
    const json& m = r.meta();
    start_epoch = m.at("epoch");
    start_step = m.at("step");
    res.best_epoch = m.value("best_epoch", int64_t{-1});
    if (m.contains("best_score") && m["best_score"].is_number()) res.best_score = m["best_score"];
    seen_in_epoch = m.value("seen_in_epoch", int64_t{0});
    res.images_seen = m.value("images_seen", int64_t{0});
    res.train_seconds = m.value("train_seconds", 0.0);
    std::vector<double> saved = m.value("sums", std::vector<double>{});
    if (saved.size() == k) sums = saved;
    if (r.has("rng")) at::Generator(at::detail::getDefaultCPUGenerator()).set_state(r.tensor("rng"));
    if (!ctx.device.is_cpu() && r.has("rng_device"))
      at::Generator(at::globalContext().defaultGenerator(ctx.device)).set_state(r.tensor("rng_device"));
    std::fprintf(stderr, "[%s] resuming from %s at epoch %lld step %lld\n", ctx.stage_name.c_str(), ckpt_path.c_str(),
                 static_cast<long long>(start_epoch), static_cast<long long>(start_step));
  }

  auto save_checkpoint = [&](int64_t epoch, int64_t step) {
    CheckpointWriter w;
    h.save(w);
    w.tensor("rng", at::detail::getDefaultCPUGenerator().get_state());
    if (!ctx.device.is_cpu())
      w.tensor("rng_device", at::Generator(at::globalContext().defaultGenerator(ctx.device)).get_state());
    w.meta({{"epoch", epoch}, {"step", step}, {"best_epoch", res.best_epoch},
            {"best_score", std::isfinite(res.best_score) ? json(res.best_score) : json(nullptr)}, {"sums", sums},
            {"seen_in_epoch", seen_in_epoch}, {"images_seen", res.images_seen}, {"train_seconds", res.train_seconds},
            {"recipe", ctx.resolved_recipe}, {"stage", ctx.stage_name}});
    w.save_atomic(ckpt_path);
  };

  Progress progress(ctx.stage_name);
  int64_t steps_per_epoch = loader.num_batches();
  if (spec.max_steps_per_epoch > 0) steps_per_epoch = std::min(steps_per_epoch, spec.max_steps_per_epoch);
  const int64_t total_steps = steps_per_epoch * spec.epochs;
  const char* inject = std::getenv("ISP_INTERRUPT_AFTER_STEPS");
  const int64_t interrupt_after = inject ? std::atoll(inject) : -1;
  int64_t steps_this_process = 0;
  const double t_process = now_seconds();
  const auto dopt = torch::TensorOptions().dtype(torch::kDouble).device(ctx.device);
  for (int64_t epoch = start_epoch; epoch < spec.epochs; ++epoch) {
    json line = {{"epoch", epoch + 1}};
    if (h.start_epoch) line.update(h.start_epoch(epoch));
    loader.start_epoch(ctx.seed, epoch);
    const double t_epoch = now_seconds();
    at::Tensor dev_sums = torch::zeros({static_cast<int64_t>(k)}, dopt);
    for (int64_t step = (epoch == start_epoch ? start_step : 0); step < steps_per_epoch; ++step) {
      Batch b = loader.get(step);
      dev_sums += h.step(b).detach().to(torch::kDouble).reshape({static_cast<int64_t>(k)}) * static_cast<double>(b.size());
      seen_in_epoch += b.size();
      res.images_seen += b.size();
      if (++steps_this_process == interrupt_after && ctx.interrupted) ctx.interrupted->store(true);
      const bool last_step = step + 1 == steps_per_epoch;
      if (last_step || step % spec.progress_every == 0 || ctx.stop_requested()) {
        at::Tensor host = dev_sums.cpu();
        for (std::size_t j = 0; j < k; ++j) sums[j] += host[static_cast<int64_t>(j)].item<double>();
        dev_sums.zero_();
        const int64_t done = epoch * steps_per_epoch + step + 1;
        const double per_step = (now_seconds() - t_process) /
                                static_cast<double>(std::max<int64_t>(1, done - start_epoch * steps_per_epoch - start_step));
        std::string text = "epoch " + std::to_string(epoch + 1) + "/" + std::to_string(spec.epochs) + " step " +
                           std::to_string(step + 1) + "/" + std::to_string(steps_per_epoch);
        for (std::size_t j = 0; j < k; ++j)
          text += " " + describe_metric(spec.metrics[j], sums[j] / static_cast<double>(std::max<int64_t>(1, seen_in_epoch)));
        char buf[96];
        std::snprintf(buf, sizeof buf, " %.0f img/s ETA %s",
                      static_cast<double>(seen_in_epoch) / std::max(1e-9, now_seconds() - t_epoch),
                      fmt_duration(per_step * static_cast<double>(total_steps - done)).c_str());
        progress.update(text + buf);
      }
      if (ctx.stop_requested()) {
        res.train_seconds += now_seconds() - t_epoch;
        save_checkpoint(epoch, step + 1);
        progress.finish("interrupted: checkpoint written to " + ckpt_path);
        throw Interrupted("interrupted at epoch " + std::to_string(epoch + 1) + " step " + std::to_string(step + 1) +
                          "; continue with --resume");
      }
    }
    const double epoch_seconds = now_seconds() - t_epoch;
    res.train_seconds += epoch_seconds;
    const double denom = static_cast<double>(std::max<int64_t>(1, seen_in_epoch));
    std::string text = "epoch " + std::to_string(epoch + 1) + "/" + std::to_string(spec.epochs);
    for (std::size_t j = 0; j < k; ++j) {
      line["train_" + spec.metrics[j]] = sums[j] / denom;
      text += " " + describe_metric(spec.metrics[j], sums[j] / denom);
    }
    line["images_per_s"] = static_cast<double>(seen_in_epoch) / std::max(1e-9, epoch_seconds);
    const bool eval_now = (epoch + 1) % spec.eval_every == 0 || epoch + 1 == spec.epochs;
    if (eval_now && h.evaluate) {
      json val = h.evaluate(epoch);
      for (auto it = val.begin(); it != val.end(); ++it) {
        line[it.key()] = it.value();
        if (it.value().is_number()) text += " " + describe_metric(it.key(), it.value().get<double>());
      }
      const double score = h.score ? h.score(line, epoch) : no_score;
      if (score > res.best_score) {
        res.best_score = score;
        res.best_epoch = epoch + 1;
        CheckpointWriter w;
        h.save_best(w);
        w.meta({{"epoch", epoch + 1}, {"score", score}, {"metrics", line}, {"recipe", ctx.resolved_recipe}});
        w.save_atomic(res.best_path);
      }
    }
    char buf[64];
    std::snprintf(buf, sizeof buf, " %.0f img/s (%.1fs)", line["images_per_s"].get<double>(), epoch_seconds);
    progress.finish(text + buf);
    if (ctx.log_metrics) ctx.log_metrics(line);
    res.last_line = line;
    std::fill(sums.begin(), sums.end(), 0.0);
    seen_in_epoch = 0;
    save_checkpoint(epoch + 1, 0);
  }
  return res;
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
  torch::optim::SGD sgd(model.parameters(), torch::optim::SGDOptions(opt.lr)
                                                .momentum(opt.momentum)
                                                .weight_decay(opt.weight_decay)
                                                .nesterov(opt.nesterov));
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
    for (auto& g : sgd.param_groups()) static_cast<torch::optim::SGDOptions&>(g.options()).lr(lr);
    model.train();
    return json{{"lr", lr}};
  };
  hooks.step = [&](const Batch& b) {
    at::Tensor x = b.x.to(ctx.device), y = b.y.to(ctx.device);
    sgd.zero_grad();
    at::Tensor logits = c.forward(x);
    at::Tensor loss = torch::nn::functional::cross_entropy(logits, y);
    loss.backward();
    sgd.step();
    return torch::stack({loss.detach().to(torch::kDouble), logits.detach().argmax(1).eq(y).to(torch::kDouble).mean()});
  };
  hooks.checkpoint(model, sgd);
  if (has_val) {
    hooks.evaluate = [&](int64_t) {
      EvalResult v = evaluate_classifier(c, data.val, opt.eval_batch_size, ctx.device);
      return json{{"val_top1", v.top1}, {"val_loss", v.loss}};
    };
    hooks.score = [](const json& line, int64_t) { return line["val_top1"].get<double>(); };
  }
  TrainLoopResult res = run_train_loop(spec, hooks, train, ctx);

  // Model selection on the validation split, never on the test split.
  if (has_val && res.best_epoch > 0) CheckpointReader(res.best_path).module("model", model);
  EvalResult val = has_val ? evaluate_classifier(c, data.val, opt.eval_batch_size, ctx.device) : EvalResult{};
  EvalResult test = evaluate_classifier(c, data.test, opt.eval_batch_size, ctx.device);
  {
    CheckpointWriter w;
    w.module("model", model);
    w.meta({{"val_top1", val.top1}, {"test_top1", test.top1}, {"recipe", ctx.resolved_recipe}});
    w.save_atomic(ctx.stage_dir + "/final.pt");
  }
  json summary = {{"test_top1", test.top1},         {"test_loss", test.loss},
                  {"val_top1", has_val ? json(val.top1) : json(nullptr)},
                  {"best_epoch", has_val ? json(res.best_epoch) : json(opt.epochs)},
                  {"selected_on", has_val ? "val_top1" : "last_epoch"},
                  {"epochs", opt.epochs},
                  {"train_seconds", res.train_seconds},
                  {"train_images_per_s", static_cast<double>(res.images_seen) / std::max(1e-9, res.train_seconds)},
                  {"n_train", data.train.size()}, {"n_val", data.val.size()}, {"n_test", data.test.size()}};
  std::fprintf(stderr, "[%s] selected epoch %s: val %.2f%%, test %.2f%%\n", ctx.stage_name.c_str(),
               summary["best_epoch"].dump().c_str(), 100.0 * val.top1, 100.0 * test.top1);
  return summary;
}

}  // namespace isp
