// CIFAR-10 / CIFAR-100 from the official binary batches (cifar-10-batches-bin, cifar-100-binary).
#include <ATen/ATen.h>

#include <cstring>
#include <filesystem>
#include <fstream>

#include "isp/interfaces/dataset.h"
#include "isp/registry/plugin.h"
#include "cifar_reader.h"

namespace fs = std::filesystem;

namespace {

using isp::cifar::kPixels;
using isp::cifar::read_batch;

std::vector<std::string> read_names(const std::string& path, std::size_t n, std::vector<std::string> fallback) {
  std::ifstream in(path);
  std::vector<std::string> out;
  for (std::string line; in && std::getline(in, line);)
    if (!line.empty()) out.push_back(line);
  if (out.size() == n) return out;
  if (fallback.size() == n) return fallback;
  fallback.clear();
  for (std::size_t i = 0; i < n; ++i) fallback.push_back("class_" + std::to_string(i));
  return fallback;
}

template <int Classes>
struct CifarOptions : isp::ImageDatasetOptions {
  std::string root = Classes == 10 ? "data/cifar-10-batches-bin" : "data/cifar-100-binary";
  CifarOptions() {
    mean = {0.4914, 0.4822, 0.4465};  // docs/method.md §1a
    std = {0.2023, 0.1994, 0.2010};
  }
  template <class V> void visit(V& v) {
    v("root", root, Classes == 10 ? "folder with data_batch_{1..5}.bin and test_batch.bin"
                                  : "folder with train.bin and test.bin");
    isp::ImageDatasetOptions::visit(v);
  }
};

at::Tensor to_tensor(std::vector<uint8_t>& images) {
  int64_t n = static_cast<int64_t>(images.size()) / kPixels;
  at::Tensor x = at::empty({n, 3, 32, 32}, at::kByte);
  std::memcpy(x.data_ptr<uint8_t>(), images.data(), images.size());
  return x;
}

template <int Classes>
std::shared_ptr<isp::Dataset> make_cifar(const CifarOptions<Classes>& o, isp::BuildContext&) {
  std::vector<uint8_t> tr, te;
  std::vector<int64_t> ytr, yte;
  std::vector<std::string> names;
  try {
    if (Classes == 10) {
      for (int i = 1; i <= 5; ++i) read_batch(o.root + "/data_batch_" + std::to_string(i) + ".bin", 1, 10, tr, ytr);
      read_batch(o.root + "/test_batch.bin", 1, 10, te, yte);
      names = read_names(o.root + "/batches.meta.txt", 10,
                         {"airplane", "automobile", "bird", "cat", "deer", "dog", "frog", "horse", "ship", "truck"});
    } else {
      read_batch(o.root + "/train.bin", 2, 100, tr, ytr);
      read_batch(o.root + "/test.bin", 2, 100, te, yte);
      names = read_names(o.root + "/fine_label_names.txt", 100, {});
    }
  } catch (const isp::DataError& e) {
    throw isp::OptionError("root", e.what());  // every file read here is under root: the error points at it
  }
  return std::make_shared<isp::BundleDataset>(isp::make_bundle(to_tensor(tr), at::tensor(ytr, at::kLong), to_tensor(te),
                                                               at::tensor(yte, at::kLong), names, o,
                                                               "CIFAR-" + std::to_string(Classes) + " " + o.root));
}

}  // namespace

ISP_PLUGIN("0.1.0");
ISP_REGISTER(isp::Dataset, "CIFAR10", 1, CifarOptions<10>, make_cifar<10>, "CIFAR-10 binary batches");
ISP_REGISTER(isp::Dataset, "CIFAR100", 1, CifarOptions<100>, make_cifar<100>, "CIFAR-100 binary batches (fine labels)");
