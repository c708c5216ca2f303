// Gradient averaging in buckets of a flat gradient buffer, each allreduced as soon as the backward pass has
// filled it (isp/distributed.h: GradientBuckets).
#include <torch/csrc/autograd/function.h>
#include <torch/csrc/autograd/utils/lambda_post_hook.h>
#include <torch/csrc/autograd/variable.h>

#include <ATen/ATen.h>
#include <c10/core/GradMode.h>

#include <algorithm>
#include <mutex>

#include "distributed_internal.h"
#include "isp/distributed.h"
#include "isp/registry/error.h"

namespace isp {
namespace dist {

struct GradientBuckets::State {
  struct Bucket {
    int64_t begin = 0, end = 0;  // range of the flat gradient buffer
    int size = 0, pending = 0;   // parameters in it; those whose gradient has not arrived this step
    c10::intrusive_ptr<c10d::Work> work;
  };
  std::mutex mu;
  bool alive = true;
  at::Tensor flat;
  std::vector<Bucket> buckets;  // in the order the backward pass fills them (last parameters first)
  std::size_t next_launch = 0;  // buckets start in order, so every rank issues the same sequence of collectives
  int64_t overlapped = 0, overlapped_last = 0;
  bool fired_twice = false;
  std::vector<std::shared_ptr<torch::autograd::Node>> accumulators;  // kept alive: the hooks live on them

  void launch_ready() {  // with mu held
    while (next_launch < buckets.size() && buckets[next_launch].pending == 0) {
      Bucket& b = buckets[next_launch++];
      std::vector<at::Tensor> v{flat.narrow(0, b.begin, b.end - b.begin)};
      b.work = detail::start_allreduce_sum(v[0]);
    }
  }
  void on_ready(std::size_t i) {
    std::lock_guard<std::mutex> lock(mu);
    if (!alive || !active()) return;
    Bucket& b = buckets[i];
    if (b.pending == 0 || b.work) {
      fired_twice = true;
      return;
    }
    if (--b.pending == 0) {
      const std::size_t before = next_launch;
      launch_ready();
      overlapped += static_cast<int64_t>(next_launch - before);
    }
  }
};

GradientBuckets::GradientBuckets(const std::vector<at::Tensor>& params, const std::vector<int64_t>& offsets,
                                 at::Tensor flat_grad, int64_t bucket_bytes)
    : state_(std::make_shared<State>()) {
  State& s = *state_;
  s.flat = flat_grad;
  const int64_t n = static_cast<int64_t>(params.size());
  const int64_t elem = static_cast<int64_t>(flat_grad.element_size());
  // As DDP: a small first bucket, so communication starts early in the backward pass.
  int64_t cap = std::min<int64_t>(bucket_bytes, 1 << 20);
  std::vector<int> bucket_of(params.size(), -1);
  int64_t i = n - 1;
  while (i >= 0) {
    State::Bucket b;
    b.end = i + 1 < n ? offsets[static_cast<std::size_t>(i + 1)] : flat_grad.numel();
    int64_t bytes = 0;
    while (i >= 0 && (bytes == 0 || bytes < cap)) {
      bytes += params[static_cast<std::size_t>(i)].numel() * elem;
      bucket_of[static_cast<std::size_t>(i)] = static_cast<int>(s.buckets.size());
      ++b.size;
      --i;
    }
    b.begin = offsets[static_cast<std::size_t>(i + 1)];
    b.pending = b.size;
    s.buckets.push_back(b);
    cap = bucket_bytes;
  }
  std::weak_ptr<State> weak = state_;
  for (std::size_t k = 0; k < params.size(); ++k) {
    auto acc = torch::autograd::impl::grad_accumulator(params[k]);
    if (!acc) throw Error("distributed: a trainable parameter has no gradient accumulator (not a leaf?)");
    const std::size_t b = static_cast<std::size_t>(bucket_of[k]);
    acc->add_post_hook(std::make_unique<torch::autograd::utils::LambdaPostHook>(
        [weak, b](const torch::autograd::variable_list& outputs, const torch::autograd::variable_list&) {
          if (auto st = weak.lock()) st->on_ready(b);
          return outputs;
        }));
    s.accumulators.push_back(std::move(acc));
  }
}

GradientBuckets::~GradientBuckets() {
  std::lock_guard<std::mutex> lock(state_->mu);
  state_->alive = false;  // the hooks stay on the accumulators (they cannot be removed) but do nothing
}

int64_t GradientBuckets::num_buckets() const { return static_cast<int64_t>(state_->buckets.size()); }
int64_t GradientBuckets::overlapped_last_step() const { return state_->overlapped_last; }

void GradientBuckets::finish() {
  if (!active()) return;
  State& s = *state_;
  std::vector<c10::intrusive_ptr<c10d::Work>> works;
  bool twice = false;
  {
    std::lock_guard<std::mutex> lock(s.mu);
    // Parameters that got no gradient this step (unused) hold zeros: their buckets go now.
    for (auto& b : s.buckets) b.pending = 0;
    s.launch_ready();
    for (auto& b : s.buckets) {
      works.push_back(b.work);
      b.work.reset();
      b.pending = b.size;
    }
    s.next_launch = 0;
    s.overlapped_last = s.overlapped;
    s.overlapped = 0;
    twice = s.fired_twice;
    s.fired_twice = false;
  }
  for (auto& w : works) detail::wait(w, "gradient allreduce");
  if (twice)
    throw Error(detail::where() + ": a parameter's gradient was accumulated twice in one optimizer step (two backward passes "
                "per step); data-parallel training needs one backward pass per step");
  c10::NoGradGuard ng;
  s.flat.div_(static_cast<double>(world_size()));
}

}  // namespace dist
}  // namespace isp
