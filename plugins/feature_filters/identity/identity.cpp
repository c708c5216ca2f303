// Feature filter "IdentityFilter": returns the features unchanged (ablation of the class embedding). The
// `encoder` option is accepted for uniformity with ClassEmbeddingFilter and is not built.
#include <memory>

#include "isp/interfaces/aem.h"
#include "isp/registry/plugin.h"

namespace {

struct IdentityFilterOptions {
  isp::NodeRef encoder;
  template <class V> void visit(V& v) {
    v("encoder", encoder, "optional; accepted for uniformity with ClassEmbeddingFilter and ignored",
      isp::of_kind("backbone"));
  }
};

class IdentityFilter : public isp::FeatureFilter {
 public:
  at::Tensor forward(const at::Tensor& features, const at::Tensor&) override { return features; }
};

std::shared_ptr<isp::FeatureFilter> make_identity(const IdentityFilterOptions&, isp::BuildContext&) {
  return std::make_shared<IdentityFilter>();
}

}  // namespace

ISP_PLUGIN("0.1.0");
ISP_REGISTER(isp::FeatureFilter, "IdentityFilter", 1, IdentityFilterOptions, make_identity,
             "no feature filtering (returns the deepest scale unchanged)");
