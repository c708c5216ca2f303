// Flat-buffer optimizers: see isp/optim.h for why they exist and how they match torch.optim.
#include "isp/optim.h"

#include <ATen/ATen.h>

#include <algorithm>
#include <cstdlib>
#include <c10/core/GradMode.h>
#include <c10/core/impl/LocalDispatchKeySet.h>

#include "isp/distributed.h"
#include "isp/registry/error.h"

namespace isp {

namespace {
// DDP's default bucket size: big enough that per-message latency does not dominate, small enough that the first
// buckets are reduced while the backward pass is still computing the rest.
constexpr int64_t kDistBucketBytes = 25 << 20;

std::string shape_of(const at::Tensor& t) {
  std::string s = "[";
  for (int64_t i = 0; i < t.dim(); ++i) s += (i ? "," : "") + std::to_string(t.size(i));
  return s + "]";
}
}  // namespace

FlatOptimizer::FlatOptimizer(std::vector<at::Tensor> params, double lr) : lr_value_(lr) {
  for (auto& p : params)
    if (p.requires_grad()) params_.push_back(p);
  if (params_.empty()) throw Error("optimizer: no trainable parameters");
  const auto opts = params_[0].options();
  int64_t total = 0;
  for (const auto& p : params_) {
    if (p.device() != opts.device() || p.scalar_type() != opts.dtype().toScalarType())
      throw Error("optimizer: every parameter must share one device and dtype (found " +
                  std::string(c10::toString(p.scalar_type())) + " on " + p.device().str() + " beside " +
                  std::string(c10::toString(opts.dtype().toScalarType())) + " on " + opts.device().str() + ")");
    offsets_.push_back(total);
    // Every parameter starts 256-byte aligned, as a tensor of its own would (cudaMalloc's guarantee): vectorised
    // kernels (cuDNN's NHWC convolutions among them) fault on a misaligned weight. The gaps stay zero.
    const int64_t align = std::max<int64_t>(1, 256 / static_cast<int64_t>(p.element_size()));
    total += (p.numel() + align - 1) / align * align;
    // Keep each parameter's own memory layout (contiguous or channels_last): its view gets these strides.
    const at::Tensor layout = p.is_non_overlapping_and_dense() ? p : p.contiguous();
    strides_.push_back(layout.strides().vec());
  }
  flat_param_ = at::zeros({total}, opts.requires_grad(false));
  flat_grad_ = at::zeros({total}, opts.requires_grad(false));
  lr_ = at::full({}, lr, opts.dtype(at::kDouble).requires_grad(false));
  relink();
  if (dist::active()) {
    // Every rank starts from rank 0's values (they agree anyway when every rank seeded alike; this makes it so),
    // and gradients are averaged in buckets of the flat gradient buffer as the backward pass fills them.
    dist::broadcast({flat_param_}, "initial parameters");
    const char* env = std::getenv("ISP_DIST_BUCKET_BYTES");  // tests: small buckets on small models
    const int64_t cap = env ? std::max<int64_t>(256, std::atoll(env)) : kDistBucketBytes;
    buckets_ = std::make_unique<dist::GradientBuckets>(params_, offsets_, flat_grad_, cap);
  }
}

FlatOptimizer::~FlatOptimizer() = default;

void FlatOptimizer::sync_gradients() {
  if (buckets_) buckets_->finish();
}

void FlatOptimizer::relink() {
  c10::NoGradGuard ng;
  for (std::size_t i = 0; i < params_.size(); ++i) {
    at::Tensor& p = params_[i];
    const int64_t n = p.numel();
    at::Tensor view = flat_param_.narrow(0, offsets_[i], n).as_strided(p.sizes(), strides_[i]);
    if (p.data_ptr() != view.data_ptr() || p.strides() != view.strides()) {
      view.copy_(p.detach());
      p.set_data(view);
    }
    at::Tensor gview = flat_grad_.narrow(0, offsets_[i], n).as_strided(p.sizes(), strides_[i]);
    if (!p.grad().defined() || p.grad().data_ptr() != gview.data_ptr()) p.mutable_grad() = gview;
  }
}

void FlatOptimizer::zero_grad() { flat_grad_.zero_(); }

void FlatOptimizer::set_lr(double lr) {
  if (lr == lr_value_) return;
  lr_value_ = lr;
  lr_.fill_(lr);
}

std::vector<std::pair<std::string, at::Tensor>> FlatOptimizer::state() const {
  auto s = state_;
  s.emplace_back("lr", lr_);
  return s;
}

void FlatOptimizer::load_state(const std::vector<std::pair<std::string, at::Tensor>>& saved) {
  c10::NoGradGuard ng;
  for (const auto& [name, t] : state()) {
    const at::Tensor* src = nullptr;
    for (const auto& [n2, t2] : saved)
      if (n2 == name) src = &t2;
    if (!src) throw Error("optimizer state has no entry '" + name + "'");
    if (src->sizes() != t.sizes())
      throw Error("optimizer state '" + name + "' has shape " + shape_of(*src) + ", expected " + shape_of(t) +
                  " (a different network or parameter set)");
    at::Tensor dst = t;
    dst.copy_(*src);
  }
  lr_value_ = lr_.item<double>();
}

// --------------------------------------------------------------------------------------------------- SGD

FlatSgd::FlatSgd(std::vector<at::Tensor> params, const FlatSgdOptions& o) : FlatOptimizer(std::move(params), o.lr), o_(o) {
  if (o_.momentum > 0) {
    momentum_ = at::zeros_like(flat_param_);
    add_state("momentum_buffer", momentum_);
  }
}

// Updates run in the parameters' own precision even inside a bfloat16 autocast region.
#define ISP_NO_AUTOCAST c10::impl::ExcludeDispatchKeyGuard no_autocast(c10::autocast_dispatch_keyset)

void FlatSgd::step() {
  sync_gradients();
  c10::NoGradGuard ng;
  ISP_NO_AUTOCAST;
  at::Tensor d = o_.weight_decay != 0 ? flat_grad_.add(flat_param_, o_.weight_decay) : flat_grad_;
  if (o_.momentum > 0) {
    // torch.optim.SGD starts the buffer as a copy of the first gradient: momentum·0 + d is the same.
    momentum_.mul_(o_.momentum).add_(d);
    d = o_.nesterov ? d.add(momentum_, o_.momentum) : momentum_;
  }
  flat_param_.sub_(d * lr_.to(d.scalar_type()));
}

// -------------------------------------------------------------------------------------------------- Adam

FlatAdam::FlatAdam(std::vector<at::Tensor> params, const FlatAdamOptions& o) : FlatOptimizer(std::move(params), o.lr), o_(o) {
  exp_avg_ = at::zeros_like(flat_param_);
  exp_avg_sq_ = at::zeros_like(flat_param_);
  step_ = at::zeros({}, lr_.options());
  add_state("exp_avg", exp_avg_);
  add_state("exp_avg_sq", exp_avg_sq_);
  add_state("step", step_);
}

void FlatAdam::step() {
  sync_gradients();
  c10::NoGradGuard ng;
  ISP_NO_AUTOCAST;
  step_.add_(1);
  at::Tensor g = flat_grad_;
  if (o_.weight_decay != 0) {
    if (o_.decoupled_weight_decay) flat_param_.mul_((1.0 - lr_ * o_.weight_decay).to(flat_param_.scalar_type()));
    else g = g.add(flat_param_, o_.weight_decay);
  }
  exp_avg_.mul_(o_.beta1).add_(g, 1.0 - o_.beta1);
  exp_avg_sq_.mul_(o_.beta2).addcmul_(g, g, 1.0 - o_.beta2);
  // Bias corrections from the device step count: nothing is read back, a captured graph stays correct.
  const at::Tensor bc1 = 1.0 - at::pow(o_.beta1, step_);
  const at::Tensor bc2 = 1.0 - at::pow(o_.beta2, step_);
  at::Tensor denom = (exp_avg_sq_.sqrt() / bc2.sqrt().to(exp_avg_sq_.scalar_type())).add_(o_.eps);
  flat_param_.sub_((exp_avg_ / denom).mul_((lr_ / bc1).to(flat_param_.scalar_type())));
}

}  // namespace isp
