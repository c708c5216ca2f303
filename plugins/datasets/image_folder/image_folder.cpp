// ImageFolder: root/<class>/*.{png,jpg,jpeg,bmp} (torchvision's layout), class names from the folder names.
// Decoded with stb_image (Debian's libstb-dev) in parallel (oneTBB), resized to a square side, kept in memory as
// uint8 and turned into the usual normalised bundle (isp::make_bundle). A file that cannot be read or decoded is
// an error naming it, or with skip_bad_images a counted warning. `cache_file` keeps the decoded images on disk so
// a second run skips decoding.
#include <ATen/ATen.h>

#include <algorithm>
#include <atomic>
#include <cctype>
#include <cmath>
#include <cstdio>
#include <cstring>
#include <filesystem>
#include <fstream>
#include <mutex>

#ifdef ISP_HAVE_TBB
#include <tbb/parallel_for.h>
#endif

#define STB_IMAGE_IMPLEMENTATION
#define STB_IMAGE_STATIC
#define STBI_ONLY_PNG
#define STBI_ONLY_JPEG
#define STBI_ONLY_BMP
#include <stb/stb_image.h>

#include "isp/checkpoint.h"
#include "isp/interfaces/dataset.h"
#include "isp/registry/plugin.h"

namespace fs = std::filesystem;

namespace {

struct ImageFolderOptions : isp::ImageDatasetOptions {
  std::string root;            // training images: root/<class>/*
  std::string test_root;       // test images, same class folders; "" = hold out test_fraction of root
  double test_fraction = 0.2;
  int64_t image_size = 64;     // every image becomes image_size x image_size
  std::string resize = "stretch";
  int64_t channels = 3;
  bool skip_bad_images = false;
  std::string cache_file;
  double foreground_above = -1;
  ImageFolderOptions() {
    pad_to = 0;
    replicate_channels = false;
    mean = {0.485, 0.456, 0.406};  // ImageNet's, as torchvision's pretrained models expect
    std = {0.229, 0.224, 0.225};
  }
  template <class V> void visit(V& v) {
    v("root", root, "training images: root/<class>/*.{png,jpg,jpeg,bmp}; class names are the folder names", isp::required());
    v("test_root", test_root, "test images in the same class folders; empty: hold out test_fraction of root");
    v("test_fraction", test_fraction, "without test_root: stratified share of root held out as the test split",
      isp::between(0.01, 0.9));
    v("image_size", image_size, "side of the square images after resizing", isp::between(8, 1024));
    v("resize", resize, "stretch: to image_size x image_size; crop: shorter side to image_size, then centre crop",
      isp::one_of({"stretch", "crop"}));
    v("channels", channels, "decoded channels (1 = grey, 3 = RGB)", isp::one_of({1, 3}));
    v("skip_bad_images", skip_bad_images, "leave out (and count) files that cannot be read or decoded instead of failing");
    v("cache_file", cache_file, "keep the decoded images in this file; reused while the folder and options are unchanged");
    v("foreground_above", foreground_above, "pixels whose raw intensity (0..1) exceeds this are the object (saliency "
      "metric mass on object); < 0: not defined", isp::between(-1, 1));
    isp::ImageDatasetOptions::visit(v);
  }
};

bool is_image(const fs::path& p) {
  std::string e = p.extension().string();
  for (auto& c : e) c = static_cast<char>(std::tolower(static_cast<unsigned char>(c)));
  return e == ".png" || e == ".jpg" || e == ".jpeg" || e == ".bmp";
}

struct FileList {
  std::vector<std::string> files;
  std::vector<int64_t> labels;
};

// `option` names the option that gave `root` ("root" or "test_root"): errors point at it.
std::vector<std::string> class_folders(const std::string& root, const std::string& option) {
  if (!fs::is_directory(root)) throw isp::OptionError(option, root + ": not a folder (ImageFolder expects root/<class>/<image>)");
  std::vector<std::string> names;
  for (const auto& e : fs::directory_iterator(root))
    if (e.is_directory()) names.push_back(e.path().filename().string());
  std::sort(names.begin(), names.end());
  if (names.size() < 2) throw isp::OptionError(option, root + ": found " + std::to_string(names.size()) + " class folder(s); expected at least 2");
  return names;
}

FileList list_files(const std::string& root, const std::string& option, const std::vector<std::string>& classes) {
  FileList l;
  for (std::size_t c = 0; c < classes.size(); ++c) {
    const fs::path dir = fs::path(root) / classes[c];
    if (!fs::is_directory(dir)) throw isp::OptionError(option, dir.string() + ": class folder missing (the training root has it)");
    std::vector<std::string> files;
    for (const auto& e : fs::directory_iterator(dir))
      if (e.is_regular_file() && is_image(e.path())) files.push_back(e.path().string());
    if (files.empty()) throw isp::OptionError(option, dir.string() + ": no .png, .jpg, .jpeg or .bmp files");
    std::sort(files.begin(), files.end());
    for (auto& f : files) {
      l.files.push_back(std::move(f));
      l.labels.push_back(static_cast<int64_t>(c));
    }
  }
  return l;
}

// Separable resampling with a triangle filter widened by the scale when shrinking (antialiased bilinear, as
// PIL's and torchvision's antialias=True resize): src [h][w][c] uint8 -> dst [oh][ow][c].
std::vector<float> resample_axis(const std::vector<float>& src, int64_t n_outer, int64_t n_in, int64_t n_out, int64_t stride_in,
                                 int64_t inner) {
  // src laid out as [n_outer][n_in][inner]; result [n_outer][n_out][inner].
  std::vector<float> dst(static_cast<std::size_t>(n_outer * n_out * inner), 0.f);
  const double scale = static_cast<double>(n_in) / static_cast<double>(n_out);
  const double support = std::max(1.0, scale);
  for (int64_t o = 0; o < n_out; ++o) {
    const double centre = (o + 0.5) * scale - 0.5;
    const int64_t lo = std::max<int64_t>(0, static_cast<int64_t>(std::floor(centre - support)));
    const int64_t hi = std::min<int64_t>(n_in - 1, static_cast<int64_t>(std::ceil(centre + support)));
    std::vector<double> wts;
    double total = 0;
    for (int64_t i = lo; i <= hi; ++i) {
      const double wgt = std::max(0.0, 1.0 - std::abs((i - centre) / support));
      wts.push_back(wgt);
      total += wgt;
    }
    if (total <= 0) continue;
    for (int64_t a = 0; a < n_outer; ++a)
      for (int64_t i = lo; i <= hi; ++i) {
        const float wgt = static_cast<float>(wts[static_cast<std::size_t>(i - lo)] / total);
        const float* s = src.data() + (a * n_in + i) * stride_in;
        float* d = dst.data() + (a * n_out + o) * inner;
        for (int64_t k = 0; k < inner; ++k) d[k] += wgt * s[k];
      }
  }
  return dst;
}

// Decodes, resizes and writes image i into out[i] ([C, S, S] uint8). Returns "" or why it failed.
std::string load_one(const std::string& path, const ImageFolderOptions& o, uint8_t* out) {
  std::ifstream in(path, std::ios::binary);
  if (!in) return std::string("cannot open (") + std::strerror(errno) + ")";
  std::string bytes((std::istreambuf_iterator<char>(in)), std::istreambuf_iterator<char>());
  int w = 0, h = 0, c = 0;
  const int want = static_cast<int>(o.channels);
  unsigned char* px = stbi_load_from_memory(reinterpret_cast<const unsigned char*>(bytes.data()),
                                            static_cast<int>(bytes.size()), &w, &h, &c, want);
  if (!px) return std::string("cannot decode (") + stbi_failure_reason() + ")";
  std::vector<float> img(static_cast<std::size_t>(w) * h * want);
  for (std::size_t k = 0; k < img.size(); ++k) img[k] = px[k];
  stbi_image_free(px);
  // Target size before the centre crop: stretch to SxS, or the shorter side to S.
  const int64_t S = o.image_size;
  int64_t th = S, tw = S;
  if (o.resize == "crop") {
    if (h < w) tw = std::max<int64_t>(S, static_cast<int64_t>(std::llround(static_cast<double>(w) * S / h)));
    else th = std::max<int64_t>(S, static_cast<int64_t>(std::llround(static_cast<double>(h) * S / w)));
  }
  // Rows: [1][h][w*c] -> [1][th][w*c]; columns: [th][w][c] -> [th][tw][c].
  std::vector<float> rows = resample_axis(img, 1, h, th, static_cast<int64_t>(w) * want, static_cast<int64_t>(w) * want);
  std::vector<float> both = resample_axis(rows, th, w, tw, want, want);
  const int64_t y0 = (th - S) / 2, x0 = (tw - S) / 2;
  for (int64_t ch = 0; ch < want; ++ch)
    for (int64_t y = 0; y < S; ++y)
      for (int64_t x = 0; x < S; ++x) {
        const float v = both[static_cast<std::size_t>(((y + y0) * tw + (x + x0)) * want + ch)];
        out[(ch * S + y) * S + x] = static_cast<uint8_t>(std::clamp(std::lround(v), 0L, 255L));
      }
  return "";
}

struct Decoded {
  at::Tensor images, labels;  // uint8 [N, C, S, S], int64 [N]
};

Decoded decode_all(const FileList& l, const ImageFolderOptions& o) {
  const int64_t n = static_cast<int64_t>(l.files.size()), S = o.image_size, C = o.channels;
  at::Tensor images = at::empty({n, C, S, S}, at::kByte);
  std::vector<std::string> errors(static_cast<std::size_t>(n));
  uint8_t* base = images.data_ptr<uint8_t>();
  auto one = [&](int64_t i) { errors[static_cast<std::size_t>(i)] = load_one(l.files[static_cast<std::size_t>(i)], o, base + i * C * S * S); };
#ifdef ISP_HAVE_TBB
  tbb::parallel_for(int64_t{0}, n, one);
#else
  for (int64_t i = 0; i < n; ++i) one(i);
#endif
  std::vector<int64_t> keep;
  int64_t bad = 0;
  std::string first_bad;
  for (int64_t i = 0; i < n; ++i) {
    const std::string& e = errors[static_cast<std::size_t>(i)];
    if (e.empty()) {
      keep.push_back(i);
      continue;
    }
    const std::string what = l.files[static_cast<std::size_t>(i)] + ": " + e;
    if (!o.skip_bad_images) throw isp::DataError(what + " (set skip_bad_images to leave such files out)");
    if (bad++ == 0) first_bad = what;
  }
  if (bad > 0)
    std::fprintf(stderr, "[ImageFolder] WARNING: skipped %lld of %lld files that could not be read or decoded (first: %s)\n",
                 static_cast<long long>(bad), static_cast<long long>(n), first_bad.c_str());
  if (keep.empty()) throw isp::OptionError("root", o.root + ": no image could be decoded");
  const at::Tensor idx = at::tensor(keep, at::kLong);
  return {images.index_select(0, idx), at::tensor(l.labels, at::kLong).index_select(0, idx)};
}

// What the cache must match: the files (names, sizes, times) and the decoding options.
isp::json cache_key(const FileList& tr, const FileList& te, const ImageFolderOptions& o) {
  uint64_t h = 1469598103934665603ULL;
  auto mix = [&](const std::string& s) {
    for (unsigned char ch : s) h = (h ^ ch) * 1099511628211ULL;
  };
  for (const FileList* l : {&tr, &te})
    for (const auto& f : l->files) {
      std::error_code ec;
      mix(f + "|" + std::to_string(fs::file_size(f, ec)) + "|" +
          std::to_string(fs::last_write_time(f, ec).time_since_epoch().count()));
    }
  return {{"files", tr.files.size() + te.files.size()}, {"hash", std::to_string(h)}, {"image_size", o.image_size},
          {"resize", o.resize}, {"channels", o.channels}, {"skip_bad_images", o.skip_bad_images}};
}

std::shared_ptr<isp::Dataset> make_image_folder(const ImageFolderOptions& o, isp::BuildContext&) {
  const std::vector<std::string> classes = class_folders(o.root, "root");
  const FileList train_files = list_files(o.root, "root", classes);
  FileList test_files;
  if (!o.test_root.empty()) {
    const std::vector<std::string> test_classes = class_folders(o.test_root, "test_root");
    if (test_classes != classes)
      throw isp::OptionError("test_root", o.test_root + ": its class folders differ from " + o.root + "'s (" +
                           std::to_string(test_classes.size()) + " vs " + std::to_string(classes.size()) + ")");
    test_files = list_files(o.test_root, "test_root", classes);
  }
  Decoded train, test;
  const isp::json key = cache_key(train_files, test_files, o);
  bool cached = false;
  if (!o.cache_file.empty() && fs::exists(o.cache_file)) {
    try {
      isp::CheckpointReader r(o.cache_file);
      if (r.meta().value("key", isp::json()) == key) {
        train = {r.tensor("train_images"), r.tensor("train_labels")};
        if (r.has("test_images")) test = {r.tensor("test_images"), r.tensor("test_labels")};
        cached = true;
      }
    } catch (const isp::Error& e) {
      std::fprintf(stderr, "[ImageFolder] cache %s unusable (%s); decoding again\n", o.cache_file.c_str(), e.what());
    }
  }
  if (!cached) {
    train = decode_all(train_files, o);
    if (!o.test_root.empty()) test = decode_all(test_files, o);
    if (!o.cache_file.empty()) {
      isp::CheckpointWriter w;
      w.tensor("train_images", train.images);
      w.tensor("train_labels", train.labels);
      if (test.images.defined()) {
        w.tensor("test_images", test.images);
        w.tensor("test_labels", test.labels);
      }
      w.meta({{"key", key}, {"root", o.root}, {"test_root", o.test_root}});
      w.save_atomic(o.cache_file);
    }
  }
  if (!test.images.defined()) {
    // No test folder: a stratified, seeded share of root is the test split.
    const int64_t n = train.labels.size(0);
    const int64_t n_test = std::max<int64_t>(1, static_cast<int64_t>(o.test_fraction * static_cast<double>(n)));
    std::vector<int64_t> test_idx = isp::stratified_indices(train.labels, n_test, static_cast<uint64_t>(o.split_seed) + 17);
    std::vector<char> is_test(static_cast<std::size_t>(n), 0);
    for (auto i : test_idx) is_test[static_cast<std::size_t>(i)] = 1;
    std::vector<int64_t> rest;
    for (int64_t i = 0; i < n; ++i)
      if (!is_test[static_cast<std::size_t>(i)]) rest.push_back(i);
    const at::Tensor ti = at::tensor(test_idx, at::kLong), ri = at::tensor(rest, at::kLong);
    test = {train.images.index_select(0, ti), train.labels.index_select(0, ti)};
    train = {train.images.index_select(0, ri), train.labels.index_select(0, ri)};
  }
  isp::DataBundle b = isp::make_bundle(train.images, train.labels, test.images, test.labels, classes, o,
                                       "ImageFolder " + o.root + " (" + std::to_string(o.image_size) + " px)");
  b.foreground_above = o.foreground_above;
  return std::make_shared<isp::BundleDataset>(std::move(b));
}

}  // namespace

ISP_PLUGIN("0.1.0");
ISP_REGISTER(isp::Dataset, "ImageFolder", 1, ImageFolderOptions, make_image_folder,
             "images in class folders (root/<class>/*.png|jpg|jpeg|bmp), decoded with stb_image, resized to a square");
