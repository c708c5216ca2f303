// Folding an eval-mode BatchNorm into the convolution before it (isp/interfaces/backbone.h, ConvBatchNorm).
#include <ATen/ATen.h>
#include <c10/core/GradMode.h>
#include <c10/core/InferenceMode.h>
#include <torch/nn/modules/batchnorm.h>
#include <torch/nn/modules/conv.h>

#include <atomic>
#include <mutex>
#include <unordered_map>
#include <vector>

#include "isp/distributed.h"
#include "isp/interfaces/backbone.h"
#include "autocast_internal.h"

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

// Folds kept for frozen networks (keep_batchnorm_folds). A kept fold is reused only while it was made from the
// same BN and the same storage of the weight and statistics, on the same device, dtype and memory format.
struct KeptFold {
  const torch::nn::BatchNorm2dImpl* bn = nullptr;
  const void *weight_data = nullptr, *mean_data = nullptr, *var_data = nullptr;
  at::Device device{at::kCPU};
  at::ScalarType dtype = at::kFloat;
  at::MemoryFormat format = at::MemoryFormat::Contiguous;
  at::Tensor weight, bias;
  // The same in autocast's dtype: autocast casts a conv's weight and bias on every call (two kernels per layer in
  // a captured step); a kept fold casts them once. Same values: the same rounding of the same tensors.
  at::ScalarType low = at::ScalarType::Undefined;
  at::Tensor weight_low, bias_low;
};
struct KeptFolds {
  std::mutex mu;
  std::unordered_map<const torch::nn::Conv2dImpl*, int> holders;  // conv -> how many owners keep its fold
  std::unordered_map<const void*, std::vector<const torch::nn::Conv2dImpl*>> owned;
  std::unordered_map<const torch::nn::Conv2dImpl*, KeptFold> folds;
};
KeptFolds& kept() {
  static KeptFolds* k = new KeptFolds;  // never destroyed: plugins' static objects may outlive this library's
  return *k;
}

}  // namespace

void keep_batchnorm_folds(const void* owner, torch::nn::Module& frozen) {
  std::vector<const torch::nn::Conv2dImpl*> convs;
  for (const auto& m : frozen.modules(/*include_self=*/true))
    if (const auto* c = dynamic_cast<const torch::nn::Conv2dImpl*>(m.get())) convs.push_back(c);
  auto& k = kept();
  std::lock_guard<std::mutex> lock(k.mu);
  auto& mine = k.owned[owner];
  for (const auto* c : convs) ++k.holders[c];
  mine.insert(mine.end(), convs.begin(), convs.end());
}

void drop_batchnorm_folds(const void* owner) {
  auto& k = kept();
  std::lock_guard<std::mutex> lock(k.mu);
  auto it = k.owned.find(owner);
  if (it == k.owned.end()) return;
  for (const auto* c : it->second) {
    auto h = k.holders.find(c);
    if (h != k.holders.end() && --h->second <= 0) {
      k.holders.erase(h);
      k.folds.erase(c);
    }
  }
  k.owned.erase(it);
}

std::size_t kept_batchnorm_folds() {
  auto& k = kept();
  std::lock_guard<std::mutex> lock(k.mu);
  return k.folds.size();
}

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
  auto& k = kept();
  if (!foldable) {
    if (bn.is_training()) {  // this forward updates the running statistics: a kept fold would go stale
      std::lock_guard<std::mutex> lock(k.mu);
      if (!k.folds.empty()) k.folds.erase(&conv);
    }
    const at::Tensor y = conv.forward(x);
    return dist::sync_batchnorm_applies(bn) ? dist::sync_batch_norm(y, bn) : bn.forward(y);
  }

  // Folded afresh on every call, a few small kernels over the weights, unless the network is held frozen
  // (keep_batchnorm_folds). A general cache keyed on the tensors' version counters served stale folds: BN running
  // statistics are updated inside the batch_norm kernel and optimizer steps write through the flat parameter
  // buffer (isp/optim.h), and neither bumps those counters. Only the owner of a frozen scope can promise that
  // nothing writes the network meanwhile.
  const at::Tensor& w = conv.weight;
  const auto format = w.suggest_memory_format();
  bool keep = false;
  {
    std::lock_guard<std::mutex> lock(k.mu);
    if (!k.holders.empty() && k.holders.count(&conv)) {
      keep = true;
      auto it = k.folds.find(&conv);
      if (it != k.folds.end()) {
        KeptFold& f = it->second;
        if (f.bn == &bn && f.weight_data == w.data_ptr() && f.mean_data == bn.running_mean.data_ptr() &&
            f.var_data == bn.running_var.data_ptr() && f.device == w.device() && f.dtype == w.scalar_type() &&
            f.format == format) {
          const at::ScalarType low = autocast_dtype_for(x.device().type());
          if (low == at::ScalarType::Undefined || low == f.weight.scalar_type() || x.device() != f.device ||
              !at::isFloatingType(x.scalar_type()))
            return at::conv2d(x, f.weight, f.bias, co.stride(), *padding, co.dilation(), co.groups());
          if (f.low != low) {
            c10::InferenceMode normal_tensors(false);
            c10::NoGradGuard no_grad;
            f.weight_low = f.weight.to(low);
            f.bias_low = f.bias.to(low);
            f.low = low;
          }
          return at::conv2d(x, f.weight_low, f.bias_low, co.stride(), *padding, co.dilation(), co.groups());
        }
      }
    }
  }
  at::Tensor weight, bias;
  {
    // Ordinary tensors even under inference mode: the folded weight may take part in a computation that
    // autograd records (gate learning differentiates through a frozen network to its gates).
    c10::InferenceMode normal_tensors(false);
    c10::NoGradGuard no_grad;
    const at::Tensor scale = bn.weight.defined() ? bn.weight * at::rsqrt(bn.running_var + bn.options.eps())
                                                 : at::rsqrt(bn.running_var + bn.options.eps());
    weight = (w * scale.view({-1, 1, 1, 1})).contiguous(format);
    bias = conv.bias.defined() ? (conv.bias - bn.running_mean) * scale : -bn.running_mean * scale;
    if (bn.bias.defined()) bias = bias + bn.bias;
  }
  if (keep) {
    std::lock_guard<std::mutex> lock(k.mu);
    if (k.holders.count(&conv))
      k.folds[&conv] = KeptFold{&bn, w.data_ptr(), bn.running_mean.data_ptr(), bn.running_var.data_ptr(),
                                w.device(), w.scalar_type(), format, weight, bias};
  }
  return at::conv2d(x, weight, bias, co.stride(), *padding, co.dilation(), co.groups());
}

}  // namespace isp
