// libFuzzer target: the IDX (gzip or raw) and CIFAR-10/100 readers the dataset plugins use, on arbitrary bytes.
// Input: one mode byte, then the file. Modes: 0 IDX images (3 dims), 1 IDX labels (1 dim), 2 CIFAR-10 batch,
// 3 CIFAR-100 batch, 4 an IDX image/label pair (two bytes give the image file's length, the rest is the labels).
// Expected failures are isp::Error (isp::DataError); anything else escaping, a crash, a sanitizer report or a
// hang is a finding.
#include <unistd.h>

#include <cstdint>
#include <cstdio>
#include <cstdlib>
#include <exception>
#include <filesystem>
#include <fstream>
#include <string>
#include <vector>

#include "cifar/cifar_reader.h"
#include "idx/idx_reader.h"

namespace {
const std::string& work_dir() {
  static const std::string dir = [] {
    std::string d = std::filesystem::temp_directory_path().string() + "/isp_fuzz_data_" + std::to_string(::getpid());
    std::filesystem::create_directories(d);
    return d;
  }();
  return dir;
}
std::string write(const std::string& name, const uint8_t* data, std::size_t size) {
  const std::string path = work_dir() + "/" + name;
  std::ofstream(path, std::ios::binary | std::ios::trunc).write(reinterpret_cast<const char*>(data), size);
  return path;
}
// What a reader accepted must be what its header promised.
void expect(bool ok, const char* what) {
  if (!ok) {
    std::fprintf(stderr, "accepted input breaks an invariant: %s\n", what);
    std::abort();
  }
}
}  // namespace

extern "C" int LLVMFuzzerTestOneInput(const uint8_t* data, std::size_t size) {
  if (size < 1) return 0;
  const int mode = data[0] % 5;
  ++data;
  --size;
  try {
    if (mode == 0 || mode == 1) {
      const uint8_t ndim = mode == 0 ? 3 : 1;
      const auto f = isp::idx::read_idx(write("file.idx", data, size), ndim);
      std::size_t total = 1;
      for (int64_t d : f.dims) total *= static_cast<std::size_t>(d);
      expect(f.dims.size() == ndim && f.data.size() == total, "IDX data size equals the product of its dimensions");
    } else if (mode == 2 || mode == 3) {
      std::vector<uint8_t> images;
      std::vector<int64_t> labels;
      const int64_t classes = mode == 2 ? 10 : 100;
      isp::cifar::read_batch(write("batch.bin", data, size), mode == 2 ? 1 : 2, classes, images, labels);
      expect(images.size() == labels.size() * isp::cifar::kPixels, "one image per label");
      for (int64_t y : labels) expect(y >= 0 && y < classes, "labels within the classes");
    } else {
      if (size < 2) return 0;
      const std::size_t first = std::min<std::size_t>(size - 2, (std::size_t(data[0]) << 8) | data[1]);
      const std::string ip = write("images.idx", data + 2, first), lp = write("labels.idx", data + 2 + first, size - 2 - first);
      const auto [im, lb] = isp::idx::read_split(ip, lp, 10);
      expect(im.dims[0] == lb.dims[0], "as many images as labels");
      for (uint8_t y : lb.data) expect(y < 10, "labels within the classes");
    }
  } catch (const isp::Error&) {
    // the expected way to reject an input
  } catch (const std::exception& e) {
    std::fprintf(stderr, "uncaught non-isp exception: %s\n", e.what());
    std::abort();
  }
  return 0;
}
