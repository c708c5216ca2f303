// Stage "TrainPredictor" (docs/method.md §1b, §3.1): a fresh copy of the classifier's architecture learns to
// reproduce the frozen classifier's class distribution from randomly masked inputs:
//   L = (1/n) sum_i KL( softmax(f_bb(x_i)) || softmax(f_pred(x_i * m_i)) ),  m ~ mask_source.
// Adam with coupled L2 weight decay (torch.optim.Adam), no LR schedule, model selection on the lowest
// validation KL. Evaluation masks are random (as in the official code, docs/method.md §6.21) but drawn from a
// FIXED seed per evaluation, so two evaluations of the same weights agree and model selection is not steered
// by mask noise; the metric remains one draw of masks, i.e. a noisy estimate of the expected KL.
#include <torch/torch.h>

#include <ATen/Context.h>

#include <cstdio>
#include <cstdlib>
#include <filesystem>
#include <mutex>

#include "isp/artifacts.h"
#include "isp/checkpoint.h"
#include "isp/data.h"
#include "isp/interfaces/aem.h"
#include "isp/interfaces/dataset.h"
#include "isp/registry/plugin.h"
#include "isp/registry/recipe.h"
#include "isp/distributed.h"
#include "isp/train.h"
#include "isp/accel.h"
#include "isp/optim.h"

namespace fs = std::filesystem;

namespace {

struct TrainPredictorOptions {
  isp::NodeRef classifier, data, mask_source;
  isp::AdamSettings adam;
  int64_t epochs = 300;
  int64_t batch_size = 128;
  int64_t eval_every = 5;
  int64_t eval_batch_size = 256;
  int64_t max_steps_per_epoch = 0;
  std::string augmentation = "flip";
  int64_t eval_seed = 20220;
  bool init_from_classifier = false;
  template <class V> void visit(V& v) {
    v("classifier", classifier, "the TrainClassifier stage whose network is the frozen black box ({\"$ref\": stage}); "
      "the predictor is a fresh network of its architecture", isp::required(), isp::of_kind("stage"));
    v("data", data, "the dataset ({\"$ref\": node})", isp::required(), isp::of_kind("dataset"));
    v("mask_source", mask_source, "random masks applied to the predictor's input (RandomRbfMasks: docs/method.md §1b)",
      isp::required(), isp::of_kind("mask_source"));
    v("epochs", epochs, "training epochs", isp::at_least(1));
    v("batch_size", batch_size, "mini-batch size", isp::at_least(1));
    adam.visit(v);
    v("eval_every", eval_every, "evaluate on the validation split every N epochs (and after the last)", isp::at_least(1));
    v("eval_batch_size", eval_batch_size, "evaluation batch size", isp::at_least(1));
    v("max_steps_per_epoch", max_steps_per_epoch, "cap steps per epoch (0 = full epochs; for smoke tests)", isp::at_least(0));
    v("augmentation", augmentation, "training augmentation: flip = horizontal flip only (docs/method.md §1b), dataset = the "
      "dataset's own augmentation, none", isp::one_of({"flip", "dataset", "none"}));
    v("eval_seed", eval_seed, "seed of the (fixed) random masks used by every evaluation", isp::at_least(0));
    v("init_from_classifier", init_from_classifier, "start from the trained classifier's weights instead of a random "
      "initialisation (not in the paper, whose predictor starts fresh; converges far faster in short runs)");
  }
};

// Seeds the default generators of the CPU and of `device` for a scope, then puts their states back, so an
// evaluation with fixed masks leaves the training stream untouched.
class ScopedSeed {
 public:
  ScopedSeed(c10::Device device, uint64_t seed) {
    gens_.push_back(at::detail::getDefaultCPUGenerator());
    if (!device.is_cpu()) gens_.push_back(at::globalContext().defaultGenerator(device));
    for (auto& g : gens_) {
      std::lock_guard<std::mutex> lock(g.mutex());
      states_.push_back(g.get_state());
      g.set_current_seed(seed);
    }
  }
  ~ScopedSeed() {
    for (std::size_t i = 0; i < gens_.size(); ++i) {
      std::lock_guard<std::mutex> lock(gens_[i].mutex());
      gens_[i].set_state(states_[i]);
    }
  }
 private:
  std::vector<at::Generator> gens_;
  std::vector<at::Tensor> states_;
};


struct PredEval { double kl = 0, agreement = 0; int64_t n = 0; };

class TrainPredictor : public isp::Stage {
 public:
  TrainPredictor(TrainPredictorOptions o, isp::BuildContext& ctx)
      : opt_(std::move(o)),
        input_(isp::stage_input<isp::TrainedClassifier>(ctx, opt_.classifier)),
        data_(ctx.get<isp::Dataset>(opt_.data)),
        masks_(ctx.get<isp::MaskSource>(opt_.mask_source)) {}

  const char* produces() const override { return isp::TrainedPredictor::kType; }
  std::shared_ptr<const isp::Artifact> planned() const override {
    auto a = std::make_shared<isp::TrainedPredictor>();
    a->classifier = input_.planned();
    return a;
  }

  void run(isp::RunContext& ctx) override {
    take_inputs();
    predictor_ = classifier_->with_widths({});  // this stage's own network, initialised under its seed
    const isp::DataBundle& data = data_->data();
    classifier_->to(ctx.device);
    classifier_->eval();
    isp::FrozenParameters frozen_cls(*classifier_);  // the targets' network: its BN folds are computed once
    predictor_->to(ctx.device);
    isp::apply_memory_format(*classifier_, ctx.speed);
    isp::apply_memory_format(*predictor_, ctx.speed);
    isp::FlatAdam adam(predictor_->parameters(), isp::FlatAdamOptions{opt_.adam.lr, opt_.adam.beta1, opt_.adam.beta2,
                                                                      1e-8, opt_.adam.weight_decay, false});
    isp::BatchLoader train(data.train, opt_.batch_size, /*shuffle=*/true, isp::augmentation_by_name(opt_.augmentation, data),
                           ctx.device);
    const bool has_val = data.val.size() > 0;
    if (opt_.init_from_classifier) copy_classifier_weights();  // a resumed run then loads its checkpoint over it

    isp::TrainLoopSpec spec;
    spec.epochs = opt_.epochs;
    spec.eval_every = opt_.eval_every;
    spec.max_steps_per_epoch = opt_.max_steps_per_epoch;
    spec.metrics = {"kl"};
    isp::TrainLoopHooks hooks;
    hooks.start_epoch = [&](int64_t) {
      predictor_->train();
      return isp::json{{"lr", opt_.adam.lr}};
    };
    isp::TrainStep step(ctx, [&](const isp::Batch& b) {
      const at::Tensor& x = b.x;
      at::Tensor target;
      {
        torch::NoGradGuard ng;
        target = classifier_->forward(x);
      }
      at::Tensor m = masks_->sample(x.size(0), x.size(2), x.size(3), x.options());
      adam.zero_grad();
      at::Tensor loss = isp::kl_per_sample(target, predictor_->forward(x * m)).mean();
      loss.backward();
      adam.step();
      return loss.detach().reshape({1});
    });
    hooks.step = [&](const isp::Batch& b) { return step(b); };
    hooks.checkpoint(*predictor_, adam);
    std::vector<at::Tensor> val_logits;  // the frozen classifier's, the same every epoch
    if (has_val) {
      hooks.evaluate = [&](int64_t) {
        PredEval v = evaluate(data.val, ctx.device, &val_logits);
        return isp::json{{"val_kl", v.kl}, {"val_agreement", v.agreement}};
      };
      hooks.score = [](const isp::json& line, int64_t) { return -line["val_kl"].get<double>(); };
    }
    const isp::TrainLoopResult res = isp::run_train_loop(spec, hooks, train, ctx);
    const int64_t best_epoch = res.best_epoch;

    if (has_val && best_epoch > 0) isp::CheckpointReader(res.best_path).module("model", *predictor_);
    // The selected epoch's validation figures are those of the weights just loaded: taken from its line.
    PredEval val;
    if (has_val && best_epoch > 0 && res.best_line.contains("val_kl")) {
      val.kl = res.best_line["val_kl"].get<double>();
      val.agreement = res.best_line["val_agreement"].get<double>();
      val.n = data.val.size();
    } else if (has_val) {
      val = evaluate(data.val, ctx.device);
    }
    const PredEval test = evaluate(data.test, ctx.device);
    {
      isp::CheckpointWriter w;
      w.module("model", *predictor_);
      w.meta({{"val_kl", val.kl}, {"test_kl", test.kl}, {"recipe", ctx.resolved_recipe}, {"stage", ctx.stage_name}});
      w.save_atomic(ctx.stage_dir + "/final.pt");
    }
    predictor_->eval();
    ctx.summary = {{"predictor_kl", test.kl},
                   {"predictor_agreement", test.agreement},
                   {"predictor_val_kl", has_val ? isp::json(val.kl) : isp::json(nullptr)},
                   {"predictor_val_agreement", has_val ? isp::json(val.agreement) : isp::json(nullptr)},
                   {"predictor_best_epoch", has_val ? isp::json(best_epoch) : isp::json(opt_.epochs)},
                   {"predictor_selected_on", has_val ? "val_kl" : "last_epoch"},
                   {"predictor_eval_masks", "random, fixed seed " + std::to_string(opt_.eval_seed)},
                   {"epochs", opt_.epochs},
                   {"train_seconds", res.train_seconds},
                   {"images_per_s", static_cast<double>(res.images_seen) / std::max(1e-9, res.train_seconds)}};
    std::fprintf(stderr, "[%s] selected epoch %s: val KL %.4f, test KL %.4f, test agreement %.2f%%\n",
                 ctx.stage_name.c_str(), ctx.summary["predictor_best_epoch"].dump().c_str(), val.kl, test.kl,
                 100.0 * test.agreement);
    isp::write_file_atomic(ctx.stage_dir + "/result.json", ctx.summary.dump(2) + "\n");
    publish_predictor(ctx.summary);
  }

  void restore(isp::RunContext& ctx) override {
    take_inputs();
    predictor_ = classifier_->with_widths({});
    isp::CheckpointReader(ctx.stage_dir + "/final.pt").module("model", *predictor_);
    predictor_->to(ctx.device);
    predictor_->eval();
    publish_predictor(isp::json::parse(isp::read_text_file(ctx.stage_dir + "/result.json")));
  }

 private:
  void take_inputs() {
    classifier_ = input_->network;
    if (data_->data().num_classes() != classifier_->num_classes())
      throw isp::RecipeError(opt_.classifier.where, "the classifier has " + std::to_string(classifier_->num_classes()) +
                                                        " classes but the dataset has " +
                                                        std::to_string(data_->data().num_classes()));
  }
  void publish_predictor(isp::json metrics) {
    auto a = std::make_shared<isp::TrainedPredictor>();
    a->classifier = input_.get();
    a->predictor = predictor_;
    a->metrics = std::move(metrics);
    publish(a);
  }

  void copy_classifier_weights() {
    torch::NoGradGuard ng;
    auto src_p = classifier_->named_parameters(), src_b = classifier_->named_buffers();
    for (auto& p : predictor_->named_parameters()) {
      const at::Tensor* s = src_p.find(p.key());
      if (!s || s->sizes() != p.value().sizes())
        throw isp::RecipeError(opt_.classifier.where, "init_from_classifier: the classifier has no parameter '" +
                                                          p.key() + "' of the predictor's shape");
      p.value().copy_(*s);
    }
    for (auto& b : predictor_->named_buffers()) {
      const at::Tensor* s = src_b.find(b.key());
      if (s && s->sizes() == b.value().sizes()) b.value().copy_(*s);
    }
  }

  // KL and argmax agreement of predictor(x * m) vs classifier(x), masks from a fixed seed.
  // `target_logits`: the frozen classifier's logits of this split, batch by batch; computed on the first call that
  // passes it and taken from there after (the validation split is evaluated every epoch).
  PredEval evaluate(const isp::ImageSplit& split, c10::Device device, std::vector<at::Tensor>* target_logits = nullptr) {
    PredEval r;
    if (split.size() == 0) return r;
    torch::NoGradGuard ng;
    const bool was_training = predictor_->is_training();
    predictor_->eval();
    classifier_->eval();
    ScopedSeed seeded(device, static_cast<uint64_t>(opt_.eval_seed));
    // Data-parallel: this rank's share of the split; the sums are added over the ranks.
    isp::BatchLoader loader(isp::rank_share(split), opt_.eval_batch_size, false, isp::Augmentation{}, device);
    loader.start_epoch(0, 0);
    at::Tensor kl = torch::zeros({}, torch::TensorOptions().dtype(torch::kDouble).device(device));
    at::Tensor agree = torch::zeros({}, torch::TensorOptions().dtype(torch::kLong).device(device));
    for (int64_t i = 0; i < loader.num_batches(); ++i) {
      isp::Batch b = loader.get(i);
      at::Tensor x = b.x.to(device);
      const bool cached = target_logits && static_cast<int64_t>(target_logits->size()) > i;
      at::Tensor z = cached ? (*target_logits)[static_cast<std::size_t>(i)] : classifier_->forward(x);
      if (target_logits && !cached) target_logits->push_back(z);
      at::Tensor m = masks_->sample(x.size(0), x.size(2), x.size(3), x.options());
      at::Tensor p = predictor_->forward(x * m);
      kl += isp::kl_per_sample(z, p).sum().to(torch::kDouble);
      agree += p.argmax(1).eq(z.argmax(1)).sum();
    }
    at::Tensor sums = torch::stack({kl, agree.to(torch::kDouble)});
    isp::dist::allreduce_sum(sums, "predictor evaluation");
    r.n = split.size();
    r.kl = sums[0].item<double>() / static_cast<double>(r.n);
    r.agreement = sums[1].item<double>() / static_cast<double>(r.n);
    predictor_->train(was_training);
    return r;
  }

  TrainPredictorOptions opt_;
  isp::StageInput<isp::TrainedClassifier> input_;
  std::shared_ptr<isp::Backbone> classifier_;
  std::shared_ptr<isp::Dataset> data_;
  std::shared_ptr<isp::MaskSource> masks_;
  std::shared_ptr<isp::Backbone> predictor_;
};

std::shared_ptr<isp::Stage> make_stage(const TrainPredictorOptions& o, isp::BuildContext& ctx) {
  return std::make_shared<TrainPredictor>(o, ctx);
}

}  // namespace

ISP_PLUGIN("0.2.0");
ISP_REGISTER(isp::Stage, "TrainPredictor", 1, TrainPredictorOptions, make_stage,
             "train the AEM predictor: a fresh copy of the classifier's architecture that matches the frozen "
             "classifier on randomly masked inputs (KL, Adam); model selection on the validation KL");
