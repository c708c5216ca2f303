#pragma once
// Reading IDX files (gzip or raw) into bytes, with every check a damaged or hand-made file needs. No LibTorch
// here: bench/fuzz.sh (target `data`) builds this header alone; idx_dataset.cpp turns the bytes into tensors.
#include <zlib.h>

#include <algorithm>
#include <cstdint>
#include <filesystem>
#include <memory>
#include <string>
#include <utility>
#include <vector>

#include "isp/registry/error.h"

namespace isp::idx {

struct IdxFile {
  std::vector<int64_t> dims;
  std::vector<uint8_t> data;
};

constexpr int64_t kMaxDimension = 1 << 24;
constexpr int64_t kMaxBytes = int64_t(1) << 36;  // 64 GiB: more than any IDX dataset; a larger header is damage

// gzread reads plain files transparently, so one reader serves both forms. Memory grows with the bytes actually
// read, never with what the header claims, so a header promising 10^12 bytes in a 1 kB file costs nothing.
inline IdxFile read_idx(const std::string& path, uint8_t expected_ndim) {
  std::error_code ec;
  if (!std::filesystem::is_regular_file(path, ec)) throw DataError(path + ": not a regular file");
  std::unique_ptr<gzFile_s, int (*)(gzFile)> f(gzopen(path.c_str(), "rb"), gzclose);
  if (!f) throw DataError(path + ": cannot open");
  unsigned char head[4];
  if (gzread(f.get(), head, 4) != 4) throw DataError(path + ": truncated: no IDX header");
  if (head[0] != 0 || head[1] != 0 || head[2] != 0x08 || head[3] != expected_ndim)
    throw DataError(path + ": not an IDX file of unsigned bytes with " + std::to_string(expected_ndim) +
                    " dimensions (magic " + std::to_string(head[2]) + "/" + std::to_string(head[3]) + ")");
  IdxFile out;
  int64_t total = 1;
  for (int d = 0; d < expected_ndim; ++d) {
    unsigned char b[4];
    if (gzread(f.get(), b, 4) != 4) throw DataError(path + ": truncated header");
    const int64_t v = (int64_t(b[0]) << 24) | (int64_t(b[1]) << 16) | (int64_t(b[2]) << 8) | int64_t(b[3]);
    if (v <= 0 || v > kMaxDimension) throw DataError(path + ": implausible dimension " + std::to_string(v));
    out.dims.push_back(v);
    // Each factor is <= 2^24, so checking against the limit before multiplying rules out overflow.
    if (total > kMaxBytes / v)
      throw DataError(path + ": header claims more than " + std::to_string(kMaxBytes >> 30) +
                      " GiB of data (dimension " + std::to_string(d) + " is " + std::to_string(v) + ")");
    total *= v;
  }
  int64_t got = 0;
  while (got < total) {
    const int64_t want = std::min<int64_t>(total - got, std::max<int64_t>(got, 1 << 16));  // doubles as data arrives
    out.data.resize(static_cast<std::size_t>(got + want));
    const int n = gzread(f.get(), out.data.data() + got, static_cast<unsigned>(std::min<int64_t>(want, 1 << 30)));
    if (n < 0) {
      int err = 0;
      const char* msg = gzerror(f.get(), &err);
      throw DataError(path + ": corrupt data (" + std::string(msg ? msg : "zlib error") + ")");
    }
    got += n;
    if (n == 0) break;
  }
  out.data.resize(static_cast<std::size_t>(got));
  if (got != total)
    throw DataError(path + ": truncated: expected " + std::to_string(total) + " bytes of data after the header, got " +
                    std::to_string(got));
  return out;
}

// An image file (N x rows x cols) and its label file (N), checked against each other and the class count.
inline std::pair<IdxFile, IdxFile> read_split(const std::string& images_path, const std::string& labels_path,
                                              int64_t num_classes) {
  IdxFile im = read_idx(images_path, 3), lb = read_idx(labels_path, 1);
  if (im.dims[0] != lb.dims[0])
    throw DataError(images_path + ": " + std::to_string(im.dims[0]) + " images but " + labels_path + " has " +
                    std::to_string(lb.dims[0]) + " labels");
  for (std::size_t i = 0; i < lb.data.size(); ++i)
    if (lb.data[i] >= num_classes)
      throw DataError(labels_path + ": label " + std::to_string(lb.data[i]) + " at index " + std::to_string(i) +
                      " is outside 0.." + std::to_string(num_classes - 1));
  return {std::move(im), std::move(lb)};
}

}  // namespace isp::idx
