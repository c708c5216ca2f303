#pragma once
// Data-parallel runs on PyTorch's c10d: TCPStore rendezvous, ProcessGroupGloo on the CPU, ProcessGroupNCCL on
// CUDA (where this LibTorch has it), and the launcher behind `isp run --nproc-per-node N`.
//
// A worker knows its place from the environment variables torchrun sets: RANK, WORLD_SIZE, LOCAL_RANK,
// MASTER_ADDR, MASTER_PORT. With WORLD_SIZE unset or 1 nothing here does anything, and a run is the
// single-process run it always was.
//
// What a distributed run changes (docs/distributed.md): the recipe's batch_size stays the *global* batch, split
// evenly over the ranks; each rank takes its slice of the same per-epoch permutation (BatchLoader::shard);
// FlatOptimizer averages gradients over the ranks with bucketed allreduces launched from the backward pass;
// run_train_loop keeps parameters and buffers equal to rank 0's, reduces the logged metrics, makes every
// decision (model selection, Ctrl-C) the same on every rank; rank 0 alone writes files.
#include <cstdint>
#include <memory>
#include <string>
#include <vector>

#include <ATen/core/Tensor.h>
#include <c10/core/Device.h>

#include "isp/registry/api.h"

namespace torch { namespace nn { class Module; class BatchNorm2dImpl; } }

namespace isp {
namespace dist {

struct WorldInfo {
  int rank = 0, world_size = 1, local_rank = 0;
  std::string master_addr = "127.0.0.1";
  int master_port = 29500;
};
// From RANK, WORLD_SIZE, LOCAL_RANK, MASTER_ADDR, MASTER_PORT (throws isp::Error naming a malformed variable).
ISP_API WorldInfo world_from_env();

struct Settings {
  std::string backend = "auto";  // auto (gloo on the CPU, nccl on CUDA), gloo, nccl
  double timeout_s = 300;        // a collective (or the rendezvous) that waits longer fails with a clear error
  bool allow_reshard = false;    // --resume with another world size than the checkpoint's
  bool sync_batchnorm = false;   // BatchNorm statistics of the global batch (SyncBatchNorm) instead of per rank
};
ISP_API const Settings& settings();

// Joins the process group (no-op when world_size == 1). Throws isp::Error when the rendezvous fails or the
// backend is not in this build.
ISP_API void init(const WorldInfo& w, const Settings& s, c10::Device device);
ISP_API void shutdown();  // leaves the group (before exit)
ISP_API bool active();    // world_size > 1 and joined
ISP_API int rank();
ISP_API int world_size();
ISP_API std::string backend();  // "gloo", "nccl", or "none"
ISP_API bool gloo_available();  // whether this build has the Gloo backend
ISP_API bool nccl_available();

// Collectives over the whole group; every rank must call them in the same order. A failure (a peer that died,
// a timeout) becomes an isp::Error that names the operation, this rank and the timeout. `what` says which
// operation it is in messages.
ISP_API void barrier(const std::string& what);
ISP_API void broadcast(std::vector<at::Tensor> tensors, const std::string& what);  // from rank 0, in place
ISP_API void allreduce_sum(at::Tensor t, const std::string& what);                 // in place
ISP_API double allreduce_max(double v, const std::string& what);
// Every rank's copy of `t` (same shape on all), in rank order.
ISP_API std::vector<at::Tensor> allgather(const at::Tensor& t, const std::string& what);
// Rows computed in shares: every rank holds the rows shard_range(n_total, rank, world) of an [n_total, ...]
// tensor; every rank gets the whole tensor, in order.
ISP_API at::Tensor allgather_rows(const at::Tensor& local, int64_t n_total, const std::string& what);
// Rank 0's string on every rank.
ISP_API std::string broadcast_string(const std::string& s, const std::string& what);
// Rank 0's parameters and/or buffers copied into every rank's module.
ISP_API void broadcast_module(torch::nn::Module& m, bool parameters, bool buffers, const std::string& what);

// SyncBatchNorm (sync_batchnorm.cpp): whether `bn` runs synchronised now (a data-parallel run with
// runtime.dist_sync_batchnorm, bn in training mode), and the synchronised forward. ConvBatchNorm, through which
// the backbones run every conv + BatchNorm pair, uses it.
ISP_API bool sync_batchnorm_applies(const torch::nn::BatchNorm2dImpl& bn);
ISP_API at::Tensor sync_batch_norm(const at::Tensor& x, torch::nn::BatchNorm2dImpl& bn);

// The half-open range [begin, end) of `n` items that is `rank`'s share when split evenly (sharded evaluation).
ISP_API std::pair<int64_t, int64_t> shard_range(int64_t n, int rank, int world);

// Gradient averaging over one flat gradient buffer (FlatOptimizer's): contiguous buckets of it, each allreduced
// asynchronously as soon as the backward pass has accumulated every gradient in it (a post hook on each
// parameter's gradient accumulator, as DDP's Reducer does), so communication overlaps the rest of the backward
// pass; finish() launches what is left, waits, and divides by the world size.
class ISP_API GradientBuckets {
 public:
  // params[i] lives at flat_grad[offsets[i], offsets[i] + numel); bucket_bytes caps a bucket's size.
  GradientBuckets(const std::vector<at::Tensor>& params, const std::vector<int64_t>& offsets, at::Tensor flat_grad,
                  int64_t bucket_bytes);
  ~GradientBuckets();
  GradientBuckets(const GradientBuckets&) = delete;
  GradientBuckets& operator=(const GradientBuckets&) = delete;
  void finish();  // before the optimizer update
  int64_t num_buckets() const;
  // Buckets whose allreduce the backward pass started (overlapped) in the last finish()ed step.
  int64_t overlapped_last_step() const;
  struct State;
 private:
  std::shared_ptr<State> state_;
};

// A data-parallel worker of rank > 0 writes its stderr to `log_path` for the object's lifetime, so the console
// shows each line once (rank 0's); the destructor gives stderr back to the console. Nothing on rank 0.
class ISP_API WorkerLog {
 public:
  WorkerLog(int rank, const std::string& log_path);
  ~WorkerLog();
  WorkerLog(const WorkerLog&) = delete;
  WorkerLog& operator=(const WorkerLog&) = delete;
  bool active() const { return console_ >= 0; }
  const std::string& path() const { return path_; }
 private:
  int console_ = -1;
  std::string path_;
};

// Starts nproc_per_node copies of this executable with `args` (argv[1...]) and torchrun's environment variables,
// forwards SIGINT/SIGTERM to them, and returns 0 when all succeed. When one fails, the others get `grace_s`
// seconds to stop on their own (their collectives fail with a clear error), then SIGTERM, then SIGKILL.
struct LaunchOptions {
  int nproc_per_node = 1, nnodes = 1, node_rank = 0;
  std::string master_addr = "127.0.0.1";
  int master_port = 29500;
  double grace_s = 30;
};
ISP_API int launch(const std::vector<std::string>& args, const LaunchOptions& o);

}  // namespace dist

}  // namespace isp
