// The ImageFolder dataset plugin on generated PNG folders: class names, resizing, normalisation, the held-out test
// share, corrupt files (an error naming the file, or skipped and counted), missing folders, the decode cache.
#include "test_support.h"

#include <zlib.h>

#include <fstream>

#include <ATen/ATen.h>

#include "isp/interfaces/dataset.h"

namespace fs = std::filesystem;
using isp::json;

namespace {

// A minimal PNG writer (8-bit grey or RGB, no filtering): enough to make test folders without a dependency.
void write_png(const fs::path& p, int w, int h, int channels, const std::function<uint8_t(int, int, int)>& px) {
  auto be32 = [](std::string& s, uint32_t v) {
    for (int k = 3; k >= 0; --k) s.push_back(static_cast<char>((v >> (8 * k)) & 0xff));
  };
  auto chunk = [&](std::string& out, const char* type, const std::string& data) {
    be32(out, static_cast<uint32_t>(data.size()));
    std::string td = std::string(type, 4) + data;
    out += td;
    be32(out, static_cast<uint32_t>(crc32(0, reinterpret_cast<const Bytef*>(td.data()), static_cast<uInt>(td.size()))));
  };
  std::string raw;
  for (int y = 0; y < h; ++y) {
    raw.push_back(0);
    for (int x = 0; x < w; ++x)
      for (int c = 0; c < channels; ++c) raw.push_back(static_cast<char>(px(x, y, c)));
  }
  uLongf n = compressBound(static_cast<uLong>(raw.size()));
  std::string z(n, '\0');
  REQUIRE(compress(reinterpret_cast<Bytef*>(z.data()), &n, reinterpret_cast<const Bytef*>(raw.data()), static_cast<uLong>(raw.size())) == Z_OK);
  z.resize(n);
  std::string ihdr;
  be32(ihdr, static_cast<uint32_t>(w));
  be32(ihdr, static_cast<uint32_t>(h));
  ihdr += std::string{8, static_cast<char>(channels == 3 ? 2 : 0), 0, 0, 0};
  std::string out = "\x89PNG\r\n\x1a\n";
  chunk(out, "IHDR", ihdr);
  chunk(out, "IDAT", z);
  chunk(out, "IEND", "");
  std::ofstream(p, std::ios::binary) << out;
}

std::shared_ptr<isp::Dataset> build(const json& spec) {
  json recipe = {{"nodes", {{"data", spec}}}};
  isp::BuildContext ctx(isp_test::shared_registry(), recipe, [](const std::string& p) { return isp::Where{"data.json", p}; });
  return ctx.node<isp::Dataset>("data");
}

// root/<class>/: "red" (pure red images), "grey" (grey-level ramps left to right), "blue": 5 images each, of
// varying sizes.
fs::path make_folder(const std::string& tag) {
  const fs::path root = isp_test::temp_dir(tag) / "images";
  for (const char* c : {"red", "grey", "blue"}) fs::create_directories(root / c);
  for (int i = 0; i < 5; ++i) {
    const int w = 20 + 7 * i, h = 30 - 2 * i;
    write_png(root / "red" / ("r" + std::to_string(i) + ".png"), w, h, 3, [](int, int, int c) { return c == 0 ? 255 : 0; });
    write_png(root / "blue" / ("b" + std::to_string(i) + ".PNG"), w, h, 3, [](int, int, int c) { return c == 2 ? 255 : 0; });
    write_png(root / "grey" / ("g" + std::to_string(i) + ".png"), w, h, 1,
              [w](int x, int, int) { return static_cast<uint8_t>(255 * x / (w - 1)); });
  }
  std::ofstream(root / "red" / "notes.txt") << "not an image: ignored";
  return root;
}

}  // namespace

TEST_CASE("ImageFolder: class names from folders, square resize, normalisation, stratified test share") {
  const fs::path root = make_folder("imagefolder");
  auto ds = build({{"type", "ImageFolder"}, {"root", root.string()}, {"image_size", 12}, {"test_fraction", 0.2},
                   {"val_fraction", 0.0}});
  const isp::DataBundle& b = ds->data();
  CHECK(b.class_names == std::vector<std::string>{"blue", "grey", "red"});
  CHECK(b.train.size() == 12);
  CHECK(b.test.size() == 3);
  CHECK(b.train.images.sizes() == at::IntArrayRef({12, 3, 12, 12}));
  // Every class is in the test share once (stratified).
  CHECK(std::get<0>(at::sort(b.test.labels)).equal(at::tensor({0, 1, 2}, at::kLong)));
  // A pure red image: channel 0 is (1 - 0.485) / 0.229 everywhere, channel 1 is (0 - 0.456) / 0.224.
  at::Tensor all_x = at::cat({b.train.images, b.test.images}), all_y = at::cat({b.train.labels, b.test.labels});
  at::Tensor red = all_x.index_select(0, all_y.eq(2).nonzero().view(-1));
  CHECK(red.select(1, 0).sub((1 - 0.485) / 0.229).abs().max().item<double>() < 1e-5);
  CHECK(red.select(1, 1).sub((0 - 0.456) / 0.224).abs().max().item<double>() < 1e-5);
  // Grey ramps (1 channel decoded as RGB): equal channels, increasing from left to right after resizing.
  at::Tensor grey = all_x.index_select(0, all_y.eq(1).nonzero().view(-1));
  at::Tensor raw = grey.select(1, 0) * 0.229 + 0.485;  // back to 0..1
  CHECK(raw.select(2, 0).max().item<double>() < 0.1);
  CHECK(raw.select(2, 11).min().item<double>() > 0.9);
  CHECK(raw.diff(1, 2).min().item<double>() >= -1e-6);
  fs::remove_all(root.parent_path());
}

TEST_CASE("ImageFolder: a corrupt file is an error naming it, or skipped and counted and missing folders are errors") {
  const fs::path root = make_folder("imagefolder_bad");
  std::ofstream(root / "grey" / "broken.png") << "\x89PNG but not really";
  const json spec = {{"type", "ImageFolder"}, {"root", root.string()}, {"image_size", 8}};
  const std::string err = isp_test::error_of([&] { build(spec); });
  CHECK(err.find((root / "grey" / "broken.png").string()) != std::string::npos);
  CHECK(err.find("cannot decode") != std::string::npos);
  CHECK(err.find("skip_bad_images") != std::string::npos);
  json skip = spec;
  skip["skip_bad_images"] = true;
  auto ds = build(skip);
  CHECK(ds->data().train.size() + ds->data().val.size() + ds->data().test.size() == 15);

  const std::string no_root = isp_test::error_of([&] { build({{"type", "ImageFolder"}, {"root", (root / "nope").string()}}); });
  CHECK(no_root.find("not a folder") != std::string::npos);
  // At the option that gave the folder, not at the node (an overriding recipe may have set it).
  CHECK(no_root.rfind("data.json: /nodes/data/root: ", 0) == 0);
  fs::create_directories(root.parent_path() / "test" / "red");
  const std::string mismatch = isp_test::error_of([&] {
    build({{"type", "ImageFolder"}, {"root", root.string()}, {"test_root", (root.parent_path() / "test").string()},
           {"skip_bad_images", true}});
  });
  CHECK(mismatch.find("class folder") != std::string::npos);
  CHECK(mismatch.rfind("data.json: /nodes/data/test_root: ", 0) == 0);
  fs::create_directories(root / "empty");
  const std::string empty = isp_test::error_of([&] { build(skip); });
  CHECK(empty.find("empty: no .png") != std::string::npos);
  fs::remove_all(root.parent_path());
}

TEST_CASE("ImageFolder: cache_file keeps the decoded images and is renewed when a file changes") {
  const fs::path root = make_folder("imagefolder_cache");
  const fs::path cache = root.parent_path() / "decoded.isp";
  const json spec = {{"type", "ImageFolder"}, {"root", root.string()}, {"image_size", 10}, {"cache_file", cache.string()}};
  const at::Tensor first = build(spec)->data().train.images;
  REQUIRE(fs::exists(cache));
  const auto written = fs::last_write_time(cache);
  CHECK(build(spec)->data().train.images.equal(first));  // from the cache
  CHECK(fs::last_write_time(cache) == written);
  // A changed image (other content, other size): decoded again, the cache rewritten.
  write_png(root / "red" / "r0.png", 9, 9, 3, [](int, int, int c) { return c == 1 ? 255 : 0; });
  const at::Tensor second = build(spec)->data().train.images;
  CHECK(fs::last_write_time(cache) != written);
  CHECK(!second.equal(first));
  fs::remove_all(root.parent_path());
}
