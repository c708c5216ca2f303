// libFuzzer target: the plugin descriptor check (registry/src/plugin_loader.cpp, check_descriptor_bytes) on
// arbitrary bytes of arbitrary length, as a hand-made or foreign .so could export them. The check must read
// nothing beyond the bytes, follow no pointer, and accept only a descriptor that matches the host's integers.
#include <cstddef>
#include <cstdint>
#include <cstdio>
#include <cstdlib>
#include <cstring>
#include <exception>
#include <string>

#include "isp/registry/plugin.h"

extern "C" int LLVMFuzzerTestOneInput(const uint8_t* data, std::size_t size) {
  const IspPluginDescriptor& host = isp::host_descriptor();
  try {
    const std::string why = isp::check_descriptor_bytes(data, size, host);
    if (why.empty()) {
      // Accepted: it must hold the whole structure and the host's integers, field for field.
      if (size < sizeof(IspPluginDescriptor) ||
          std::memcmp(data, &host, offsetof(IspPluginDescriptor, json_minor) + sizeof host.json_minor) != 0) {
        std::fprintf(stderr, "accepted a descriptor that does not match the host\n");
        std::abort();
      }
    }
  } catch (const std::exception& e) {
    std::fprintf(stderr, "the descriptor check threw: %s\n", e.what());
    std::abort();
  }
  return 0;
}
