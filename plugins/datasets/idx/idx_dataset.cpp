// Fashion-MNIST / MNIST from IDX files (gzip or raw), e.g. Debian's dataset-fashion-mnist.
#include <ATen/ATen.h>

#include <cstring>
#include <filesystem>
#include <memory>

#include "isp/interfaces/dataset.h"
#include "isp/registry/plugin.h"
#include "idx_reader.h"

namespace fs = std::filesystem;

namespace {

// Finds `<stem>.gz`, `<stem>`, or the dotted variant (`train-images.idx3-ubyte`) inside root.
std::string locate(const std::string& root, const std::string& stem) {
  std::string dotted = stem;
  auto dash = dotted.rfind("-idx");
  if (dash != std::string::npos) dotted[dash] = '.';
  for (const auto& name : {stem + ".gz", stem, dotted + ".gz", dotted}) {
    fs::path p = fs::path(root) / name;
    std::error_code ec;
    if (fs::exists(p, ec)) return p.string();
  }
  throw isp::OptionError("root", root + ": missing " + stem + "(.gz) (install Debian's dataset-fashion-mnist, or set \"root\")");
}

std::pair<at::Tensor, at::Tensor> load_split(const std::string& root, const std::string& prefix, int64_t num_classes) {
  std::string ip = locate(root, prefix + "-images-idx3-ubyte"), lp = locate(root, prefix + "-labels-idx1-ubyte");
  auto [im, lb] = isp::idx::read_split(ip, lp, num_classes);
  at::Tensor x = at::empty({im.dims[0], 1, im.dims[1], im.dims[2]}, at::kByte);
  std::memcpy(x.data_ptr<uint8_t>(), im.data.data(), im.data.size());
  at::Tensor y = at::empty({lb.dims[0]}, at::kByte);
  std::memcpy(y.data_ptr<uint8_t>(), lb.data.data(), lb.data.size());
  return {x, y.to(at::kLong)};
}

template <int Variant>
struct IdxOptions : isp::ImageDatasetOptions {
  std::string root = Variant == 0 ? "/usr/share/datasets/fashion-mnist" : "/usr/share/datasets/mnist";
  IdxOptions() { mean = {0.2860}; std = {0.3530}; }
  template <class V> void visit(V& v) {
    v("root", root, "folder with {train,t10k}-{images-idx3,labels-idx1}-ubyte[.gz]");
    isp::ImageDatasetOptions::visit(v);
  }
};

const std::vector<std::string> kFashionClasses{"T-shirt/top", "Trouser", "Pullover", "Dress", "Coat",
                                               "Sandal",      "Shirt",   "Sneaker",  "Bag",   "Ankle boot"};
const std::vector<std::string> kDigits{"0", "1", "2", "3", "4", "5", "6", "7", "8", "9"};

template <int Variant>
std::shared_ptr<isp::Dataset> make_idx(const IdxOptions<Variant>& o, isp::BuildContext&) {
  auto [xtr, ytr] = load_split(o.root, "train", 10);
  auto [xte, yte] = load_split(o.root, "t10k", 10);
  isp::DataBundle b = isp::make_bundle(xtr, ytr, xte, yte, Variant == 0 ? kFashionClasses : kDigits, o,
                                       (Variant == 0 ? "Fashion-MNIST " : "MNIST ") + o.root);
  b.foreground_above = 0.0;  // objects on a black background: every pixel brighter than black is the object's
  return std::make_shared<isp::BundleDataset>(std::move(b));
}

}  // namespace

ISP_PLUGIN("0.1.0");
ISP_REGISTER(isp::Dataset, "FashionMNIST", 1, IdxOptions<0>, make_idx<0>,
             "Fashion-MNIST from IDX files (gzip or raw); default: Debian's dataset-fashion-mnist");
ISP_REGISTER(isp::Dataset, "MNIST", 1, IdxOptions<1>, make_idx<1>, "MNIST digits from IDX files (gzip or raw)");
