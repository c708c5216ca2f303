#pragma once
// Mini-batches from an in-memory split: seeded shuffling and augmentation, parallel assembly.
#include <cstdint>
#include <vector>

#include <ATen/core/Tensor.h>
#include <c10/core/Device.h>

#include "isp/interfaces/dataset.h"

namespace isp {

struct Batch {
  at::Tensor x, y;
  at::Tensor index;  // positions of the samples in the split (int64, on the split's device)
  int64_t size() const { return y.size(0); }
};

class ISP_API BatchLoader {
 public:
  // Keeps the whole split on `device` when it fits (always for CPU; on CUDA up to `max_device_bytes`).
  BatchLoader(const ImageSplit& split, int64_t batch_size, bool shuffle, Augmentation aug, c10::Device device,
              bool drop_last = false);
  int64_t num_batches() const;
  int64_t num_samples() const { return n_; }
  // Order for `epoch`: a permutation derived only from (seed, epoch), so a resumed run replays it exactly.
  void start_epoch(uint64_t seed, int64_t epoch);
  // Batch i of the current epoch; augmentation noise derived from (seed, epoch, i).
  Batch get(int64_t i) const;
  // Data-parallel training: batch i becomes this rank's 1/world slice of the global batch i (the same
  // permutation and augmentation noise on every rank, so the ranks together see exactly the one-process batch).
  // The batch size must divide by `world`; a last partial batch is cut to a multiple of `world` (at most world-1
  // samples of an epoch are skipped), and dropped when it has fewer than `world` samples.
  void shard(int rank, int world);
  int world() const { return world_; }
  // The accelerator's path (the epoch's plan uploaded once, batches gathered by index grids) on any device;
  // automatic off the CPU. Tests use it to check that both paths give the same batches.
  void use_gather_path();

 private:
  at::Tensor images_, labels_;
  int64_t n_, batch_size_;
  bool shuffle_, drop_last_;
  Augmentation aug_;
  c10::Device device_;
  Batch get_on_device(int64_t begin, int64_t b) const;
  std::vector<int64_t> order_;
  bool gather_ = false;
  at::Tensor plan_;               // accelerator: [4, n] order, row offset, column offset, flip for the epoch
  at::Tensor pad_, rows_, cols_;  // accelerator: pad values [1,C,1,1], arange(H), arange(W)
  uint64_t seed_ = 0;
  int64_t epoch_ = 0;
  int rank_ = 0, world_ = 1;
};

// This rank's contiguous share of `split` in a data-parallel run (isp/distributed.h), for sharded evaluation
// whose sums are then added over the ranks; the whole split in one process.
ISP_API ImageSplit rank_share(const ImageSplit& split);

// Deterministic 64-bit mix of several integers (splitmix64), used for every derived seed.
ISP_API uint64_t mix_seed(uint64_t a, uint64_t b = 0, uint64_t c = 0);

}  // namespace isp
