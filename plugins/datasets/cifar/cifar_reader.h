#pragma once
// Reading CIFAR-10/100 binary batches into bytes, with the checks a damaged or hand-made file needs. No LibTorch
// here: bench/fuzz.sh (target `data`) builds this header alone; cifar_dataset.cpp makes the tensors.
#include <cstdint>
#include <filesystem>
#include <fstream>
#include <string>
#include <vector>

#include "isp/registry/error.h"

namespace isp::cifar {

constexpr int64_t kPixels = 3 * 32 * 32;

// Appends the records of one batch file; CIFAR-100 records carry (coarse, fine) labels, we keep the fine one.
inline void read_batch(const std::string& path, int64_t label_bytes, int64_t num_classes, std::vector<uint8_t>& images,
                       std::vector<int64_t>& labels) {
  std::error_code ec;
  if (!std::filesystem::exists(path, ec)) throw DataError(path + ": missing CIFAR batch file");
  if (!std::filesystem::is_regular_file(path, ec)) throw DataError(path + ": not a regular file");
  const auto file_size = std::filesystem::file_size(path, ec);
  if (ec) throw DataError(path + ": cannot read its size (" + ec.message() + ")");
  std::ifstream in(path, std::ios::binary);
  if (!in) throw DataError(path + ": cannot open");
  const int64_t record = label_bytes + kPixels;
  const auto size = static_cast<int64_t>(file_size);
  if (size == 0 || size % record != 0)
    throw DataError(path + ": size " + std::to_string(size) + " is not a multiple of the " + std::to_string(record) +
                    "-byte record (truncated or not a CIFAR-" + std::to_string(num_classes) + " batch)");
  std::vector<uint8_t> buf(static_cast<std::size_t>(size));
  if (!in.read(reinterpret_cast<char*>(buf.data()), size)) throw DataError(path + ": read failed");
  for (int64_t off = 0; off < size; off += record) {
    const int64_t label = buf[static_cast<std::size_t>(off + label_bytes - 1)];
    if (label >= num_classes)
      throw DataError(path + ": record " + std::to_string(off / record) + " has label " + std::to_string(label) +
                      " outside 0.." + std::to_string(num_classes - 1));
    labels.push_back(label);
    images.insert(images.end(), buf.begin() + off + label_bytes, buf.begin() + off + record);
  }
}

}  // namespace isp::cifar
