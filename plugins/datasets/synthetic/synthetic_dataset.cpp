// Synthetic, learnable images for tests: each class is a bright blob at its own place plus seeded noise.
#include <ATen/ATen.h>

#include <algorithm>
#include <cmath>

#include "isp/data.h"
#include "isp/interfaces/dataset.h"
#include "isp/registry/plugin.h"

namespace {

struct SyntheticOptions : isp::ImageDatasetOptions {
  int64_t num_train = 512;
  int64_t num_test = 128;
  int64_t num_classes = 4;
  int64_t image_size = 32;
  int64_t channels = 1;
  int64_t seed = 7;
  double noise = 0.15;
  SyntheticOptions() { crop_padding = 0; horizontal_flip = false; }
  template <class V> void visit(V& v) {
    v("num_train", num_train, "training images (before the validation split)", isp::at_least(4));
    v("num_test", num_test, "test images", isp::at_least(1));
    v("num_classes", num_classes, "classes", isp::between(2, 100));
    v("image_size", image_size, "side of the square images", isp::between(4, 256));
    v("channels", channels, "image channels", isp::one_of({1, 3}));
    v("seed", seed, "generator seed", isp::at_least(0));
    v("noise", noise, "noise amplitude in [0,1]", isp::between(0, 1));
    isp::ImageDatasetOptions::visit(v);
  }
};

// Blob centre of class k on a circle, so classes are separable by where the object is (a saliency test too).
std::pair<at::Tensor, at::Tensor> generate(int64_t n, const SyntheticOptions& o, uint64_t salt) {
  at::Generator gen = at::detail::createCPUGenerator(isp::mix_seed(static_cast<uint64_t>(o.seed), salt));
  at::Tensor labels = at::arange(n, at::kLong).remainder(o.num_classes);
  const int64_t s = o.image_size;
  at::Tensor grid = at::arange(s, at::kFloat);
  at::Tensor imgs = at::empty({n, o.channels, s, s}, at::kFloat);
  for (int64_t k = 0; k < o.num_classes; ++k) {
    double ang = 2.0 * M_PI * static_cast<double>(k) / static_cast<double>(o.num_classes);
    double cy = s / 2.0 + 0.3 * s * std::sin(ang), cx = s / 2.0 + 0.3 * s * std::cos(ang);
    double sig = std::max(1.0, s / 8.0);
    at::Tensor blob = at::exp(-((grid - cy).pow(2).view({s, 1}) + (grid - cx).pow(2).view({1, s})) / (2 * sig * sig));
    at::Tensor mask = labels.eq(k);
    imgs.index_put_({mask}, blob.expand({mask.sum().item<int64_t>(), o.channels, s, s}));
  }
  imgs.add_(at::rand({n, o.channels, s, s}, gen, at::kFloat).mul_(o.noise));
  at::Tensor u8 = imgs.clamp(0, 1).mul(255).round().to(at::kByte);
  return {u8, labels};
}

std::shared_ptr<isp::Dataset> make_synthetic(const SyntheticOptions& o, isp::BuildContext&) {
  auto [xtr, ytr] = generate(o.num_train, o, 1);
  auto [xte, yte] = generate(o.num_test, o, 2);
  std::vector<std::string> names;
  for (int64_t k = 0; k < o.num_classes; ++k) names.push_back("blob_" + std::to_string(k));
  isp::DataBundle b = isp::make_bundle(xtr, ytr, xte, yte, names, o, "synthetic blobs");
  b.foreground_above = std::min(0.99, o.noise + 0.1);  // the blob where it rises 0.1 above the noise's ceiling
  return std::make_shared<isp::BundleDataset>(std::move(b));
}

}  // namespace

ISP_PLUGIN("0.1.0");
ISP_REGISTER(isp::Dataset, "SyntheticImages", 1, SyntheticOptions, make_synthetic,
             "seeded synthetic images (one blob position per class) for tests and smoke runs");
