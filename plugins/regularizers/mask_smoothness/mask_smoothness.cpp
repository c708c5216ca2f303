// Regularizer "MaskSmoothness" (docs/method.md §1c step 6), on the sampled mask s [n,1,H,W]:
//   S = [ sum (s_{i+1,j} - s_{i,j})^2 + sum (s_{i,j+1} - s_{i,j})^2
//         + border * sum_n (||row 0||^2 + ||row H-1||^2 + ||col 0||^2 + ||col W-1||^2) ] / (2 n)
// (corner pixels enter the border term twice; sums over the batch, divided by twice the batch size).
#include <ATen/ATen.h>

#include <memory>
#include <string>

#include "isp/interfaces/regularizer.h"
#include "isp/registry/plugin.h"

namespace {

struct MaskSmoothnessOptions {
  double weight = 0.001;
  double border = 0.3;
  template <class V> void visit(V& v) {
    v("weight", weight, "lambda_2 (CIFAR 0.001, ImageNet 0.0001)", isp::at_least(0.0));
    v("border", border, "coefficient of the squared mask values on the image border", isp::at_least(0.0));
  }
};

class MaskSmoothness : public isp::Regularizer {
 public:
  explicit MaskSmoothness(const MaskSmoothnessOptions& o) : isp::Regularizer(o.weight), opt_(o) {}
  at::Tensor compute(const isp::LossInputs& in) override {
    const at::Tensor& s = isp::require_input(in.mask, term(), "a sampled mask");
    if (s.dim() != 4) throw isp::Error("regularizer 'smoothness' expects a mask [n,1,H,W]");
    const int64_t n = s.size(0), h = s.size(2), w = s.size(3);
    at::Tensor dv = s.narrow(2, 1, h - 1) - s.narrow(2, 0, h - 1);
    at::Tensor dh = s.narrow(3, 1, w - 1) - s.narrow(3, 0, w - 1);
    at::Tensor edge = s.select(2, 0).pow(2).sum() + s.select(2, h - 1).pow(2).sum() + s.select(3, 0).pow(2).sum() +
                      s.select(3, w - 1).pow(2).sum();
    return (dv.pow(2).sum() + dh.pow(2).sum() + opt_.border * edge) / (2.0 * static_cast<double>(n));
  }
  std::string term() const override { return "smoothness"; }

 private:
  MaskSmoothnessOptions opt_;
};

std::shared_ptr<isp::Regularizer> make_mask_smoothness(const MaskSmoothnessOptions& o, isp::BuildContext&) {
  return std::make_shared<MaskSmoothness>(o);
}

}  // namespace

ISP_PLUGIN("0.1.0");
ISP_REGISTER(isp::Regularizer, "MaskSmoothness", 1, MaskSmoothnessOptions, make_mask_smoothness,
             "squared differences of neighbouring mask pixels plus a weighted border term, / (2 n)");
