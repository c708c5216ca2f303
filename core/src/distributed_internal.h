#pragma once
// Inside libisp_core: what gradient_buckets.cpp uses of the process group that distributed.cpp owns.
#include <string>

#include <ATen/core/Tensor.h>
#include <torch/csrc/distributed/c10d/Work.hpp>

namespace isp {
namespace dist {
namespace detail {
// Starts an asynchronous in-place sum over the group (a contiguous tensor).
c10::intrusive_ptr<c10d::Work> start_allreduce_sum(at::Tensor t);
// Waits; a failure becomes an isp::Error naming `what`, this rank and the timeout.
void wait(const c10::intrusive_ptr<c10d::Work>& work, const std::string& what);
std::string where();  // "distributed (rank r of W, backend)"
}  // namespace detail
}  // namespace dist
}  // namespace isp
