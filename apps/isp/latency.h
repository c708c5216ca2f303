#pragma once
// `isp latency`: CPU latency of export folders in LibTorch from C++ -- isp's own modules (eager) and the
// TorchScript file loaded with torch::jit::load -- the C++ rows of bench/export_latency.sh's table.
#include <cstdint>
#include <string>
#include <vector>

namespace isp { class Registry; }

namespace isp_app {

struct LatencyOptions {
  std::vector<std::string> export_dirs;  // export folders (structure.json + weights.pt [+ model.ts.pt])
  std::vector<int64_t> batches = {1, 64};
  int runs = 100;     // timed forward passes per (folder, runtime, batch) and round, after 10 warm-up passes
  int rounds = 3;     // interleaved rounds; the median of the round medians is reported
  int threads = 1;    // LibTorch intra-op threads
  std::string json_out;  // also write the rows here
};

int latency(isp::Registry& reg, const LatencyOptions& o);

}  // namespace isp_app
