// libFuzzer target: the checkpoint reader's container layer (core/src/checkpoint_format.cpp) on arbitrary bytes.
// Input: one mode byte, then the file. Mode even: the bytes as they are (almost every mutation then fails the
// CRC -- the reader's first line of defence). Mode odd: the bytes get a valid CRC trailer appended first, so the
// fuzzer reaches everything behind the CRC: header length, JSON header, tensor records, byte ranges.
// Expected failures are isp::Error; anything else escaping, a crash, a sanitizer report or a hang is a finding.
#include <cstdint>
#include <cstdio>
#include <cstdlib>
#include <exception>
#include <string>

#include "checkpoint_format.h"

namespace cf = isp::checkpoint_format;

extern "C" int LLVMFuzzerTestOneInput(const uint8_t* data, std::size_t size) {
  if (size < 1) return 0;
  const bool reseal = data[0] & 1;
  std::string bytes(reinterpret_cast<const char*>(data + 1), size - 1);
  if (reseal) {
    const uint32_t crc = cf::crc32_of(bytes.data(), bytes.size());
    bytes += "ISPCRC32";
    for (int i = 0; i < 8; ++i) bytes.push_back(static_cast<char>((uint64_t(crc) >> (8 * i)) & 0xff));
  }
  try {
    const cf::Contents c = cf::decode(bytes, "fuzz.pt");
    // Every accepted tensor lies inside the file (ASan checks the reads, this checks the arithmetic).
    unsigned sum = 0;
    for (const auto& t : c.tensors) {
      if (t.offset > bytes.size() || t.nbytes > bytes.size() - t.offset) {
        std::fprintf(stderr, "accepted tensor '%s' lies outside the file\n", t.name.c_str());
        std::abort();
      }
      for (std::size_t i = 0; i < t.nbytes; ++i) sum += static_cast<unsigned char>(bytes[t.offset + i]);
    }
    (void)c.meta.dump();
    if (sum == 0xdeadbeef) std::fprintf(stderr, " ");  // keeps the reads
  } catch (const isp::Error&) {
    // the expected way to reject an input
  } catch (const std::exception& e) {
    std::fprintf(stderr, "uncaught non-isp exception: %s\n", e.what());
    std::abort();
  }
  return 0;
}
