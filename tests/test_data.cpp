// Dataset plugins on generated files (IDX gzip/raw, CIFAR), corrupt inputs, splits and the batch loader.
#include "test_support.h"

#include <zlib.h>

#include <fstream>

#include "isp/data.h"
#include "isp/interfaces/dataset.h"

namespace fs = std::filesystem;
using isp::json;

namespace {

std::vector<uint8_t> idx_bytes(uint8_t ndim, const std::vector<uint32_t>& dims, const std::vector<uint8_t>& data) {
  std::vector<uint8_t> out{0, 0, 0x08, ndim};
  for (uint32_t d : dims) out.insert(out.end(), {uint8_t(d >> 24), uint8_t(d >> 16), uint8_t(d >> 8), uint8_t(d)});
  out.insert(out.end(), data.begin(), data.end());
  return out;
}
void write_raw(const fs::path& p, const std::vector<uint8_t>& b) {
  std::ofstream(p, std::ios::binary).write(reinterpret_cast<const char*>(b.data()), static_cast<std::streamsize>(b.size()));
}
void write_gz(const fs::path& p, const std::vector<uint8_t>& b) {
  gzFile f = gzopen(p.string().c_str(), "wb");
  gzwrite(f, b.data(), static_cast<unsigned>(b.size()));
  gzclose(f);
}
// n images of 28x28, image i filled with value i, label i % 10.
void write_idx_set(const fs::path& dir, const std::string& prefix, uint32_t n, bool gz) {
  std::vector<uint8_t> px, lb;
  for (uint32_t i = 0; i < n; ++i) {
    px.insert(px.end(), 28 * 28, static_cast<uint8_t>(i));
    lb.push_back(static_cast<uint8_t>(i % 10));
  }
  auto im = idx_bytes(3, {n, 28, 28}, px), la = idx_bytes(1, {n}, lb);
  if (gz) {
    write_gz(dir / (prefix + "-images-idx3-ubyte.gz"), im);
    write_gz(dir / (prefix + "-labels-idx1-ubyte.gz"), la);
  } else {
    write_raw(dir / (prefix + "-images-idx3-ubyte"), im);
    write_raw(dir / (prefix + "-labels-idx1-ubyte"), la);
  }
}

std::shared_ptr<isp::Dataset> build(isp::Registry& reg, const json& spec) {
  json recipe = {{"nodes", {{"data", spec}}}};
  isp::BuildContext ctx(reg, recipe, [](const std::string& p) { return isp::Where{"data.json", p}; });
  return ctx.node<isp::Dataset>("data");
}
using isp_test::error_of;

}  // namespace

TEST_CASE("IDX datasets: gzip and raw files, padding, channel replication, normalisation, stratified split") {
  isp::Registry reg;
  reg.load_library(isp_test::plugin("isp_datasets_idx"));
  for (bool gz : {true, false}) {
    auto dir = isp_test::temp_dir(gz ? "idx_gz" : "idx_raw");
    write_idx_set(dir, "train", 200, gz);
    write_idx_set(dir, "t10k", 50, gz);
    auto ds = build(reg, {{"type", "MNIST"}, {"root", dir.string()}, {"mean", {0.0}}, {"std", {1.0}}, {"val_fraction", 0.1}});
    const auto& b = ds->data();
    CHECK(b.train.size() == 180);
    CHECK(b.val.size() == 20);
    CHECK(b.test.size() == 50);
    CHECK(b.train.images.sizes() == at::IntArrayRef({180, 3, 32, 32}));
    // Stratified: every class keeps its share (20 per class -> 2 per class in validation).
    auto counts = at::bincount(b.val.labels, {}, 10);
    CHECK(counts.min().item<int64_t>() == 2);
    CHECK(counts.max().item<int64_t>() == 2);
    // Centred zero padding: border is 0, the inside holds value i/255 of image i.
    auto img = b.test.images[7];
    CHECK(img[0][0][0].item<float>() == doctest::Approx(0.0));
    CHECK(img[2][16][16].item<float>() == doctest::Approx(7.0 / 255.0));
    CHECK(b.test.labels[7].item<int64_t>() == 7);
    // Validation and training images are disjoint (image value identifies the source index).
    auto tr = b.train.images.select(1, 0).select(1, 16).select(1, 16).mul(255).round().to(at::kLong);
    auto va = b.val.images.select(1, 0).select(1, 16).select(1, 16).mul(255).round().to(at::kLong);
    CHECK(at::isin(va, tr).any().item<bool>() == false);
  }
}

TEST_CASE("IDX datasets: missing, truncated, corrupt and inconsistent files are errors naming the file") {
  isp::Registry reg;
  reg.load_library(isp_test::plugin("isp_datasets_idx"));
  auto dir = isp_test::temp_dir("idx_bad");
  auto e = error_of([&] { build(reg, {{"type", "MNIST"}, {"root", dir.string()}}); });
  CHECK(e.find("missing train-images-idx3-ubyte") != std::string::npos);
  write_idx_set(dir, "train", 20, false);
  write_idx_set(dir, "t10k", 10, false);
  // Truncated image data.
  auto p = dir / "train-images-idx3-ubyte";
  fs::resize_file(p, fs::file_size(p) - 100);
  e = error_of([&] { build(reg, {{"type", "MNIST"}, {"root", dir.string()}}); });
  CHECK(e.find("train-images-idx3-ubyte: truncated") != std::string::npos);
  // Wrong magic.
  write_raw(p, idx_bytes(1, {20}, std::vector<uint8_t>(20, 0)));
  e = error_of([&] { build(reg, {{"type", "MNIST"}, {"root", dir.string()}}); });
  CHECK(e.find("not an IDX file") != std::string::npos);
  // Corrupt gzip stream.
  write_idx_set(dir, "train", 20, false);
  fs::remove(dir / "train-images-idx3-ubyte");
  {
    std::vector<uint8_t> junk{0x1f, 0x8b, 0x08, 0x00, 1, 2, 3, 4, 5, 6, 7, 8, 9, 10, 11, 12, 13};
    write_raw(dir / "train-images-idx3-ubyte.gz", junk);
  }
  e = error_of([&] { build(reg, {{"type", "MNIST"}, {"root", dir.string()}}); });
  CHECK(e.find("train-images-idx3-ubyte.gz") != std::string::npos);
  // Label count mismatch and out-of-range labels.
  fs::remove(dir / "train-images-idx3-ubyte.gz");
  write_idx_set(dir, "train", 20, false);
  write_raw(dir / "train-labels-idx1-ubyte", idx_bytes(1, {19}, std::vector<uint8_t>(19, 0)));
  e = error_of([&] { build(reg, {{"type", "MNIST"}, {"root", dir.string()}}); });
  CHECK(e.find("20 images but") != std::string::npos);
  write_raw(dir / "train-labels-idx1-ubyte", idx_bytes(1, {20}, std::vector<uint8_t>(20, 42)));
  e = error_of([&] { build(reg, {{"type", "MNIST"}, {"root", dir.string()}}); });
  CHECK(e.find("label 42") != std::string::npos);
  // Headers whose dimensions multiply past any real dataset (2^72 wrapped to 0 in the unchecked product, and
  // 2^44 asked for an allocation the header alone decided): a clear error before any memory is taken.
  write_idx_set(dir, "train", 20, false);
  for (const std::vector<uint32_t>& dims : {std::vector<uint32_t>{1u << 24, 1u << 24, 1u << 24},
                                            std::vector<uint32_t>{1u << 24, 1u << 12, 1u << 8}}) {
    write_raw(p, idx_bytes(3, dims, std::vector<uint8_t>(64, 1)));
    e = error_of([&] { build(reg, {{"type", "MNIST"}, {"root", dir.string()}}); });
    CHECK(e.find("train-images-idx3-ubyte: header claims more than 64 GiB") != std::string::npos);
  }
  // A plausible header over a short file: memory follows the bytes read, and the error says how many there were.
  write_raw(p, idx_bytes(3, {1u << 20, 28, 28}, std::vector<uint8_t>(1000, 1)));
  e = error_of([&] { build(reg, {{"type", "MNIST"}, {"root", dir.string()}}); });
  CHECK(e.find("truncated: expected 822083584 bytes of data after the header, got 1000") != std::string::npos);
  // A folder where a file should be.
  fs::remove(p);
  fs::create_directory(p);
  e = error_of([&] { build(reg, {{"type", "MNIST"}, {"root", dir.string()}}); });
  CHECK(e.find("train-images-idx3-ubyte: not a regular file") != std::string::npos);
}

TEST_CASE("CIFAR binary batches: parsing, class names, truncated files") {
  isp::Registry reg;
  reg.load_library(isp_test::plugin("isp_datasets_cifar"));
  auto dir = isp_test::temp_dir("cifar");
  auto batch = [&](const std::string& name, int n, int first_label) {
    std::vector<uint8_t> b;
    for (int i = 0; i < n; ++i) {
      b.push_back(static_cast<uint8_t>((first_label + i) % 10));
      for (int c = 0; c < 3; ++c) b.insert(b.end(), 1024, static_cast<uint8_t>(c * 100));
    }
    write_raw(dir / name, b);
  };
  for (int i = 1; i <= 5; ++i) batch("data_batch_" + std::to_string(i) + ".bin", 20, i);
  batch("test_batch.bin", 10, 0);
  auto ds = build(reg, {{"type", "CIFAR10"}, {"root", dir.string()}, {"mean", {0.0}}, {"std", {1.0}}});
  const auto& b = ds->data();
  CHECK(b.train.size() + b.val.size() == 100);
  CHECK(b.test.size() == 10);
  CHECK(b.class_names.at(3) == "cat");
  CHECK(b.test.images[0][2][5][5].item<float>() == doctest::Approx(200.0 / 255.0));
  fs::resize_file(dir / "test_batch.bin", 3073 * 10 - 7);
  auto e = error_of([&] { build(reg, {{"type", "CIFAR10"}, {"root", dir.string()}}); });
  CHECK(e.find("test_batch.bin: size") != std::string::npos);
  CHECK(e.find("not a multiple of the 3073-byte record") != std::string::npos);
  // A folder named like a batch file (std::filesystem threw a non-isp error here before).
  fs::remove(dir / "test_batch.bin");
  fs::create_directory(dir / "test_batch.bin");
  e = error_of([&] { build(reg, {{"type", "CIFAR10"}, {"root", dir.string()}}); });
  CHECK(e.find("test_batch.bin: not a regular file") != std::string::npos);
}

TEST_CASE("stratified subsets are seeded, proportional and deterministic") {
  auto labels = at::arange(1000, at::kLong).remainder(4);
  auto a = isp::stratified_indices(labels, 100, 5), b = isp::stratified_indices(labels, 100, 5);
  auto c = isp::stratified_indices(labels, 100, 6);
  CHECK(a == b);
  CHECK(a != c);
  CHECK(a.size() == 100);
  std::vector<int> per(4, 0);
  for (auto i : a) per[static_cast<std::size_t>(i % 4)]++;
  CHECK(per == std::vector<int>{25, 25, 25, 25});
}

TEST_CASE("batch loader: deterministic per (seed, epoch), augmentation pads with black, flips") {
  isp::ImageSplit s;
  s.images = at::arange(2 * 1 * 4 * 4, at::kFloat).view({2, 1, 4, 4});
  s.labels = at::tensor(std::vector<int64_t>{0, 1});
  isp::Augmentation aug;
  aug.crop_padding = 1;
  aug.horizontal_flip = true;
  aug.pad_value = {-9.0};
  isp::BatchLoader l(s, 2, true, aug, c10::Device(c10::kCPU));
  l.start_epoch(3, 1);
  auto b1 = l.get(0);
  l.start_epoch(3, 1);
  auto b2 = l.get(0);
  CHECK(at::equal(b1.x, b2.x));
  CHECK(at::equal(b1.y, b2.y));
  // Every output pixel is either the pad value or a pixel of the matching source image.
  for (int64_t k = 0; k < 2; ++k) {
    auto src = s.images[b1.y[k].item<int64_t>()];
    auto out = b1.x[k];
    auto is_pad = out.eq(-9.0);
    CHECK(at::isin(out.masked_select(is_pad.logical_not()), src.flatten()).all().item<bool>());
  }
  // Over many epochs, some crops shift (pad value appears) and some images are flipped.
  bool saw_pad = false, saw_flip = false;
  for (int64_t e = 0; e < 20; ++e) {
    l.start_epoch(3, e);
    auto b = l.get(0);
    saw_pad = saw_pad || b.x.eq(-9.0).any().item<bool>();
    for (int64_t k = 0; k < 2; ++k) {
      auto src = s.images[b.y[k].item<int64_t>()][0];
      saw_flip = saw_flip || at::equal(b.x[k][0], src.flip({1}));
    }
  }
  CHECK(saw_pad);
  CHECK(saw_flip);
  // Without augmentation the batch is the source itself.
  isp::BatchLoader plain(s, 2, false, isp::Augmentation{}, c10::Device(c10::kCPU));
  plain.start_epoch(0, 0);
  CHECK(at::equal(plain.get(0).x, s.images));
}

TEST_CASE("synthetic dataset: seeded, learnable, schema-checked") {
  isp::Registry reg;
  reg.load_library(isp_test::plugin("isp_datasets_synthetic"));
  auto a = build(reg, {{"type", "SyntheticImages"}, {"num_train", 40}, {"num_test", 8}, {"num_classes", 4}});
  auto b = build(reg, {{"type", "SyntheticImages"}, {"num_train", 40}, {"num_test", 8}, {"num_classes", 4}});
  CHECK(at::equal(a->data().train.images, b->data().train.images));
  CHECK(a->data().num_classes() == 4);
  auto e = error_of([&] { build(reg, {{"type", "SyntheticImages"}, {"channels", 2}}); });
  CHECK(e == "data.json: /nodes/data/channels: expected one of 1,3, got 2");
}
