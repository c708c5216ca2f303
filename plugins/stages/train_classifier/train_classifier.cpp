// Stage "TrainClassifier": supervised training of a backbone node (isp-spec §1a), in place, so later stages
// of the same recipe see the trained weights.
#include <torch/nn/module.h>

#include <filesystem>

#include "isp/checkpoint.h"
#include "isp/interfaces/backbone.h"
#include "isp/interfaces/stage.h"
#include "isp/plugin.h"
#include "isp/registry.h"
#include "isp/train.h"

namespace {

struct TrainClassifierOptions : isp::SgdScheduleOptions {
  isp::NodeRef model, data;
  std::string init_from;  // optional checkpoint to start from
  TrainClassifierOptions() {}
  template <class V> void visit(V& v) {
    v("model", model, "the backbone to train ({\"$ref\": node})", isp::required(), isp::of_kind("backbone"));
    v("data", data, "the dataset ({\"$ref\": node})", isp::required(), isp::of_kind("dataset"));
    v("init_from", init_from, "optional isp checkpoint (module 'model') to start from instead of random weights");
    isp::SgdScheduleOptions::visit(v);
  }
};

class TrainClassifier : public isp::Stage {
 public:
  TrainClassifier(TrainClassifierOptions o, isp::BuildContext& ctx)
      : opt_(std::move(o)), model_(ctx.get<isp::Backbone>(opt_.model)), data_(ctx.get<isp::Dataset>(opt_.data)) {
    if (data_->data().num_classes() != model_->num_classes())
      throw isp::RecipeError(opt_.model.where, "the backbone has " + std::to_string(model_->num_classes()) +
                                                   " classes but the dataset has " +
                                                   std::to_string(data_->data().num_classes()));
  }

  void run(isp::RunContext& ctx) override {
    if (!opt_.init_from.empty()) isp::CheckpointReader(opt_.init_from).module("model", *model_);
    isp::Classifier c{model_.get(), [m = model_.get()](const at::Tensor& x) { return m->forward(x); }};
    ctx.summary = isp::fit_classifier(c, data_->data(), opt_, ctx);
    // A copy Python reads with torch.load() as a plain {name: tensor} dict.
    isp::save_state_dict_for_python(*model_, ctx.stage_dir + "/weights_state_dict.pt");
    ctx.summary["parameters"] = static_cast<int64_t>(count_parameters());
  }

  void restore(isp::RunContext& ctx) override {
    isp::CheckpointReader(ctx.stage_dir + "/final.pt").module("model", *model_);
    model_->to(ctx.device);
  }

 private:
  std::size_t count_parameters() const {
    std::size_t n = 0;
    for (const auto& p : model_->parameters()) n += static_cast<std::size_t>(p.numel());
    return n;
  }
  TrainClassifierOptions opt_;
  std::shared_ptr<isp::Backbone> model_;
  std::shared_ptr<isp::Dataset> data_;
};

std::shared_ptr<isp::Stage> make_stage(const TrainClassifierOptions& o, isp::BuildContext& ctx) {
  return std::make_shared<TrainClassifier>(o, ctx);
}

}  // namespace

ISP_PLUGIN("0.1.0");
ISP_REGISTER(isp::Stage, "TrainClassifier", 1, TrainClassifierOptions, make_stage,
             "train a backbone with SGD + MultiStep/cosine LR; model selection on the validation split");
