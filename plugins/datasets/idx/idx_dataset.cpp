// Fashion-MNIST / MNIST from IDX files (gzip or raw), e.g. Debian's dataset-fashion-mnist.
#include <ATen/ATen.h>
#include <zlib.h>

#include <cstring>
#include <filesystem>
#include <memory>

#include "isp/interfaces/dataset.h"
#include "isp/registry/plugin.h"

namespace fs = std::filesystem;

namespace {

struct IdxFile {
  std::vector<int64_t> dims;
  std::vector<uint8_t> data;
};

// Finds `<stem>.gz`, `<stem>`, or the dotted variant (`train-images.idx3-ubyte`) inside root.
std::string locate(const std::string& root, const std::string& stem) {
  std::string dotted = stem;
  auto dash = dotted.rfind("-idx");
  if (dash != std::string::npos) dotted[dash] = '.';
  for (const auto& name : {stem + ".gz", stem, dotted + ".gz", dotted}) {
    fs::path p = fs::path(root) / name;
    if (fs::exists(p)) return p.string();
  }
  throw isp::DataError(root + ": missing " + stem + "(.gz) (install Debian's dataset-fashion-mnist, or set \"root\")");
}

// gzread reads plain files transparently, so one reader serves both forms.
IdxFile read_idx(const std::string& path, uint8_t expected_ndim) {
  std::unique_ptr<gzFile_s, int (*)(gzFile)> f(gzopen(path.c_str(), "rb"), gzclose);
  if (!f) throw isp::DataError(path + ": cannot open");
  unsigned char head[4];
  if (gzread(f.get(), head, 4) != 4) throw isp::DataError(path + ": truncated: no IDX header");
  if (head[0] != 0 || head[1] != 0 || head[2] != 0x08 || head[3] != expected_ndim)
    throw isp::DataError(path + ": not an IDX file of unsigned bytes with " + std::to_string(expected_ndim) +
                         " dimensions (magic " + std::to_string(head[2]) + "/" + std::to_string(head[3]) + ")");
  IdxFile out;
  int64_t total = 1;
  for (int d = 0; d < expected_ndim; ++d) {
    unsigned char b[4];
    if (gzread(f.get(), b, 4) != 4) throw isp::DataError(path + ": truncated header");
    int64_t v = (int64_t(b[0]) << 24) | (int64_t(b[1]) << 16) | (int64_t(b[2]) << 8) | int64_t(b[3]);
    if (v <= 0 || v > (1 << 24)) throw isp::DataError(path + ": implausible dimension " + std::to_string(v));
    out.dims.push_back(v);
    total *= v;
  }
  out.data.resize(static_cast<std::size_t>(total));
  int64_t got = 0;
  while (got < total) {
    int chunk = static_cast<int>(std::min<int64_t>(total - got, 1 << 30));
    int n = gzread(f.get(), out.data.data() + got, static_cast<unsigned>(chunk));
    if (n < 0) {
      int err = 0;
      const char* msg = gzerror(f.get(), &err);
      throw isp::DataError(path + ": corrupt data (" + std::string(msg ? msg : "zlib error") + ")");
    }
    if (n == 0) break;
    got += n;
  }
  if (got != total)
    throw isp::DataError(path + ": truncated: expected " + std::to_string(total) + " bytes of data after the header, got " +
                         std::to_string(got));
  return out;
}

std::pair<at::Tensor, at::Tensor> load_split(const std::string& root, const std::string& prefix, int64_t num_classes) {
  std::string ip = locate(root, prefix + "-images-idx3-ubyte"), lp = locate(root, prefix + "-labels-idx1-ubyte");
  IdxFile im = read_idx(ip, 3), lb = read_idx(lp, 1);
  if (im.dims[0] != lb.dims[0])
    throw isp::DataError(ip + ": " + std::to_string(im.dims[0]) + " images but " + lp + " has " +
                         std::to_string(lb.dims[0]) + " labels");
  for (std::size_t i = 0; i < lb.data.size(); ++i)
    if (lb.data[i] >= num_classes)
      throw isp::DataError(lp + ": label " + std::to_string(lb.data[i]) + " at index " + std::to_string(i) +
                           " is outside 0.." + std::to_string(num_classes - 1));
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
  return std::make_shared<isp::BundleDataset>(isp::make_bundle(xtr, ytr, xte, yte, Variant == 0 ? kFashionClasses : kDigits,
                                                               o, (Variant == 0 ? "Fashion-MNIST " : "MNIST ") + o.root));
}

}  // namespace

ISP_PLUGIN("0.1.0");
ISP_REGISTER(isp::Dataset, "FashionMNIST", 1, IdxOptions<0>, make_idx<0>,
             "Fashion-MNIST from IDX files (gzip or raw); default: Debian's dataset-fashion-mnist");
ISP_REGISTER(isp::Dataset, "MNIST", 1, IdxOptions<1>, make_idx<1>, "MNIST digits from IDX files (gzip or raw)");
