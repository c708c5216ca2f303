#pragma once
// kind "dataset": image classification data held in memory as normalised float tensors.
#include <string>
#include <vector>

#include <ATen/core/Tensor.h>

#include "isp/registry/options.h"

namespace isp {

struct ImageSplit {
  at::Tensor images;  // float32 [N, C, H, W], normalised
  at::Tensor labels;  // int64 [N]
  int64_t size() const { return labels.defined() ? labels.size(0) : 0; }
};

struct Augmentation {
  int64_t crop_padding = 0;  // random crop after zero padding by this many pixels (0 = off)
  bool horizontal_flip = false;
  std::vector<double> pad_value;  // per channel: the normalised value of a black pixel
};

struct DataBundle {
  ImageSplit train, val, test;
  std::vector<std::string> class_names;
  std::vector<double> mean, std;  // per channel, for turning tensors back into pictures
  Augmentation augmentation;       // applied to training batches only
  std::string description;
  // Where the data set defines its objects' pixels (for the saliency metric "mass on object"): a pixel whose raw
  // intensity (x * std + mean, in [0,1]) exceeds this in any channel is foreground. < 0: not defined.
  double foreground_above = -1.0;
  int64_t num_classes() const { return static_cast<int64_t>(class_names.size()); }
};

class ISP_API Dataset {
 public:
  static constexpr const char* kKind = "dataset";
  virtual ~Dataset();
  virtual const DataBundle& data() const = 0;
};

// The usual implementation: a bundle decoded once at build time.
class ISP_API BundleDataset : public Dataset {
 public:
  explicit BundleDataset(DataBundle b) : b_(std::move(b)) {}
  ~BundleDataset() override;
  const DataBundle& data() const override { return b_; }
 private:
  DataBundle b_;
};

// Options every image dataset shares (embedded in each dataset plugin's options via visit()).
struct ImageDatasetOptions {
  int64_t pad_to = 32;                 // zero-pad (centred) to this side; 0 keeps the native size
  bool replicate_channels = true;      // 1-channel images become 3 identical channels
  std::vector<double> mean{0.5};       // one value, or one per output channel
  std::vector<double> std{0.5};
  int64_t crop_padding = 4;            // training augmentation: random crop after padding (0 = off)
  bool horizontal_flip = true;
  double val_fraction = 0.1;           // stratified, seeded split of the training files
  int64_t split_seed = 1;
  int64_t train_subset = 0;            // 0 = all; otherwise a seeded stratified subset of the train split
  int64_t val_subset = 0;
  int64_t test_subset = 0;
  template <class V> void visit(V& v) {
    v("pad_to", pad_to, "zero-pad images (centred) to this side length; 0 keeps the native size", at_least(0));
    v("replicate_channels", replicate_channels, "replicate 1-channel images to 3 channels");
    v("mean", mean, "normalisation mean (one value or one per channel), applied to pixels in [0,1]");
    v("std", std, "normalisation std (one value or one per channel)");
    v("crop_padding", crop_padding, "training augmentation: random crop after zero padding (0 = off)", between(0, 16));
    v("horizontal_flip", horizontal_flip, "training augmentation: random horizontal flip");
    v("val_fraction", val_fraction, "fraction of the training files held out for validation (stratified)", between(0, 0.9));
    v("split_seed", split_seed, "seed of the train/validation split and of the subsets", at_least(0));
    v("train_subset", train_subset, "use this many training images (stratified, seeded); 0 = all", at_least(0));
    v("val_subset", val_subset, "use this many validation images; 0 = all", at_least(0));
    v("test_subset", test_subset, "use this many test images; 0 = all", at_least(0));
  }
};

// Turns decoded uint8 images [N, C, H, W] + labels into a DataBundle: padding, channel replication,
// normalisation (parallel over images), stratified split and subsets.
ISP_API DataBundle make_bundle(const at::Tensor& train_u8, const at::Tensor& train_labels, const at::Tensor& test_u8,
                               const at::Tensor& test_labels, std::vector<std::string> class_names,
                               const ImageDatasetOptions& opt, std::string description);

// Seeded stratified selection of `count` indices (or a fraction) from labels; deterministic across platforms.
ISP_API std::vector<int64_t> stratified_indices(const at::Tensor& labels, int64_t count, uint64_t seed);

}  // namespace isp
