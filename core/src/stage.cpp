// Stages and their typed results: publishing, linking a stage option to an earlier stage's artifact, and the
// pruned-network artifact's derived views.
#include "isp/artifacts.h"

#include <torch/torch.h>

namespace isp {

Stage::~Stage() = default;
Artifact::~Artifact() = default;
Interrupted::~Interrupted() = default;

void Stage::publish(std::shared_ptr<const Artifact> a) {
  if (!a) throw Error("a stage published no artifact");
  if (std::string(a->type()) != produces())
    throw Error(std::string("a stage that promised a ") + produces() + " published a " + a->type());
  result_ = std::move(a);
}

std::shared_ptr<Stage> linked_stage(BuildContext& ctx, const NodeRef& ref, const char* expected_type) {
  const std::string node = BuildContext::ref_name(ref.spec);
  if (node.empty())
    throw RecipeError(ref.where, std::string("expected {\"$ref\": \"<stage node>\"}: a link to the earlier stage whose ") +
                                     expected_type + " this stage takes");
  auto stage = ctx.get<Stage>(ref);
  if (std::string(stage->produces()) != expected_type)
    throw RecipeError(ref.where, "stage '" + node + "' produces a " + stage->produces() + ", but a " + expected_type +
                                     " is expected here");
  return stage;
}

std::shared_ptr<Backbone> clone_backbone(const Backbone& b) {
  std::shared_ptr<Backbone> copy = b.with_widths(b.widths());
  torch::NoGradGuard ng;
  auto src_p = b.named_parameters(), src_b = b.named_buffers();
  for (auto& p : copy->named_parameters()) p.value().copy_(src_p[p.key()]);
  for (auto& t : copy->named_buffers()) t.value().copy_(src_b[t.key()]);
  auto params = b.parameters();
  if (!params.empty()) copy->to(params.front().device(), params.front().scalar_type());
  copy->train(b.is_training());
  return copy;
}

std::vector<int64_t> PrunedNetwork::widths() const {
  std::vector<int64_t> w;
  for (const auto& k : kept) w.push_back(static_cast<int64_t>(k.size()));
  return w;
}

std::vector<int64_t> PrunedNetwork::full_widths() const {
  std::vector<int64_t> w;
  for (const auto& l : original_layers) w.push_back(l.width);
  return w;
}

json PrunedNetwork::metric(const std::string& key) const {
  json v;
  for (const auto& e : lineage)
    if (e.metrics.contains(key)) v = e.metrics[key];
  return v;
}

json PrunedNetwork::architecture() const {
  json layers = json::array();
  for (std::size_t l = 0; l < original_layers.size() && l < kept.size(); ++l)
    layers.push_back({{"name", original_layers[l].name}, {"width", original_layers[l].width}, {"kept", kept[l]}});
  json spec = network->structure();
  spec["type"] = original ? original->backbone_type : std::string();
  return {{"spec", spec}, {"widths", widths()}, {"full_widths", full_widths()}, {"layers", layers}, {"pruner", pruner}};
}

}  // namespace isp
