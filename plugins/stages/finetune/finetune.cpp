// Stage "Finetune" (docs/method.md §1f): SGD training of a pruned network from its inherited weights. It
// trains its own copy and hands on a PrunedNetwork with the same kept channels and one more lineage entry.
#include <torch/nn/module.h>

#include "isp/artifacts.h"
#include "isp/checkpoint.h"
#include "isp/interfaces/dataset.h"
#include "isp/registry/plugin.h"
#include "isp/registry/recipe.h"
#include "isp/train.h"

namespace {

struct FinetuneOptions : isp::SgdScheduleOptions {
  isp::NodeRef pruned, data;
  template <class V> void visit(V& v) {
    v("pruned", pruned, "the stage whose pruned network is finetuned (PruneChannels or another Finetune)",
      isp::required(), isp::of_kind("stage"));
    v("data", data, "the dataset", isp::required(), isp::of_kind("dataset"));
    isp::SgdScheduleOptions::visit(v);
  }
};

class Finetune : public isp::Stage {
 public:
  Finetune(FinetuneOptions o, isp::BuildContext& ctx)
      : opt_(std::move(o)), source_(isp::stage_input<isp::PrunedNetwork>(ctx, opt_.pruned)),
        data_(ctx.get<isp::Dataset>(opt_.data)) {}

  const char* produces() const override { return isp::PrunedNetwork::kType; }

  void run(isp::RunContext& ctx) override {
    auto net = isp::clone_backbone(*source_->network);
    isp::Classifier c{net.get(), [m = net.get()](const at::Tensor& x) { return m->forward(x); }};
    ctx.summary = isp::fit_classifier(c, data_->data(), opt_, ctx);
    ctx.summary["finetuned_top1"] = ctx.summary["test_top1"];
    isp::write_file_atomic(ctx.stage_dir + "/result.json", ctx.summary.dump(2) + "\n");
    publish_network(net, ctx.summary, ctx);
  }

  void restore(isp::RunContext& ctx) override {
    auto net = isp::clone_backbone(*source_->network);
    isp::CheckpointReader(ctx.stage_dir + "/final.pt").module("model", *net);
    net->to(ctx.device);
    publish_network(net, isp::json::parse(isp::read_text_file(ctx.stage_dir + "/result.json")), ctx);
  }

 private:
  void publish_network(std::shared_ptr<isp::Backbone> net, isp::json metrics, const isp::RunContext& ctx) {
    auto a = std::make_shared<isp::PrunedNetwork>(*source_.get());
    net->eval();
    a->network = std::move(net);
    a->lineage.push_back({ctx.stage_name, ctx.stage_type, std::move(metrics)});
    publish(a);
  }
  FinetuneOptions opt_;
  isp::StageInput<isp::PrunedNetwork> source_;
  std::shared_ptr<isp::Dataset> data_;
};

std::shared_ptr<isp::Stage> make(const FinetuneOptions& o, isp::BuildContext& ctx) { return std::make_shared<Finetune>(o, ctx); }

}  // namespace

ISP_PLUGIN("0.2.0");
ISP_REGISTER(isp::Stage, "Finetune", 1, FinetuneOptions, make,
             "finetune a pruned network from inherited weights (SGD, MultiStep/cosine)");
