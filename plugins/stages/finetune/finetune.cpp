// Stage "Finetune" (isp-spec §1f): SGD training of the extracted network from its inherited weights.
#include <torch/nn/module.h>

#include "isp/checkpoint.h"
#include "isp/interfaces/backbone.h"
#include "isp/interfaces/stage.h"
#include "isp/plugin.h"
#include "isp/registry.h"
#include "isp/train.h"

namespace {

struct FinetuneOptions : isp::SgdScheduleOptions {
  isp::NodeRef pruned, data;
  template <class V> void visit(V& v) {
    v("pruned", pruned, "the stage that produced the pruned network (PruneChannels)", isp::required(), isp::of_kind("stage"));
    v("data", data, "the dataset", isp::required(), isp::of_kind("dataset"));
    isp::SgdScheduleOptions::visit(v);
  }
};

class Finetune : public isp::Stage {
 public:
  Finetune(FinetuneOptions o, isp::BuildContext& ctx)
      : opt_(std::move(o)), source_(ctx.get<isp::Stage>(opt_.pruned)), data_(ctx.get<isp::Dataset>(opt_.data)) {}

  std::shared_ptr<torch::nn::Module> model() override { return net_; }
  isp::json outputs() const override { return source_->outputs(); }

  void run(isp::RunContext& ctx) override {
    take_network();
    isp::Classifier c{net_.get(), [m = net_.get()](const at::Tensor& x) { return m->forward(x); }};
    ctx.summary = isp::fit_classifier(c, data_->data(), opt_, ctx);
    ctx.summary["finetuned_top1"] = ctx.summary["test_top1"];
  }
  void restore(isp::RunContext& ctx) override {
    take_network();
    isp::CheckpointReader(ctx.stage_dir + "/final.pt").module("model", *net_);
    net_->to(ctx.device);
  }

 private:
  void take_network() {
    net_ = std::dynamic_pointer_cast<isp::Backbone>(source_->model());
    if (!net_) throw isp::RecipeError(opt_.pruned.where, "the referenced stage has produced no network yet (is it a PruneChannels stage listed earlier?)");
  }
  FinetuneOptions opt_;
  std::shared_ptr<isp::Stage> source_;
  std::shared_ptr<isp::Dataset> data_;
  std::shared_ptr<isp::Backbone> net_;
};

std::shared_ptr<isp::Stage> make(const FinetuneOptions& o, isp::BuildContext& ctx) { return std::make_shared<Finetune>(o, ctx); }

}  // namespace

ISP_PLUGIN("0.1.0");
ISP_REGISTER(isp::Stage, "Finetune", 1, FinetuneOptions, make,
             "finetune the extracted network from inherited weights (SGD, MultiStep/cosine)");
