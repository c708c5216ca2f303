// Dataset helpers (bundle assembly, stratified splits) and the batch loader.
#include "isp/data.h"
#include "isp/distributed.h"

#include <ATen/ATen.h>
#include <torch/nn/module.h>

#include <algorithm>
#include <numeric>

#ifdef ISP_HAVE_TBB
#include <tbb/blocked_range.h>
#include <tbb/parallel_for.h>
#endif

#include "isp/interfaces/backbone.h"
#include "isp/interfaces/stage.h"

namespace isp {

// Key functions of the interfaces live here, so their vtables and typeinfo exist once, in libisp_core.so.
Dataset::~Dataset() = default;
BundleDataset::~BundleDataset() = default;
Backbone::~Backbone() = default;
int64_t Backbone::total_gate_width() const {
  int64_t s = 0;
  for (const auto& g : gated_layers()) s += g.width;
  return s;
}

uint64_t mix_seed(uint64_t a, uint64_t b, uint64_t c) {
  auto sm = [](uint64_t x) {
    x += 0x9e3779b97f4a7c15ULL;
    x = (x ^ (x >> 30)) * 0xbf58476d1ce4e5b9ULL;
    x = (x ^ (x >> 27)) * 0x94d049bb133111ebULL;
    return x ^ (x >> 31);
  };
  return sm(sm(sm(a) ^ b) ^ c);
}

namespace {
// A tiny portable PRNG: std::shuffle/distributions differ between standard libraries, this does not.
struct SplitMix {
  uint64_t s;
  uint64_t next() { return s = mix_seed(s, 0x5851f42d4c957f2dULL); }
  uint64_t below(uint64_t n) { return next() % n; }
};
void shuffle(std::vector<int64_t>& v, uint64_t seed) {
  SplitMix r{seed};
  for (std::size_t i = v.size(); i > 1; --i) std::swap(v[i - 1], v[r.below(i)]);
}
}  // namespace

std::vector<int64_t> stratified_indices(const at::Tensor& labels, int64_t count, uint64_t seed) {
  auto l = labels.to(at::kLong).contiguous();
  const int64_t* p = l.data_ptr<int64_t>();
  int64_t n = l.numel();
  if (count <= 0 || count >= n) {
    std::vector<int64_t> all(static_cast<std::size_t>(n));
    std::iota(all.begin(), all.end(), 0);
    return all;
  }
  int64_t num_classes = n ? *std::max_element(p, p + n) + 1 : 0;
  std::vector<std::vector<int64_t>> by_class(static_cast<std::size_t>(num_classes));
  for (int64_t i = 0; i < n; ++i) by_class[static_cast<std::size_t>(p[i])].push_back(i);
  for (std::size_t c = 0; c < by_class.size(); ++c) shuffle(by_class[c], mix_seed(seed, c));
  // Proportional quotas (largest remainder), so class ratios are kept.
  std::vector<int64_t> quota(by_class.size());
  std::vector<std::pair<double, std::size_t>> rem;
  int64_t taken = 0;
  for (std::size_t c = 0; c < by_class.size(); ++c) {
    double exact = static_cast<double>(count) * by_class[c].size() / static_cast<double>(n);
    quota[c] = static_cast<int64_t>(exact);
    taken += quota[c];
    rem.emplace_back(exact - quota[c], c);
  }
  std::stable_sort(rem.begin(), rem.end(), [](auto& a, auto& b) { return a.first > b.first; });
  for (std::size_t k = 0; taken < count && k < rem.size(); ++k, ++taken) quota[rem[k].second]++;
  std::vector<int64_t> out;
  for (std::size_t c = 0; c < by_class.size(); ++c)
    out.insert(out.end(), by_class[c].begin(), by_class[c].begin() + std::min<int64_t>(quota[c], by_class[c].size()));
  std::sort(out.begin(), out.end());
  return out;
}

static at::Tensor take(const at::Tensor& t, const std::vector<int64_t>& idx) {
  auto i = at::tensor(idx, at::kLong);
  return t.index_select(0, i);
}

static at::Tensor to_float_images(const at::Tensor& u8, const ImageDatasetOptions& opt, int64_t out_channels) {
  // uint8 [N,C,H,W] -> float, padded (centred, black), normalised per channel.
  at::Tensor x = u8.to(at::kFloat).div_(255.0);
  int64_t h = x.size(2), w = x.size(3);
  if (opt.pad_to > 0 && (opt.pad_to < h || opt.pad_to < w))
    throw DataError("pad_to " + std::to_string(opt.pad_to) + " is smaller than the images (" + std::to_string(h) + "x" +
                    std::to_string(w) + ")");
  if (opt.pad_to > 0 && (opt.pad_to != h || opt.pad_to != w)) {
    int64_t top = (opt.pad_to - h) / 2, left = (opt.pad_to - w) / 2;
    at::Tensor padded = at::zeros({x.size(0), x.size(1), opt.pad_to, opt.pad_to}, x.options());
    padded.narrow(2, top, h).narrow(3, left, w).copy_(x);
    x = padded;
  }
  int64_t c = x.size(1);
  auto per_channel = [&](const std::vector<double>& v, const char* what) {
    if (v.size() == 1) return std::vector<double>(static_cast<std::size_t>(out_channels), v[0]);
    if (static_cast<int64_t>(v.size()) != out_channels)
      throw DataError(std::string(what) + " has " + std::to_string(v.size()) + " values; expected 1 or " +
                      std::to_string(out_channels));
    return v;
  };
  auto mean = per_channel(opt.mean, "mean"), sd = per_channel(opt.std, "std");
  bool uniform = std::adjacent_find(mean.begin(), mean.end(), std::not_equal_to<>()) == mean.end() &&
                 std::adjacent_find(sd.begin(), sd.end(), std::not_equal_to<>()) == sd.end();
  if (c == 1 && out_channels > 1 && uniform) {
    // Identical channels: normalise once and expand as a view (a third of the memory).
    x.sub_(mean[0]).div_(sd[0]);
    return x.expand({x.size(0), out_channels, x.size(2), x.size(3)});
  }
  if (c == 1 && out_channels > 1) x = x.expand({x.size(0), out_channels, x.size(2), x.size(3)}).contiguous();
  auto m = at::tensor(std::vector<float>(mean.begin(), mean.end())).view({1, out_channels, 1, 1});
  auto s = at::tensor(std::vector<float>(sd.begin(), sd.end())).view({1, out_channels, 1, 1});
  return x.sub_(m).div_(s);
}

DataBundle make_bundle(const at::Tensor& train_u8, const at::Tensor& train_labels, const at::Tensor& test_u8,
                       const at::Tensor& test_labels, std::vector<std::string> class_names,
                       const ImageDatasetOptions& opt, std::string description) {
  DataBundle b;
  b.class_names = std::move(class_names);
  b.description = std::move(description);
  int64_t in_c = train_u8.size(1);
  int64_t out_c = (in_c == 1 && opt.replicate_channels) ? 3 : in_c;
  b.mean = opt.mean.size() == 1 ? std::vector<double>(out_c, opt.mean[0]) : opt.mean;
  b.std = opt.std.size() == 1 ? std::vector<double>(out_c, opt.std[0]) : opt.std;
  b.augmentation.crop_padding = opt.crop_padding;
  b.augmentation.horizontal_flip = opt.horizontal_flip;
  b.augmentation.pad_value.clear();
  for (int64_t c = 0; c < out_c; ++c) b.augmentation.pad_value.push_back(-b.mean[c] / b.std[c]);

  // Stratified, seeded train/validation split of the training files.
  int64_t n = train_labels.size(0);
  int64_t n_val = static_cast<int64_t>(opt.val_fraction * static_cast<double>(n));
  std::vector<int64_t> val_idx = n_val > 0 ? stratified_indices(train_labels, n_val, mix_seed(opt.split_seed, 1))
                                           : std::vector<int64_t>{};
  std::vector<char> is_val(static_cast<std::size_t>(n), 0);
  for (auto i : val_idx) is_val[static_cast<std::size_t>(i)] = 1;
  std::vector<int64_t> train_idx;
  for (int64_t i = 0; i < n; ++i)
    if (!is_val[static_cast<std::size_t>(i)]) train_idx.push_back(i);

  auto subset = [&](std::vector<int64_t> idx, const at::Tensor& labels, int64_t k, uint64_t salt) {
    if (k <= 0 || k >= static_cast<int64_t>(idx.size())) return idx;
    auto sub = stratified_indices(take(labels, idx), k, mix_seed(opt.split_seed, salt));
    std::vector<int64_t> out;
    for (auto s : sub) out.push_back(idx[static_cast<std::size_t>(s)]);
    return out;
  };
  train_idx = subset(train_idx, train_labels, opt.train_subset, 2);
  val_idx = subset(val_idx, train_labels, opt.val_subset, 3);
  std::vector<int64_t> test_idx(static_cast<std::size_t>(test_labels.size(0)));
  std::iota(test_idx.begin(), test_idx.end(), 0);
  test_idx = subset(test_idx, test_labels, opt.test_subset, 4);

  b.train = {to_float_images(take(train_u8, train_idx), opt, out_c), take(train_labels, train_idx).to(at::kLong)};
  if (!val_idx.empty())
    b.val = {to_float_images(take(train_u8, val_idx), opt, out_c), take(train_labels, val_idx).to(at::kLong)};
  b.test = {to_float_images(take(test_u8, test_idx), opt, out_c), take(test_labels, test_idx).to(at::kLong)};
  return b;
}

// ------------------------------------------------------------------------------------------- BatchLoader

BatchLoader::BatchLoader(const ImageSplit& split, int64_t batch_size, bool shuffle, Augmentation aug,
                         c10::Device device, bool drop_last)
    : images_(split.images), labels_(split.labels), n_(split.size()), batch_size_(batch_size), shuffle_(shuffle),
      drop_last_(drop_last), aug_(std::move(aug)), device_(device) {
  if (!device_.is_cpu()) {
    // Keep the split on the device whole: batches are then gathered there without host copies.
    images_ = images_.contiguous().to(device_);
    labels_ = labels_.to(device_);
    use_gather_path();
  }
  order_.resize(static_cast<std::size_t>(n_));
  std::iota(order_.begin(), order_.end(), 0);
}

void BatchLoader::use_gather_path() {
  gather_ = true;
  {
    const int64_t C = images_.dim() == 4 ? images_.size(1) : 0;
    std::vector<float> pad(static_cast<std::size_t>(C), 0.f);
    for (int64_t c = 0; c < C && c < static_cast<int64_t>(aug_.pad_value.size()); ++c)
      pad[static_cast<std::size_t>(c)] = static_cast<float>(aug_.pad_value[static_cast<std::size_t>(c)]);
    pad_ = at::tensor(pad, at::kFloat).to(device_).view({1, C, 1, 1});
    if (images_.dim() == 4) {
      rows_ = at::arange(images_.size(2), at::TensorOptions().dtype(at::kLong).device(device_));
      cols_ = at::arange(images_.size(3), at::TensorOptions().dtype(at::kLong).device(device_));
    }
  }
}

int64_t BatchLoader::num_batches() const {
  if (n_ == 0) return 0;
  if (world_ > 1) return n_ / batch_size_ + (!drop_last_ && n_ % batch_size_ >= world_ ? 1 : 0);
  return drop_last_ ? std::max<int64_t>(1, n_ / batch_size_) : (n_ + batch_size_ - 1) / batch_size_;
}

ImageSplit rank_share(const ImageSplit& split) {
  if (!dist::active()) return split;
  const auto [begin, end] = dist::shard_range(split.size(), dist::rank(), dist::world_size());
  ImageSplit part = split;
  part.images = split.images.narrow(0, begin, end - begin);
  part.labels = split.labels.narrow(0, begin, end - begin);
  return part;
}

void BatchLoader::shard(int rank, int world) {
  if (world < 1 || rank < 0 || rank >= world) throw Error("BatchLoader::shard: bad rank/world");
  if (world > 1 && batch_size_ % world != 0)
    throw Error("data-parallel run: the batch size " + std::to_string(batch_size_) + " does not split evenly over " +
                std::to_string(world) + " ranks; choose a batch_size divisible by the world size");
  if (world > 1 && n_ < world)
    throw Error("data-parallel run: " + std::to_string(n_) + " samples cannot be shared by " + std::to_string(world) + " ranks");
  rank_ = rank;
  world_ = world;
}

void BatchLoader::start_epoch(uint64_t seed, int64_t epoch) {
  seed_ = seed;
  epoch_ = epoch;
  std::iota(order_.begin(), order_.end(), 0);
  if (shuffle_) shuffle(order_, mix_seed(seed, 0xE90C, static_cast<uint64_t>(epoch)));
  if (!gather_) return;
  // On an accelerator the whole epoch's plan goes over once: order, crop offsets and flips for every sample
  // (the same numbers the CPU path draws per batch), so get() makes no host-to-device copy and no
  // synchronisation.
  const int64_t nb = num_batches();
  std::vector<int64_t> plan(static_cast<std::size_t>(4 * n_), 0);
  const int64_t p = aug_.crop_padding;
  for (int64_t i = 0; i < nb; ++i) {
    const int64_t begin = i * batch_size_, end = std::min(n_, begin + batch_size_);
    SplitMix r{mix_seed(seed_, static_cast<uint64_t>(epoch_), static_cast<uint64_t>(i) + 0xA11CE)};
    for (int64_t k = begin; k < end; ++k) {
      plan[static_cast<std::size_t>(k)] = order_[static_cast<std::size_t>(k)];
      plan[static_cast<std::size_t>(n_ + k)] = p ? static_cast<int64_t>(r.below(2 * p + 1)) - p : 0;
      plan[static_cast<std::size_t>(2 * n_ + k)] = p ? static_cast<int64_t>(r.below(2 * p + 1)) - p : 0;
      plan[static_cast<std::size_t>(3 * n_ + k)] = aug_.horizontal_flip ? static_cast<int64_t>(r.below(2)) : 0;
    }
  }
  plan_ = at::tensor(plan, at::kLong).view({4, n_}).to(device_);
}

Batch BatchLoader::get(int64_t i) const {
  const int64_t global_begin = i * batch_size_;
  const int64_t global_b = std::min(n_, global_begin + batch_size_) - global_begin;
  // This rank's slice of the global batch (all of it in one process).
  const int64_t b = global_b / world_, skip = static_cast<int64_t>(rank_) * b;
  const int64_t begin = global_begin + skip, end = begin + b;
  if (gather_) return get_on_device(begin, b);
  std::vector<int64_t> idx(order_.begin() + begin, order_.begin() + end);
  bool augment = aug_.crop_padding > 0 || aug_.horizontal_flip;
  at::Tensor index = at::tensor(idx, at::kLong).to(labels_.device());
  at::Tensor y = labels_.index_select(0, index);
  if (!augment) {
    at::Tensor x = images_.index_select(0, index.to(images_.device()));
    return {x.contiguous(), y, index};
  }
  // Per-sample crop offsets and flips from a seed that depends only on (seed, epoch, batch).
  SplitMix r{mix_seed(seed_, static_cast<uint64_t>(epoch_), static_cast<uint64_t>(i) + 0xA11CE)};
  const int64_t p = aug_.crop_padding;
  std::vector<int64_t> dy(b), dx(b);
  std::vector<char> flip(b);
  // The noise of the whole global batch is drawn, this rank keeps its slice: the same numbers as in one process.
  for (int64_t g = 0; g < skip + b; ++g) {
    const int64_t k = g - skip;
    const int64_t y0 = p ? static_cast<int64_t>(r.below(2 * p + 1)) - p : 0;
    const int64_t x0 = p ? static_cast<int64_t>(r.below(2 * p + 1)) - p : 0;
    const char f = aug_.horizontal_flip ? static_cast<char>(r.below(2)) : 0;
    if (k < 0) continue;
    dy[k] = y0;
    dx[k] = x0;
    flip[k] = f;
  }
  const int64_t C = images_.size(1), H = images_.size(2), W = images_.size(3);
  std::vector<float> pad(C, 0.f);
  for (int64_t c = 0; c < C && c < static_cast<int64_t>(aug_.pad_value.size()); ++c) pad[c] = static_cast<float>(aug_.pad_value[c]);
  if (device_.is_cpu()) {
    at::Tensor out = at::empty({b, C, H, W}, images_.options().dtype(at::kFloat));
    const float* src = images_.data_ptr<float>();
    auto st = images_.strides();
    float* dst = out.data_ptr<float>();
    auto one = [&](int64_t k) {
      const float* s = src + idx[k] * st[0];
      float* d = dst + k * C * H * W;
      for (int64_t c = 0; c < C; ++c)
        for (int64_t h = 0; h < H; ++h) {
          int64_t sh = h + dy[k];
          for (int64_t w = 0; w < W; ++w) {
            int64_t sw = (flip[k] ? W - 1 - w : w) + dx[k];
            d[(c * H + h) * W + w] =
                (sh < 0 || sh >= H || sw < 0 || sw >= W) ? pad[c] : s[c * st[1] + sh * st[2] + sw * st[3]];
          }
        }
    };
#ifdef ISP_HAVE_TBB
    tbb::parallel_for(tbb::blocked_range<int64_t>(0, b, 8), [&](const tbb::blocked_range<int64_t>& rg) {
      for (int64_t k = rg.begin(); k < rg.end(); ++k) one(k);
    });
#else
    for (int64_t k = 0; k < b; ++k) one(k);
#endif
    return {out, y, index};
  }
  throw Error("BatchLoader: unreachable");
}

// On an accelerator: slices of the epoch plan, then one gather over index grids; no per-sample kernels, no
// host data.
Batch BatchLoader::get_on_device(int64_t begin, int64_t b) const {
  if (!plan_.defined()) throw Error("BatchLoader::get before start_epoch");
  at::Tensor plan = plan_.narrow(1, begin, b);
  at::Tensor index = plan[0];
  at::Tensor y = labels_.index_select(0, index);
  const bool augment = aug_.crop_padding > 0 || aug_.horizontal_flip;
  at::Tensor src = images_.index_select(0, index);  // [b,C,H,W]
  if (!augment) return {src, y, index};
  const int64_t C = images_.size(1), H = images_.size(2), W = images_.size(3);
  at::Tensor hs = rows_.view({1, H}) + plan[1].view({b, 1});
  at::Tensor ws0 = cols_.view({1, W});
  at::Tensor ws = at::where(plan[3].view({b, 1}).to(at::kBool), (W - 1) - ws0, ws0) + plan[2].view({b, 1});
  at::Tensor valid = ((hs >= 0) & (hs < H)).view({b, 1, H, 1}) & ((ws >= 0) & (ws < W)).view({b, 1, 1, W});
  at::Tensor hc = hs.clamp(0, H - 1), wc = ws.clamp(0, W - 1);
  at::Tensor rows = src.gather(2, hc.view({b, 1, H, 1}).expand({b, C, H, W}));
  at::Tensor x = rows.gather(3, wc.view({b, 1, 1, W}).expand({b, C, H, W}));
  return {at::where(valid.expand({b, C, H, W}), x, pad_.expand({b, C, H, W})), y, index};
}

}  // namespace isp
