// Stage "TrainClassifier": supervised training of a backbone (docs/method.md §1a). The stage trains its own
// freshly initialised instance of the `model` architecture and publishes it as a TrainedClassifier.
#include <torch/nn/module.h>

#include "isp/artifacts.h"
#include "isp/checkpoint.h"
#include "isp/interfaces/dataset.h"
#include "isp/registry/plugin.h"
#include "isp/registry/recipe.h"
#include "isp/train.h"

namespace {

struct TrainClassifierOptions : isp::SgdScheduleOptions {
  isp::NodeRef model, data;
  std::string init_from;  // optional checkpoint to start from
  TrainClassifierOptions() {}
  template <class V> void visit(V& v) {
    v("model", model, "the backbone architecture to train ({\"$ref\": node})", isp::required(), isp::of_kind("backbone"));
    v("data", data, "the dataset ({\"$ref\": node})", isp::required(), isp::of_kind("dataset"));
    v("init_from", init_from, "start from these weights instead of random ones: an isp checkpoint (module 'model') or "
      "a state dict saved by Python's torch.save(model.state_dict()) with this backbone's names");
    isp::SgdScheduleOptions::visit(v);
  }
};

class TrainClassifier : public isp::Stage {
 public:
  TrainClassifier(TrainClassifierOptions o, isp::BuildContext& ctx)
      : opt_(std::move(o)), architecture_(ctx.get<isp::Backbone>(opt_.model)), data_(ctx.get<isp::Dataset>(opt_.data)) {
    if (data_->data().num_classes() != architecture_->num_classes())
      throw isp::RecipeError(opt_.model.where, "the backbone has " + std::to_string(architecture_->num_classes()) +
                                                   " classes but the dataset has " +
                                                   std::to_string(data_->data().num_classes()));
    if (opt_.epochs == 0 && opt_.init_from.empty()) {
      isp::Where w = opt_.model.where;  // .../model -> .../epochs
      w.pointer = w.pointer.substr(0, w.pointer.rfind('/')) + "/epochs";
      throw isp::RecipeError(w, "0 epochs keeps the initial weights: set init_from (pretrained weights) too");
    }
    // The FLOPs count and the AEM's mask grid follow the backbone's input size: it must be the images' size.
    const at::Tensor& images = data_->data().train.images;
    if (images.defined() && images.dim() == 4 && images.size(2) != architecture_->input_size())
      throw isp::RecipeError(opt_.model.where, "the backbone's input_size is " + std::to_string(architecture_->input_size()) +
                                                   " but the dataset's images are " + std::to_string(images.size(2)) + "x" +
                                                   std::to_string(images.size(3)) + " (set the backbone's input_size)");
    const isp::ComponentRecord* rec = ctx.record_of(architecture_.get());
    backbone_type_ = rec ? rec->type : std::string();
  }

  const char* produces() const override { return isp::TrainedClassifier::kType; }
  std::shared_ptr<const isp::Artifact> planned() const override {
    auto a = std::make_shared<isp::TrainedClassifier>();
    a->network = architecture_;
    a->backbone_type = backbone_type_;
    return a;
  }

  void run(isp::RunContext& ctx) override {
    auto net = architecture_->with_widths({});  // this stage's own network, initialised under its seed
    if (!opt_.init_from.empty()) {
      if (isp::is_python_state_dict_file(opt_.init_from)) isp::load_state_dict_from_python(*net, opt_.init_from);
      else isp::CheckpointReader(opt_.init_from).module("model", *net);
    }
    isp::Classifier c{net.get(), [m = net.get()](const at::Tensor& x) { return m->forward(x); }};
    ctx.summary = isp::fit_classifier(c, data_->data(), opt_, ctx);
    // A copy Python reads with torch.load() as a plain {name: tensor} dict.
    isp::save_state_dict_for_python(*net, ctx.stage_dir + "/weights_state_dict.pt");
    int64_t n = 0;
    for (const auto& p : net->parameters()) n += p.numel();
    ctx.summary["parameters"] = n;
    isp::write_file_atomic(ctx.stage_dir + "/result.json", ctx.summary.dump(2) + "\n");
    publish_network(net, ctx.summary);
  }

  void restore(isp::RunContext& ctx) override {
    auto net = architecture_->with_widths({});
    isp::CheckpointReader(ctx.stage_dir + "/final.pt").module("model", *net);
    net->to(ctx.device);
    publish_network(net, isp::json::parse(isp::read_text_file(ctx.stage_dir + "/result.json")));
  }

 private:
  void publish_network(std::shared_ptr<isp::Backbone> net, isp::json metrics) {
    auto a = std::make_shared<isp::TrainedClassifier>();
    net->eval();
    a->network = std::move(net);
    a->backbone_type = backbone_type_;
    a->metrics = std::move(metrics);
    publish(a);
  }
  TrainClassifierOptions opt_;
  std::shared_ptr<isp::Backbone> architecture_;
  std::shared_ptr<isp::Dataset> data_;
  std::string backbone_type_;
};

std::shared_ptr<isp::Stage> make_stage(const TrainClassifierOptions& o, isp::BuildContext& ctx) {
  return std::make_shared<TrainClassifier>(o, ctx);
}

}  // namespace

ISP_PLUGIN("0.2.0");
ISP_REGISTER(isp::Stage, "TrainClassifier", 1, TrainClassifierOptions, make_stage,
             "train a backbone with SGD + MultiStep/cosine LR; model selection on the validation split");
