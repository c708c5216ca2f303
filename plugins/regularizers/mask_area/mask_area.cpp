// Regularizer "MaskArea" (docs/method.md §1c step 5): A_i = mean over pixels of (s + eps)^power, averaged over the
// batch (the "||m||_0" relaxation; mean over the H*W pixels, not a sum). Computed on the sampled mask s
// (`on` = "sample", official) or on the probabilities P (`on` = "probs").
#include <ATen/ATen.h>

#include <memory>
#include <string>

#include "isp/interfaces/regularizer.h"
#include "isp/registry/plugin.h"

namespace {

struct MaskAreaOptions {
  double weight = 0.2;
  double power = 0.3;
  double eps = 0.0005;
  std::string on = "sample";
  template <class V> void visit(V& v) {
    v("weight", weight, "lambda_1 (CIFAR 0.2, ImageNet 1.0)", isp::at_least(0.0));
    v("power", power, "exponent of (s + eps)", isp::greater_than(0.0));
    v("eps", eps, "offset added before the power", isp::at_least(0.0));
    v("on", on, "penalise the sampled mask s or the probabilities P", isp::one_of({"sample", "probs"}));
  }
};

class MaskArea : public isp::Regularizer {
 public:
  explicit MaskArea(const MaskAreaOptions& o) : isp::Regularizer(o.weight), opt_(o) {}
  at::Tensor compute(const isp::LossInputs& in) override {
    const at::Tensor& m = opt_.on == "probs" ? isp::require_input(in.probs, term(), "the mask probabilities")
                                             : isp::require_input(in.mask, term(), "a sampled mask");
    at::Tensor per_image = (m + opt_.eps).pow(opt_.power).flatten(1).mean(1);
    return per_image.mean();
  }
  std::string term() const override { return "area"; }

 private:
  MaskAreaOptions opt_;
};

std::shared_ptr<isp::Regularizer> make_mask_area(const MaskAreaOptions& o, isp::BuildContext&) {
  return std::make_shared<MaskArea>(o);
}

}  // namespace

ISP_PLUGIN("0.1.0");
ISP_REGISTER(isp::Regularizer, "MaskArea", 1, MaskAreaOptions, make_mask_area,
             "mask area mean((s + eps)^power) per image, averaged over the batch");
