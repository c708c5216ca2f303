// The checkpoint container (see checkpoint_format.h). No LibTorch here, so bench/fuzz.sh builds it alone.
#include "checkpoint_format.h"

#include <zlib.h>

#include <cstring>
#include <limits>
#include <set>

#include "isp/registry/error.h"
#include "isp/registry/recipe.h"

namespace isp::checkpoint_format {
namespace {

constexpr char kMagic[] = "ISPCKPT1";
constexpr char kTrailerMagic[] = "ISPCRC32";
constexpr std::size_t kMagicSize = 8, kPrefixSize = 16, kTrailerSize = 16, kAlign = 64;

void put_u64(std::string& out, uint64_t v) {
  for (int i = 0; i < 8; ++i) out.push_back(static_cast<char>((v >> (8 * i)) & 0xff));
}
uint64_t get_u64(const std::string& s, std::size_t at) {
  uint64_t v = 0;
  for (int i = 7; i >= 0; --i) v = (v << 8) | static_cast<unsigned char>(s[at + static_cast<std::size_t>(i)]);
  return v;
}
std::size_t align_up(std::size_t n) { return (n + kAlign - 1) / kAlign * kAlign; }

// The header's JSON comes from the file, so its nesting is bounded before nlohmann's recursive parser sees it.
json parse_header(const std::string& text, const std::string& path) {
  if (json_nests_deeper_than(text, kMaxMetaNesting))
    throw Error(path + ": damaged: header nested deeper than " + std::to_string(kMaxMetaNesting));
  try {
    return json::parse(text);
  } catch (const json::exception& e) {
    throw Error(path + ": damaged: header is not JSON (" + std::string(e.what()).substr(0, 200) + ")");
  }
}

// Element count of a shape, or -1 if a dimension is negative or the product overflows.
int64_t checked_numel(const std::vector<int64_t>& shape) {
  int64_t n = 1;
  for (int64_t d : shape) {
    if (d < 0) return -1;
    if (d != 0 && n > std::numeric_limits<int64_t>::max() / d) return -1;
    n *= d;
  }
  return n;
}

}  // namespace

std::size_t dtype_size(const std::string& dtype) {
  static const std::pair<const char*, std::size_t> kSizes[] = {
      {"float32", 4}, {"float64", 8}, {"float16", 2}, {"bfloat16", 2}, {"int64", 8}, {"int32", 4},
      {"int16", 2},   {"int8", 1},    {"uint8", 1},   {"bool", 1}};
  for (const auto& [name, size] : kSizes)
    if (dtype == name) return size;
  return 0;
}

uint32_t crc32_of(const void* data, std::size_t n) {
  uLong crc = ::crc32(0L, Z_NULL, 0);
  const auto* p = static_cast<const Bytef*>(data);
  while (n > 0) {  // zlib takes uInt lengths
    const uInt chunk = static_cast<uInt>(std::min<std::size_t>(n, 1u << 30));
    crc = ::crc32(crc, p, chunk);
    p += chunk;
    n -= chunk;
  }
  return static_cast<uint32_t>(crc);
}

std::string encode(const json& meta, const std::vector<std::string>& entries, const std::vector<TensorBytes>& tensors) {
  json records = json::array();
  std::set<std::string> names;
  std::size_t offset = 0;
  for (const auto& t : tensors) {
    if (!names.insert(t.name).second) throw Error("checkpoint: two tensors are named '" + t.name + "'");
    const int64_t numel = checked_numel(t.shape);
    if (dtype_size(t.dtype) == 0 || numel < 0 || static_cast<std::size_t>(numel) * dtype_size(t.dtype) != t.nbytes)
      throw Error("checkpoint: tensor '" + t.name + "' (" + t.dtype + ") does not match its byte count");
    records.push_back({{"name", t.name}, {"dtype", t.dtype}, {"shape", t.shape}, {"offset", offset}, {"nbytes", t.nbytes}});
    offset = align_up(offset + t.nbytes);
  }
  const std::string header = json{{"meta", meta}, {"entries", entries}, {"tensors", records}}.dump();
  std::string out;
  const std::size_t data_start = align_up(kPrefixSize + header.size());
  out.reserve(data_start + offset + kTrailerSize);
  out.append(kMagic, kMagicSize);
  put_u64(out, header.size());
  out += header;
  out.resize(data_start, '\0');
  for (const auto& t : tensors) {
    out.append(static_cast<const char*>(t.data), t.nbytes);
    out.resize(align_up(out.size() - data_start) + data_start, '\0');
  }
  const uint32_t crc = crc32_of(out.data(), out.size());
  out.append(kTrailerMagic, kMagicSize);
  put_u64(out, crc);
  return out;
}

Contents decode(const std::string& bytes, const std::string& path) {
  const std::string damaged = path + ": damaged: ";
  if (bytes.size() >= 4 && bytes.compare(0, 4, "PK\x03\x04") == 0)
    throw Error(path + ": a LibTorch archive, the checkpoint format of isp before 0.2; this isp reads only its own "
                       "format (ISPCKPT1): run the stage again in a new run folder");
  if (bytes.size() < kPrefixSize + kTrailerSize || bytes.compare(0, kMagicSize, kMagic) != 0)
    throw Error(path + ": not an isp checkpoint (no ISPCKPT1 header; " + std::to_string(bytes.size()) + " bytes)");
  const std::size_t body = bytes.size() - kTrailerSize;
  if (bytes.compare(body, kMagicSize, kTrailerMagic) != 0)
    throw Error(damaged + "truncated or overwritten (no CRC trailer at its end; " + std::to_string(bytes.size()) +
                " bytes)");
  const uint64_t stored = get_u64(bytes, body + kMagicSize);
  const uint32_t actual = crc32_of(bytes.data(), body);
  if (stored != actual) throw Error(damaged + "CRC-32 mismatch (the bytes changed after they were written)");

  const uint64_t header_size = get_u64(bytes, kMagicSize);
  if (header_size > body - kPrefixSize) throw Error(damaged + "header length beyond the end of the file");
  const json header = parse_header(bytes.substr(kPrefixSize, header_size), path);
  const std::size_t data_start = align_up(kPrefixSize + header_size);
  if (data_start > body) throw Error(damaged + "no room for tensor data after the header");
  const std::size_t data_size = body - data_start;

  if (!header.is_object()) throw Error(damaged + "header is not a JSON object");
  Contents out;
  auto field = [&](const char* key, json::value_t type, const char* what) -> const json& {
    auto it = header.find(key);
    if (it == header.end() || it->type() != type) throw Error(damaged + "header field /" + key + ": expected " + what);
    return *it;
  };
  out.meta = field("meta", json::value_t::object, "an object");
  for (const auto& e : field("entries", json::value_t::array, "an array")) {
    if (!e.is_string()) throw Error(damaged + "header field /entries: expected strings");
    out.entries.push_back(e.get<std::string>());
  }
  const json& records = field("tensors", json::value_t::array, "an array");
  if (records.size() > kMaxTensors) throw Error(damaged + "more than " + std::to_string(kMaxTensors) + " tensors");
  std::set<std::string> names;
  for (std::size_t i = 0; i < records.size(); ++i) {
    const json& r = records[i];
    const std::string where = damaged + "/tensors/" + std::to_string(i) + ": ";
    if (!r.is_object()) throw Error(where + "expected an object");
    auto get = [&](const char* key) -> const json& {
      auto it = r.find(key);
      if (it == r.end()) throw Error(where + "missing \"" + key + "\"");
      return *it;
    };
    const json &name = get("name"), &dtype = get("dtype"), &shape = get("shape"), &offset = get("offset"),
               &nbytes = get("nbytes");
    if (!name.is_string() || !dtype.is_string()) throw Error(where + "name and dtype must be strings");
    if (!offset.is_number_unsigned() || !nbytes.is_number_unsigned())
      throw Error(where + "offset and nbytes must be non-negative integers");
    if (!shape.is_array() || shape.size() > kMaxRank)
      throw Error(where + "shape must be an array of at most " + std::to_string(kMaxRank) + " sizes");
    TensorRecord t;
    t.name = name.get<std::string>();
    t.dtype = dtype.get<std::string>();
    for (const auto& d : shape) {
      if (!d.is_number_integer()) throw Error(where + "shape must hold integers");
      t.shape.push_back(d.get<int64_t>());
    }
    const std::size_t elem = dtype_size(t.dtype);
    if (elem == 0) throw Error(where + "unknown dtype \"" + t.dtype + "\"");
    const int64_t numel = checked_numel(t.shape);
    const uint64_t off = offset.get<uint64_t>(), n = nbytes.get<uint64_t>();
    if (numel < 0 || static_cast<uint64_t>(numel) > std::numeric_limits<uint64_t>::max() / elem ||
        static_cast<uint64_t>(numel) * elem != n)
      throw Error(where + "shape and dtype do not add up to nbytes " + std::to_string(n));
    if (off > data_size || n > data_size - off) throw Error(where + "bytes lie beyond the end of the file");
    if (!names.insert(t.name).second) throw Error(where + "tensor name '" + t.name + "' appears twice");
    t.offset = data_start + static_cast<std::size_t>(off);
    t.nbytes = static_cast<std::size_t>(n);
    out.tensors.push_back(std::move(t));
  }
  return out;
}

}  // namespace isp::checkpoint_format
