// Folding an eval-mode BatchNorm into the convolution before it (isp/interfaces/backbone.h, ConvBatchNorm).
#include <ATen/ATen.h>
#include <c10/core/GradMode.h>
#include <c10/core/InferenceMode.h>
#include <torch/nn/modules/batchnorm.h>
#include <torch/nn/modules/conv.h>

#include <atomic>

#include "isp/distributed.h"
#include "isp/interfaces/backbone.h"

namespace isp {
namespace {

std::atomic<bool> g_folding{true};

bool wants_grad(const at::Tensor& t) { return t.defined() && t.requires_grad(); }

// The conv options hold c10::variant in LibTorch 1.13 and std::variant in 2.x: let overload resolution pick.
template <class T, class Variant>
const T* alternative(const Variant& v) {
  using namespace std;
  using namespace c10;
  return get_if<T>(&v);
}

}  // namespace

void set_batchnorm_folding(bool on) { g_folding = on; }
bool batchnorm_folding() { return g_folding; }

at::Tensor ConvBatchNorm::operator()(torch::nn::Conv2dImpl& conv, torch::nn::BatchNorm2dImpl& bn,
                                     const at::Tensor& x) {
  const auto& co = conv.options;
  const auto* padding = alternative<torch::ExpandingArray<2>>(co.padding());
  const bool foldable =
      g_folding && !bn.is_training() && bn.options.track_running_stats() && bn.running_mean.defined() &&
      bn.running_var.defined() && padding != nullptr && alternative<torch::enumtype::kZeros>(co.padding_mode()) != nullptr &&
      !(c10::GradMode::is_enabled() &&
        (wants_grad(conv.weight) || wants_grad(conv.bias) || wants_grad(bn.weight) || wants_grad(bn.bias)));
  last_folded_ = foldable;
  if (!foldable) {
    const at::Tensor y = conv.forward(x);
    return dist::sync_batchnorm_applies(bn) ? dist::sync_batch_norm(y, bn) : bn.forward(y);
  }

  // Folded afresh on every call, a few small kernels over the weights. A cache keyed on the tensors' version
  // counters served stale folds: BN running statistics are updated inside the batch_norm kernel and optimizer
  // steps write through the flat parameter buffer (isp/optim.h), and neither bumps those counters.
  at::Tensor weight, bias;
  {
    // Ordinary tensors even under inference mode: the folded weight may take part in a computation that
    // autograd records (gate learning differentiates through a frozen network to its gates).
    c10::InferenceMode normal_tensors(false);
    c10::NoGradGuard no_grad;
    const at::Tensor& w = conv.weight;
    const at::Tensor scale = bn.weight.defined() ? bn.weight * at::rsqrt(bn.running_var + bn.options.eps())
                                                 : at::rsqrt(bn.running_var + bn.options.eps());
    weight = (w * scale.view({-1, 1, 1, 1})).contiguous(w.suggest_memory_format());
    bias = conv.bias.defined() ? (conv.bias - bn.running_mean) * scale : -bn.running_mean * scale;
    if (bn.bias.defined()) bias = bias + bn.bias;
  }
  return at::conv2d(x, weight, bias, co.stride(), *padding, co.dilation(), co.groups());
}

}  // namespace isp
