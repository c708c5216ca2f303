// SyncBatchNorm for data-parallel runs (runtime.dist_sync_batchnorm, isp/distributed.h): a training-mode
// BatchNorm whose batch statistics are those of the global batch, as torch.nn.SyncBatchNorm computes them.
//
// Forward: every rank's per-channel sum, sum of squares and count are added over the ranks (one allreduce), giving
// the global mean and biased variance; the running statistics take the unbiased variance, as BatchNorm does.
// Backward: the gradient reaching a rank's input also flows through the global statistics, so the per-channel
// sums of dy and dy·(x − mean) are added over the ranks (one more allreduce):
//   dx = (dy − Σdy / n − (x − mean) · invstd² · Σdy(x − mean) / n) · invstd · γ
// with n the global count. dγ and dβ stay local: the optimizer averages them over the ranks like every gradient.
// With it, W processes give the one-process result up to rounding (tests/test_distributed.cpp).
#include <torch/nn/modules/batchnorm.h>
#include <torch/autograd.h>

#include "isp/distributed.h"

namespace isp {
namespace dist {

namespace {

using torch::autograd::AutogradContext;
using torch::autograd::variable_list;

at::Tensor per_channel(const at::Tensor& t) { return t.view({1, -1, 1, 1}); }

class SyncBatchNormFunction : public torch::autograd::Function<SyncBatchNormFunction> {
 public:
  static at::Tensor forward(AutogradContext* ctx, const at::Tensor& x, const at::Tensor& weight, const at::Tensor& bias,
                            at::Tensor running_mean, at::Tensor running_var, double eps, double momentum) {
    const int64_t C = x.size(1);
    const double local_n = static_cast<double>(x.numel() / C);
    const at::Tensor xd = x.to(at::kDouble);
    // [sum, sum of squares, count] per channel, in double: the one-pass variance needs it.
    at::Tensor stats = at::stack({xd.sum({0, 2, 3}), (xd * xd).sum({0, 2, 3}), at::full({C}, local_n, xd.options())});
    allreduce_sum(stats, "SyncBatchNorm statistics");
    const at::Tensor n = stats[2];
    const at::Tensor mean = stats[0] / n;
    const at::Tensor var = (stats[1] / n - mean * mean).clamp_min(0);
    const at::Tensor invstd = at::rsqrt(var + eps);
    if (running_mean.defined()) {
      at::NoGradGuard ng;
      running_mean.mul_(1 - momentum).add_(mean.to(running_mean.scalar_type()), momentum);
      running_var.mul_(1 - momentum).add_((var * n / (n - 1).clamp_min(1)).to(running_var.scalar_type()), momentum);
    }
    const at::Tensor mean_f = mean.to(x.scalar_type()), invstd_f = invstd.to(x.scalar_type());
    at::Tensor scale = weight.defined() ? invstd_f * weight : invstd_f;
    at::Tensor y = (x - per_channel(mean_f)) * per_channel(scale);
    if (bias.defined()) y = y + per_channel(bias);
    ctx->save_for_backward({x, weight, mean_f, invstd_f});
    ctx->saved_data["n"] = n[0].item<double>();
    ctx->saved_data["has_bias"] = bias.defined();
    return y;
  }

  static variable_list backward(AutogradContext* ctx, variable_list grads) {
    const auto saved = ctx->get_saved_variables();
    const at::Tensor &x = saved[0], &weight = saved[1], &mean = saved[2], &invstd = saved[3];
    const double n = ctx->saved_data["n"].toDouble();
    const at::Tensor g = grads[0].contiguous();
    const at::Tensor xmu = x - per_channel(mean);
    const at::Tensor sum_dy = g.sum({0, 2, 3}), sum_dy_xmu = (g * xmu).sum({0, 2, 3});
    at::Tensor global = at::stack({sum_dy, sum_dy_xmu}).to(at::kDouble);
    allreduce_sum(global, "SyncBatchNorm gradient sums");
    const at::Tensor g_sum_dy = global[0].to(x.scalar_type()), g_sum_dy_xmu = global[1].to(x.scalar_type());
    const at::Tensor scale = weight.defined() ? invstd * weight : invstd;
    const at::Tensor dx = (g - per_channel(g_sum_dy / n) - xmu * per_channel(invstd * invstd * g_sum_dy_xmu / n)) *
                          per_channel(scale);
    at::Tensor dweight = weight.defined() ? sum_dy_xmu * invstd : at::Tensor();
    at::Tensor dbias = ctx->saved_data["has_bias"].toBool() ? sum_dy : at::Tensor();
    return {dx, dweight, dbias, at::Tensor(), at::Tensor(), at::Tensor(), at::Tensor()};
  }
};

}  // namespace

bool sync_batchnorm_applies(const torch::nn::BatchNorm2dImpl& bn) {
  return active() && settings().sync_batchnorm && bn.is_training();
}

at::Tensor sync_batch_norm(const at::Tensor& x, torch::nn::BatchNorm2dImpl& bn) {
  double momentum = 0.1;
  const bool track = bn.options.track_running_stats() && bn.running_mean.defined();
  if (track && bn.num_batches_tracked.defined()) {
    at::NoGradGuard ng;
    bn.num_batches_tracked.add_(1);
  }
  if (bn.options.momentum()) momentum = *bn.options.momentum();
  else if (track) momentum = 1.0 / static_cast<double>(bn.num_batches_tracked.item<int64_t>());  // cumulative average
  return SyncBatchNormFunction::apply(x, bn.weight, bn.options.affine() ? bn.bias : at::Tensor(),
                                      track ? bn.running_mean : at::Tensor(), track ? bn.running_var : at::Tensor(),
                                      bn.options.eps(), momentum);
}

}  // namespace dist
}  // namespace isp
