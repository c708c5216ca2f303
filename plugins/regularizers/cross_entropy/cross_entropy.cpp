// "CrossEntropyTerm": the classification loss of the gated network (the official --c_loss switch, off by
// default there; docs/method.md §3.3 and §6.3).
#include <ATen/ATen.h>

#include "isp/interfaces/regularizer.h"
#include "isp/registry/plugin.h"

namespace {
struct CrossEntropyOptions {
  double weight = 1.0;
  template <class V> void visit(V& v) { v("weight", weight, "term weight (w_ce)", isp::at_least(0)); }
};
class CrossEntropyTerm : public isp::Regularizer {
 public:
  explicit CrossEntropyTerm(CrossEntropyOptions o) : isp::Regularizer(o.weight), o_(o) {}
  at::Tensor compute(const isp::LossInputs& in) override {
    const auto& logits = isp::require_input(in.logits, term(), "classifier logits");
    const auto& labels = isp::require_input(in.labels, term(), "labels");
    return at::cross_entropy_loss(logits, labels);
  }
  std::string term() const override { return "ce"; }
 private:
  CrossEntropyOptions o_;
};
std::shared_ptr<isp::Regularizer> make(const CrossEntropyOptions& o, isp::BuildContext&) {
  return std::make_shared<CrossEntropyTerm>(o);
}
}  // namespace

ISP_PLUGIN("0.1.0");
ISP_REGISTER(isp::Regularizer, "CrossEntropyTerm", 1, CrossEntropyOptions, make, "cross-entropy of the gated classifier");
