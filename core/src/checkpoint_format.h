#pragma once
// The checkpoint container, without LibTorch: a JSON header naming every tensor (dtype, shape, where its bytes
// are), the raw little-endian bytes, and a CRC-32 of everything before it.
//
//   "ISPCKPT1" | u64 header length | header JSON | zero padding to 64 | tensor bytes (each 64-aligned) |
//   "ISPCRC32" | u64 CRC-32 of all bytes before this trailer
//
// Why our own format rather than a LibTorch archive: a torch archive is loaded by torch::jit::load, which
// compiles the archive's TorchScript code; a damaged or hand-made file reaches that parser. Here the CRC is
// checked first, and what follows it is parsed by code that bench/fuzz.sh fuzzes (target `checkpoint`). The
// format is the same under every LibTorch version, and layout-free (tensors are stored contiguous).
#include <cstdint>
#include <string>
#include <vector>

#include "isp/registry/options.h"

namespace isp::checkpoint_format {

// Limits on what the file decides (an error past them): nesting of the meta JSON, number of tensors, rank.
constexpr int kMaxMetaNesting = 256;
constexpr std::size_t kMaxTensors = 1u << 20;
constexpr std::size_t kMaxRank = 16;

// Bytes per element of a dtype name ("float32", "int64", ...); 0 if the name is unknown.
std::size_t dtype_size(const std::string& dtype);

struct TensorBytes {  // for writing: contiguous bytes of one tensor
  std::string name, dtype;
  std::vector<int64_t> shape;
  const void* data = nullptr;
  std::size_t nbytes = 0;
};

struct TensorRecord {  // after reading: where a tensor's bytes are inside the file's bytes
  std::string name, dtype;
  std::vector<int64_t> shape;
  std::size_t offset = 0, nbytes = 0;  // relative to the whole file
};

struct Contents {
  json meta;
  std::vector<std::string> entries;  // what the writer named: modules, optimizers, tensors
  std::vector<TensorRecord> tensors;
};

// The whole file, ready for write_file_atomic. Throws isp::Error on a duplicate tensor name or a size mismatch.
std::string encode(const json& meta, const std::vector<std::string>& entries, const std::vector<TensorBytes>& tensors);

// Parses and checks `bytes` (a whole file; `path` names it in errors): magic, CRC, header, every tensor's dtype,
// shape and byte range. Throws isp::Error "<path>: ..." on anything wrong; never reads outside `bytes`.
Contents decode(const std::string& bytes, const std::string& path);

// CRC-32 (zlib's polynomial) of `n` bytes.
uint32_t crc32_of(const void* data, std::size_t n);

}  // namespace isp::checkpoint_format
