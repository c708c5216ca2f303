#pragma once
// The supervised training loop shared by the classifier and finetuning stages: SGD with momentum and weight
// decay, MultiStep or cosine LR, evaluation every N epochs, model selection on the validation split, atomic
// per-epoch checkpoints, exact resume, Ctrl-C checkpointing, JSON-lines metrics and a progress line.
#include <functional>
#include <string>
#include <vector>

#include <ATen/core/Tensor.h>

#include "isp/interfaces/dataset.h"
#include "isp/interfaces/stage.h"

namespace torch {
namespace nn { class Module; }
namespace optim { class Optimizer; }
}  // namespace torch

namespace isp {

class CheckpointWriter;
class FlatOptimizer;
class CheckpointReader;
class BatchLoader;
struct Batch;

// The epoch/step loop every training stage shares (classifier, finetuning, predictor, selector, gate
// learning): exact resume from <stage_dir>/checkpoint.pt at the step it stopped (what `save` writes, the RNG
// streams, the running sums), Ctrl-C checkpointing, fault injection (ISP_INTERRUPT_AFTER_STEPS=N behaves as
// if Ctrl-C arrived after N steps), step metrics accumulated on the device and read back only when the
// progress line is drawn, evaluation every N epochs with model selection into <stage_dir>/best.pt, and one
// JSON line per epoch in metrics.jsonl.
struct TrainLoopSpec {
  int64_t epochs = 1;
  int64_t eval_every = 1;           // and after the last epoch
  int64_t max_steps_per_epoch = 0;  // 0 = the whole loader
  int64_t progress_every = 10;      // steps between progress reads; each read is one host synchronisation
  std::vector<std::string> metrics{"loss"};  // what step() returns, in order; logged as train_<name>
};
struct TrainLoopHooks {
  std::function<json(int64_t epoch)> start_epoch;     // optional: LR, train mode...; returns fields for the line
  std::function<at::Tensor(const Batch&)> step;       // one optimisation step -> detached [metrics.size()] batch means
  std::function<json(int64_t epoch)> evaluate;        // optional: validation metrics, merged into the line
  std::function<double(const json& line, int64_t epoch)> score;  // optional: higher is better, -inf = no candidate
  std::function<void(CheckpointWriter&)> save;        // everything step() changes: model, optimiser, ...
  std::function<void(CheckpointReader&)> load;
  std::function<void(CheckpointWriter&)> save_best;   // what best.pt holds (required with score)
  // Data-parallel runs (isp/distributed.h): the trained modules, whose buffers (BatchNorm statistics, computed
  // per rank) are made rank 0's before every evaluation and at the end, as DDP's broadcast_buffers does.
  // checkpoint() sets it to its module.
  std::vector<torch::nn::Module*> replicas;
  // The common case: save/load = the module (as `name`) and its optimiser, save_best = the module.
  ISP_API void checkpoint(torch::nn::Module& module, torch::optim::Optimizer& optimizer, const std::string& name = "model");
  // The same for a flat optimizer; after loading the module, its parameters are linked back into the buffer.
  ISP_API void checkpoint(torch::nn::Module& module, FlatOptimizer& optimizer, const std::string& name = "model");
};
struct TrainLoopResult {
  int64_t best_epoch = -1;  // -1: no evaluated epoch was a candidate (best.pt absent)
  double best_score = 0;
  double train_seconds = 0;
  int64_t images_seen = 0;
  std::string best_path;
  json last_line;  // the last epoch's metrics line (empty when resumed after the last epoch)
  // The metrics line of best_epoch, as best.pt records it (also after a resume): its evaluation figures are those
  // of the weights in best.pt, so a stage that selects them need not evaluate the validation split again.
  json best_line;
};
ISP_API TrainLoopResult run_train_loop(const TrainLoopSpec& spec, const TrainLoopHooks& hooks, BatchLoader& loader,
                                       RunContext& ctx);

struct SgdScheduleOptions {
  int64_t epochs = 200;
  int64_t batch_size = 128;
  double lr = 0.1;
  double momentum = 0.9;
  double weight_decay = 1e-4;
  bool nesterov = false;
  std::string lr_schedule = "multistep";
  std::vector<int64_t> milestones{100, 150};
  double gamma = 0.1;
  int64_t warmup_epochs = 0;
  int64_t eval_every = 1;
  int64_t eval_batch_size = 256;
  int64_t max_steps_per_epoch = 0;  // 0 = full epochs (for smoke tests)
  template <class V> void visit(V& v) {
    v("epochs", epochs, "training epochs (0: none; a classifier then keeps its init_from weights as they are)", at_least(0));
    v("batch_size", batch_size, "mini-batch size", at_least(1));
    v("lr", lr, "initial learning rate", greater_than(0));
    v("momentum", momentum, "SGD momentum", between(0, 1));
    v("weight_decay", weight_decay, "L2 weight decay (coupled, as torch.optim.SGD)", at_least(0));
    v("nesterov", nesterov, "Nesterov momentum");
    v("lr_schedule", lr_schedule, "learning-rate schedule", one_of({"multistep", "cosine", "constant"}));
    v("milestones", milestones, "multistep: epochs after which the LR is multiplied by gamma", at_least(0));
    v("gamma", gamma, "multistep decay factor", open_closed(0, 1));
    v("warmup_epochs", warmup_epochs, "linear warm-up epochs", at_least(0));
    v("eval_every", eval_every, "evaluate on the validation split every N epochs (and after the last)", at_least(1));
    v("eval_batch_size", eval_batch_size, "evaluation batch size", at_least(1));
    v("max_steps_per_epoch", max_steps_per_epoch, "cap steps per epoch (0 = full epochs; for smoke tests)", at_least(0));
  }
};

ISP_API double lr_at_epoch(const SgdScheduleOptions& o, int64_t epoch);

// Adam with coupled L2 weight decay (torch.optim.Adam) and a constant LR: the AEM predictor and selector.
struct AdamSettings {
  double lr = 1e-4;
  double weight_decay = 1e-4;
  double beta1 = 0.9, beta2 = 0.999;
  template <class V> void visit(V& v) {
    v("lr", lr, "Adam learning rate (constant unless the stage has an lr_schedule)", greater_than(0));
    v("weight_decay", weight_decay, "L2 weight decay added to the gradient (coupled, as torch.optim.Adam)", at_least(0));
    v("beta1", beta1, "Adam beta1", between(0, 1));
    v("beta2", beta2, "Adam beta2", between(0, 1));
  }
};

// Turns off requires_grad of a frozen network's parameters for a scope (gradients still flow through it to
// its input), and restores the previous flags afterwards. Meanwhile its folded conv + BN pairs are computed once
// (keep_batchnorm_folds, isp/interfaces/backbone.h): nothing may write its weights in place during the scope.
class FrozenParameters {
 public:
  explicit FrozenParameters(torch::nn::Module& m);
  ~FrozenParameters();
  FrozenParameters(const FrozenParameters&) = delete;
  FrozenParameters& operator=(const FrozenParameters&) = delete;
 private:
  std::vector<at::Tensor> params_;
  std::vector<bool> flags_;
};

struct Classifier {
  torch::nn::Module* module = nullptr;
  std::function<at::Tensor(const at::Tensor&)> forward;  // logits
};

// Top-1 accuracy and mean cross-entropy over a split (eval mode, no grad).
struct EvalResult { double top1 = 0, loss = 0; int64_t n = 0; };
ISP_API EvalResult evaluate_classifier(const Classifier& c, const ImageSplit& split, int64_t batch_size,
                                       c10::Device device);

// Adaptive BatchNorm: re-estimates the running mean/variance of every BatchNorm layer of `c` from the first
// `images` images of `split` (in order, no augmentation, no grad), as an exact average over those images
// (cumulative moving average), and leaves the module in eval mode. Weights are untouched. Used to score
// pruned candidates fairly: the unpruned statistics do not fit a network with channels removed.
ISP_API void recalibrate_batchnorm(const Classifier& c, const ImageSplit& split, int64_t images, int64_t batch_size,
                                   c10::Device device);

// Keeps the default CPU generator's state across a scope (evaluation that builds modules must not shift the
// training noise of the caller).
class ISP_API CpuRngGuard {
 public:
  CpuRngGuard();
  ~CpuRngGuard();
  CpuRngGuard(const CpuRngGuard&) = delete;
  CpuRngGuard& operator=(const CpuRngGuard&) = delete;
 private:
  at::Tensor state_;
};

// Trains in ctx.stage_dir (checkpoint.pt, best.pt, final.pt). Returns the summary (val/test top-1, timings).
ISP_API json fit_classifier(const Classifier& c, const DataBundle& data, const SgdScheduleOptions& opt,
                            RunContext& ctx);

// A single-line progress display on a terminal, plain lines otherwise.
class ISP_API Progress {
 public:
  explicit Progress(std::string label);
  void update(const std::string& text, bool force = false);
  void finish(const std::string& text);
 private:
  std::string label_;
  bool tty_;
  double last_ = 0;
};

ISP_API double now_seconds();

// KL(softmax(target) || softmax(logits)) per sample, summed over classes: [n].
ISP_API at::Tensor kl_per_sample(const at::Tensor& target_logits, const at::Tensor& logits);
// Training augmentation by name: "dataset" = the data set's own, "flip" = horizontal flips only, "none".
ISP_API Augmentation augmentation_by_name(const std::string& mode, const DataBundle& data);

}  // namespace isp
