// Stage "TrainSelector" (docs/method.md §1c, §3.2): the AEM selector (frozen classifier encoder -> feature filter
// -> decoder -> mask head, isp::SelectorNet) learns masks P such that the frozen predictor, fed x * s with
// s ~ sampler(P), reproduces the frozen classifier:
//   L = (1/n) sum_i KL( softmax(f_bb(x_i)) || softmax(f_pred(x_i * s_i)) ) + sum_r weight_r * r(s, P, ...).
// Adam on the selector's own parameters (filter + decoder + head). Evaluation uses the deterministic mask P
// (no sampling); model selection on the highest validation agreement argmax f_pred(x*P) == argmax f_bb(x)
// (official), or the last step's weights (option selection).
#include <torch/torch.h>

#include <ATen/Context.h>

#include <cmath>
#include <cstdio>
#include <cstdlib>
#include <filesystem>

#include "isp/artifacts.h"
#include "isp/checkpoint.h"
#include "isp/data.h"
#include "isp/interfaces/aem.h"
#include "isp/interfaces/dataset.h"
#include "isp/interfaces/regularizer.h"
#include "isp/registry/plugin.h"
#include "isp/registry/recipe.h"
#include "isp/distributed.h"
#include "isp/train.h"
#include "isp/accel.h"
#include "isp/optim.h"
#include "isp/saliency_metrics.h"
#include "saliency_summary.h"

namespace fs = std::filesystem;

namespace {

struct TrainSelectorOptions {
  isp::NodeRef predictor, filter, decoder, head, sampler, data;
  std::vector<isp::NodeRef> regularizers;
  isp::AdamSettings adam;
  int64_t epochs = 20;
  int64_t batch_size = 16;
  int64_t eval_every = 1;
  int64_t eval_batch_size = 256;
  int64_t max_steps_per_epoch = 0;
  std::string label_source = "ground_truth";
  std::string augmentation = "flip";
  std::string selection = "val_agreement";
  std::string lr_schedule = "constant";
  int64_t metrics_images = 256;
  int64_t metrics_steps = 16;
  template <class V> void visit(V& v) {
    v("predictor", predictor, "the TrainPredictor stage whose network scores the masked inputs ({\"$ref\": stage}); its "
      "classifier is the frozen black box and the selector's encoder", isp::required(), isp::of_kind("stage"));
    v("filter", filter, "class-conditioned filter of the deepest encoder features", isp::required(),
      isp::of_kind("feature_filter"));
    v("decoder", decoder, "decoder from the encoder scales to a full-resolution map", isp::required(), isp::of_kind("decoder"));
    v("head", head, "mask head: decoder features -> mask distribution P", isp::required(), isp::of_kind("mask_head"));
    v("sampler", sampler, "draws the relaxed masks s ~ P in training (RelaxedBernoulli, temperature 1: docs/method.md §3.2)",
      isp::required(), isp::of_kind("sampler"));
    v("regularizers", regularizers, "weighted loss terms on the masks (MaskArea, MaskSmoothness, ...)",
      isp::of_kind("regularizer"));
    v("data", data, "the dataset ({\"$ref\": node})", isp::required(), isp::of_kind("dataset"));
    v("epochs", epochs, "training epochs", isp::at_least(1));
    v("batch_size", batch_size, "mini-batch size", isp::at_least(1));
    adam.visit(v);
    v("eval_every", eval_every, "evaluate on the validation split every N epochs (and after the last)", isp::at_least(1));
    v("eval_batch_size", eval_batch_size, "evaluation batch size", isp::at_least(1));
    v("max_steps_per_epoch", max_steps_per_epoch, "cap steps per epoch (0 = full epochs; for smoke tests)", isp::at_least(0));
    v("label_source", label_source, "class that conditions the feature filter at evaluation (training always uses the "
      "ground truth, docs/method.md §2.3): ground_truth or predicted (the classifier's argmax)",
      isp::one_of({"ground_truth", "predicted"}));
    v("augmentation", augmentation, "training augmentation: flip = horizontal flip only (docs/method.md §1c), dataset = the "
      "dataset's own augmentation, none", isp::one_of({"flip", "dataset", "none"}));
    v("lr_schedule", lr_schedule, "constant (official) or cosine: epoch e of E trains at lr * (1 + cos(pi e / E)) / 2",
      isp::one_of({"constant", "cosine"}));
    v("selection", selection, "which weights the stage keeps: val_agreement = the evaluated epoch with the highest "
      "validation agreement (official, docs/method.md §1c); last = the weights after the last step (validation is "
      "still evaluated and logged)", isp::one_of({"val_agreement", "last"}));
    v("metrics_images", metrics_images, "test images for the saliency metrics (deletion/insertion AUC against a random "
      "and a centred-Gaussian ordering, mass on object, centre spread: docs/method.md §9); 0 = skip them",
      isp::at_least(0));
    v("metrics_steps", metrics_steps, "deletion/insertion curves remove or reveal the pixels in this many equal steps",
      isp::between(2, 1024));
  }
};



struct SelEval { double agreement = 0, kl = 0, area = 0; int64_t n = 0; };

class TrainSelector : public isp::Stage {
 public:
  TrainSelector(TrainSelectorOptions o, isp::BuildContext& ctx)
      : opt_(std::move(o)),
        input_(isp::stage_input<isp::TrainedPredictor>(ctx, opt_.predictor)),
        data_(ctx.get<isp::Dataset>(opt_.data)),
        filter_(ctx.get<isp::FeatureFilter>(opt_.filter)),
        decoder_(ctx.get<isp::Decoder>(opt_.decoder)),
        head_(ctx.get<isp::MaskHead>(opt_.head)),
        sampler_(ctx.get<isp::MaskSampler>(opt_.sampler)) {
    // The selector learns only through the predictor's KL on x * s: a sample without a gradient (hard
    // Bernoulli without straight-through) leaves nothing to learn, which would otherwise surface mid-run as
    // autograd's "element 0 of tensors does not require grad".
    if (!sampler_->differentiable()) {
      const std::string node = isp::BuildContext::ref_name(opt_.sampler.spec);
      throw isp::RecipeError(opt_.sampler.where,
                             "the sampler" + (node.empty() ? std::string() : " '" + node + "'") +
                                 " draws masks that carry no gradient, so the selector cannot learn from the "
                                 "predictor's KL term; use a relaxed sampler (RelaxedBernoulli, GumbelSigmoid) or "
                                 "Bernoulli with \"straight_through\": true");
    }
    for (const auto& r : opt_.regularizers) regularizers_.push_back(ctx.get<isp::Regularizer>(r));
  }

  const char* produces() const override { return isp::ExplanationModel::kType; }
  std::shared_ptr<const isp::Artifact> planned() const override {
    auto a = std::make_shared<isp::ExplanationModel>();
    a->predictor = input_.planned();
    a->classifier = a->predictor ? a->predictor->classifier : nullptr;
    if (a->classifier && a->classifier->network)
      a->selector = std::make_shared<isp::SelectorNet>(a->classifier->network, filter_, decoder_, head_, sampler_);
    return a;
  }

  void run(isp::RunContext& ctx) override {
    take_inputs();
    const isp::DataBundle& data = data_->data();
    classifier_->to(ctx.device);
    predictor_->to(ctx.device);
    selector_->to(ctx.device);
    classifier_->eval();
    predictor_->eval();
    isp::FrozenParameters frozen_pred(*predictor_), frozen_cls(*classifier_);
    // selector_->parameters(): filter + decoder + head; the encoder is not a registered submodule.
    isp::apply_memory_format(*classifier_, ctx.speed);
    isp::apply_memory_format(*predictor_, ctx.speed);
    isp::apply_memory_format(*selector_, ctx.speed);
    isp::FlatAdam adam(selector_->parameters(), isp::FlatAdamOptions{opt_.adam.lr, opt_.adam.beta1, opt_.adam.beta2,
                                                                     1e-8, opt_.adam.weight_decay, false});
    isp::BatchLoader train(data.train, opt_.batch_size, /*shuffle=*/true, isp::augmentation_by_name(opt_.augmentation, data),
                           ctx.device);
    const bool has_val = data.val.size() > 0;

    isp::TrainLoopSpec spec;
    spec.epochs = opt_.epochs;
    spec.eval_every = opt_.eval_every;
    spec.max_steps_per_epoch = opt_.max_steps_per_epoch;
    spec.metrics = {"loss", "kl"};
    for (const auto& r : regularizers_) spec.metrics.push_back(r->term());
    isp::TrainLoopHooks hooks;
    hooks.start_epoch = [&](int64_t epoch) {
      selector_->train();
      // Per epoch, not per step: a resumed run sets the same rate as an uninterrupted one.
      const double lr = opt_.lr_schedule == "cosine"
                            ? 0.5 * opt_.adam.lr * (1.0 + std::cos(M_PI * static_cast<double>(epoch) / static_cast<double>(opt_.epochs)))
                            : opt_.adam.lr;
      adam.set_lr(lr);
      return isp::json{{"lr", lr}};
    };
    isp::TrainStep step(ctx, [&](const isp::Batch& b) {
      const at::Tensor &x = b.x, &y = b.y;
      // The selector's encoder is the frozen classifier: one pass gives both the target logits and the features
      // the decoder starts from (it runs without grad, as SelectorNet::forward would run it).
      isp::BackboneFeatures f;
      {
        torch::NoGradGuard ng;
        f = classifier_->forward_features(x);
      }
      const at::Tensor z = f.logits;
      // Ground-truth labels condition the filter in training (docs/method.md §1c).
      isp::MaskDistribution dist = selector_->decode(std::move(f.scales), y);
      at::Tensor s = selector_->sampler->sample(dist.probs);
      at::Tensor kl = isp::kl_per_sample(z, predictor_->forward(x * s)).mean();
      isp::LossInputs in;
      in.mask = s;
      in.probs = dist.probs;
      in.params = dist.params;
      in.readable = dist.readable;
      in.logits = z;
      in.labels = y;
      at::Tensor loss = kl;
      std::vector<at::Tensor> parts{at::Tensor(), kl.detach()};
      for (const auto& r : regularizers_) {
        at::Tensor t = r->compute(in);
        loss = loss + r->weight() * t;
        parts.push_back(t.detach());
      }
      parts[0] = loss.detach();
      adam.zero_grad();
      loss.backward();
      adam.step();
      return torch::stack(parts);
    });
    hooks.step = [&](const isp::Batch& b) { return step(b); };
    hooks.checkpoint(*selector_, adam);
    const bool select_on_val = has_val && opt_.selection == "val_agreement";
    if (has_val) {
      hooks.evaluate = [&](int64_t) {
        SelEval v = evaluate(data.val, ctx.device);
        return isp::json{{"val_agreement", v.agreement}, {"val_kl", v.kl}, {"val_mask_area", v.area}};
      };
      if (select_on_val) hooks.score = [](const isp::json& line, int64_t) { return line["val_agreement"].get<double>(); };
    }
    const isp::TrainLoopResult res = isp::run_train_loop(spec, hooks, train, ctx);
    const int64_t best_epoch = select_on_val ? res.best_epoch : opt_.epochs;

    if (select_on_val && best_epoch > 0) isp::CheckpointReader(res.best_path).module("model", *selector_);
    // The selected epoch's validation figures are those of the weights just loaded: taken from its line.
    SelEval val;
    if (select_on_val && best_epoch > 0 && res.best_line.contains("val_agreement")) {
      val.agreement = res.best_line["val_agreement"].get<double>();
      val.kl = res.best_line["val_kl"].get<double>();
      val.area = res.best_line["val_mask_area"].get<double>();
      val.n = data.val.size();
    } else if (has_val) {
      val = evaluate(data.val, ctx.device);
    }
    const SelEval test = evaluate(data.test, ctx.device);
    {
      isp::CheckpointWriter w;
      w.module("model", *selector_);
      w.meta({{"val_agreement", val.agreement}, {"test_agreement", test.agreement}, {"recipe", ctx.resolved_recipe},
              {"stage", ctx.stage_name}});
      w.save_atomic(ctx.stage_dir + "/final.pt");
    }
    selector_->eval();
    const isp::json saliency = saliency_metrics(data, ctx);
    ctx.summary = {{"selector_agreement", test.agreement},
                   {"selector_kl", test.kl},
                   {"mean_mask_area", test.area},
                   {"selector_val_agreement", has_val ? isp::json(val.agreement) : isp::json(nullptr)},
                   {"selector_val_kl", has_val ? isp::json(val.kl) : isp::json(nullptr)},
                   {"selector_val_mask_area", has_val ? isp::json(val.area) : isp::json(nullptr)},
                   {"selector_best_epoch", best_epoch},
                   {"selector_selected_on", select_on_val ? "val_agreement" : "last_epoch"},
                   {"selector_label_source", opt_.label_source},
                   {"selector_parameters", count_parameters()},
                   {"epochs", opt_.epochs},
                   {"train_seconds", res.train_seconds},
                   {"images_per_s", static_cast<double>(res.images_seen) / std::max(1e-9, res.train_seconds)},
                   {"saliency", saliency}};
    std::fprintf(stderr, "[%s] selected epoch %s: val agreement %.2f%%, test agreement %.2f%%, KL %.4f, mask area %.3f\n",
                 ctx.stage_name.c_str(), ctx.summary["selector_best_epoch"].dump().c_str(), 100.0 * val.agreement,
                 100.0 * test.agreement, test.kl, test.area);
    if (saliency.is_object()) isp_selector::print_saliency_summary(ctx.stage_name, saliency);
    isp::write_file_atomic(ctx.stage_dir + "/result.json", ctx.summary.dump(2) + "\n");
    publish_model(ctx.summary);
  }

  void restore(isp::RunContext& ctx) override {
    take_inputs();
    isp::CheckpointReader(ctx.stage_dir + "/final.pt").module("model", *selector_);
    selector_->to(ctx.device);
    selector_->eval();
    curves_ = {};
    if (fs::exists(curves_path(ctx))) {  // absent in run folders older than the file, or without metrics
      isp::CheckpointReader r(curves_path(ctx));
      curves_.curves = r.tensor("curves");
      curves_.steps = r.meta().at("steps").get<int64_t>();
      curves_.seed = r.meta().at("seed").get<uint64_t>();
      curves_.labels = r.meta().at("labels").get<std::string>();
      curves_.selector_fingerprint = r.meta().at("selector_fingerprint").get<double>();
    }
    publish_model(isp::json::parse(isp::read_text_file(ctx.stage_dir + "/result.json")));
  }

 private:
  // The selector assembles at run time: its encoder is the classifier network the predictor stage hands on.
  void take_inputs() {
    const auto pred = input_.get();
    classifier_ = pred->classifier->network;
    predictor_ = pred->predictor;
    if (data_->data().num_classes() != classifier_->num_classes())
      throw isp::RecipeError(opt_.predictor.where, "the classifier has " + std::to_string(classifier_->num_classes()) +
                                                       " classes but the dataset has " +
                                                       std::to_string(data_->data().num_classes()));
    selector_ = std::make_shared<isp::SelectorNet>(classifier_, filter_, decoder_, head_, sampler_);
  }
  void publish_model(isp::json metrics) {
    auto a = std::make_shared<isp::ExplanationModel>();
    a->predictor = input_.get();
    a->classifier = a->predictor->classifier;
    a->selector = selector_;
    a->metrics = std::move(metrics);
    a->saliency_curves = curves_;
    publish(a);
  }
  static std::string curves_path(const isp::RunContext& ctx) { return ctx.stage_dir + "/saliency_curves.pt"; }

  int64_t count_parameters() const {
    int64_t n = 0;
    for (const auto& p : selector_->parameters()) n += p.numel();
    return n;
  }

  // docs/method.md §9 on the first metrics_images test images, maps conditioned as in evaluation. The per-image
  // curves are kept (saliency_curves.pt) for Export, whose "original" row measures the same maps again.
  isp::json saliency_metrics(const isp::DataBundle& data, isp::RunContext& ctx) {
    curves_ = {};
    const int64_t n = std::min<int64_t>(opt_.metrics_images, data.test.size());
    if (n == 0) return nullptr;
    isp::SaliencyMetricOptions mo;
    mo.steps = opt_.metrics_steps;
    mo.seed = ctx.seed;
    const at::Tensor labels =
        opt_.label_source == "predicted" ? at::Tensor() : data.test.labels.narrow(0, 0, n).to(ctx.device);
    const auto report = isp::measure_selector_saliency(*selector_, data.test.images.narrow(0, 0, n).to(ctx.device),
                                                       labels, data, mo, opt_.eval_batch_size);
    curves_.curves = report.curves;
    curves_.steps = mo.steps;
    curves_.seed = mo.seed;
    curves_.labels = opt_.label_source;
    curves_.selector_fingerprint = isp::weights_fingerprint(*selector_);
    isp::CheckpointWriter w;
    w.tensor("curves", curves_.curves);
    w.meta({{"steps", curves_.steps}, {"seed", curves_.seed}, {"labels", curves_.labels},
            {"selector_fingerprint", curves_.selector_fingerprint}});
    w.save_atomic(curves_path(ctx));
    return report.to_json();
  }

  // Deterministic evaluation with the mask P itself (docs/method.md §1c): agreement, KL and mean(P).
  SelEval evaluate(const isp::ImageSplit& split, c10::Device device) {
    SelEval r;
    if (split.size() == 0) return r;
    torch::NoGradGuard ng;
    const bool was_training = selector_->is_training();
    selector_->eval();
    classifier_->eval();
    predictor_->eval();
    // Data-parallel: this rank's share of the split; the sums are added over the ranks.
    isp::BatchLoader loader(isp::rank_share(split), opt_.eval_batch_size, false, isp::Augmentation{}, device);
    loader.start_epoch(0, 0);
    const auto dopt = torch::TensorOptions().dtype(torch::kDouble).device(device);
    at::Tensor kl = torch::zeros({}, dopt), area = torch::zeros({}, dopt);
    at::Tensor agree = torch::zeros({}, torch::TensorOptions().dtype(torch::kLong).device(device));
    for (int64_t i = 0; i < loader.num_batches(); ++i) {
      isp::Batch b = loader.get(i);
      at::Tensor x = b.x.to(device), y = b.y.to(device);
      // One encoder pass gives the target logits and the decoder's features, as in the training step.
      isp::BackboneFeatures f = classifier_->forward_features(x);
      const at::Tensor z = f.logits;
      at::Tensor labels = opt_.label_source == "predicted" ? z.argmax(1) : y;
      at::Tensor P = selector_->decode(std::move(f.scales), labels).probs;
      at::Tensor p = predictor_->forward(x * P);
      kl += isp::kl_per_sample(z, p).sum().to(torch::kDouble);
      agree += p.argmax(1).eq(z.argmax(1)).sum();
      area += P.flatten(1).mean(1).sum().to(torch::kDouble);
    }
    at::Tensor sums = torch::stack({kl, area, agree.to(torch::kDouble)});
    isp::dist::allreduce_sum(sums, "selector evaluation");
    r.n = split.size();
    r.kl = sums[0].item<double>() / static_cast<double>(r.n);
    r.area = sums[1].item<double>() / static_cast<double>(r.n);
    r.agreement = sums[2].item<double>() / static_cast<double>(r.n);
    selector_->train(was_training);
    return r;
  }

  TrainSelectorOptions opt_;
  isp::StageInput<isp::TrainedPredictor> input_;
  std::shared_ptr<isp::Dataset> data_;
  std::shared_ptr<isp::FeatureFilter> filter_;
  std::shared_ptr<isp::Decoder> decoder_;
  std::shared_ptr<isp::MaskHead> head_;
  std::shared_ptr<isp::MaskSampler> sampler_;
  std::shared_ptr<isp::Backbone> classifier_;
  std::shared_ptr<isp::Backbone> predictor_;
  std::shared_ptr<isp::SelectorNet> selector_;
  isp::ExplanationModel::MeasuredCurves curves_;
  std::vector<std::shared_ptr<isp::Regularizer>> regularizers_;
};

std::shared_ptr<isp::Stage> make_stage(const TrainSelectorOptions& o, isp::BuildContext& ctx) {
  return std::make_shared<TrainSelector>(o, ctx);
}

}  // namespace

ISP_PLUGIN("0.3.0");
ISP_REGISTER(isp::Stage, "TrainSelector", 1, TrainSelectorOptions, make_stage,
             "train the AEM selector (encoder -> filter -> decoder -> mask head) against the frozen predictor and "
             "classifier; model selection on the validation agreement");
