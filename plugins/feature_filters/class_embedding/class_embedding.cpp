// Feature filter "ClassEmbeddingFilter" (supplement Eq. 13, docs/method.md §2.3): a class embedding
// C = Embedding(num_classes, C_last) with N(0,1) init; for features X [n,C,h,w] and labels y [n],
//   a_ij = sum_c X_c,ij * C_{y,c},   Z = X * sigmoid(a)
// (one attenuation per location, broadcast over channels). num_classes and C_last come from the encoder.
#include <torch/nn/modules/embedding.h>
#include <torch/nn/init.h>

#include <memory>
#include <string>

#include "isp/interfaces/aem.h"
#include "isp/interfaces/backbone.h"
#include "isp/registry/plugin.h"

namespace {

struct ClassEmbeddingFilterOptions {
  isp::NodeRef encoder;
  template <class V> void visit(V& v) {
    v("encoder", encoder, "the backbone whose deepest scale is filtered (gives C_last and num_classes)",
      isp::required(), isp::of_kind("backbone"));
  }
};

class ClassEmbeddingFilter : public isp::FeatureFilter {
 public:
  ClassEmbeddingFilter(int64_t num_classes, int64_t channels) : channels_(channels) {
    embedding = register_module("embedding", torch::nn::Embedding(num_classes, channels));
    torch::NoGradGuard ng;
    torch::nn::init::normal_(embedding->weight, 0.0, 1.0);
  }

  at::Tensor forward(const at::Tensor& features, const at::Tensor& labels) override {
    if (features.dim() != 4 || features.size(1) != channels_)
      throw isp::Error("ClassEmbeddingFilter: expected features [n," + std::to_string(channels_) +
                       ",h,w], got " + std::to_string(features.dim()) + "-d tensor with " +
                       (features.dim() > 1 ? std::to_string(features.size(1)) : std::string("?")) + " channels");
    if (!labels.defined() || labels.dim() != 1 || labels.size(0) != features.size(0))
      throw isp::Error("ClassEmbeddingFilter: expected labels [n] matching the batch of the features");
    at::Tensor c = embedding->forward(labels.to(features.device(), at::kLong)).to(features.scalar_type());
    at::Tensor a = (features * c.view({c.size(0), c.size(1), 1, 1})).sum(1, /*keepdim=*/true);
    return features * at::sigmoid(a);
  }

  torch::nn::Embedding embedding{nullptr};

 private:
  int64_t channels_;
};

std::shared_ptr<isp::FeatureFilter> make_class_embedding(const ClassEmbeddingFilterOptions& o, isp::BuildContext& ctx) {
  auto enc = ctx.get<isp::Backbone>(o.encoder);
  const auto ch = enc->feature_channels();
  if (ch.empty()) throw isp::RecipeError(o.encoder.where, "the encoder exposes no feature scales");
  return std::make_shared<ClassEmbeddingFilter>(enc->num_classes(), ch.back());
}

}  // namespace

ISP_PLUGIN("0.1.0");
ISP_REGISTER(isp::FeatureFilter, "ClassEmbeddingFilter", 1, ClassEmbeddingFilterOptions, make_class_embedding,
             "class-conditioned attenuation Z = X * sigmoid(X^T C_y) of the deepest encoder scale "
             "(supplement Eq. 13)");
