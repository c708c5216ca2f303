// `isp latency DIR...`: how long one forward pass of each export folder takes on the CPU in LibTorch from C++,
// at each batch size, in three ways:
//   - isp's own modules (isp::load_export), BatchNorm folded into the convolutions on every call (how isp itself
//     evaluates: runtime.fold_batchnorm, default on);
//   - the same modules with conv and BN run separately;
//   - model.ts.pt loaded with torch::jit::load (no isp code in the forward pass).
// Folders, runtimes and batches are timed in interleaved rounds so that a slow spell of the machine hits all
// of them alike; each figure is the median over rounds of the median of `runs` passes.
#include "latency.h"

#include <ATen/ATen.h>
#include <ATen/Parallel.h>
#include <c10/core/GradMode.h>
#include <torch/csrc/jit/serialization/import.h>
#include <torch/version.h>

#include <algorithm>
#include <chrono>
#include <cstdio>
#include <filesystem>
#include <functional>
#include <map>

#include "isp/checkpoint.h"
#include "isp/interfaces/backbone.h"
#include "isp/registry/error.h"
#include "isp/registry/recipe.h"

namespace fs = std::filesystem;

namespace isp_app {
namespace {

double median(std::vector<double> v) {
  std::sort(v.begin(), v.end());
  const std::size_t n = v.size();
  return n % 2 ? v[n / 2] : 0.5 * (v[n / 2 - 1] + v[n / 2]);
}

double median_ms(const std::function<void()>& forward, int runs) {
  for (int i = 0; i < 10; ++i) forward();
  std::vector<double> ms;
  ms.reserve(static_cast<std::size_t>(runs));
  for (int i = 0; i < runs; ++i) {
    const auto t0 = std::chrono::steady_clock::now();
    forward();
    ms.push_back(std::chrono::duration<double, std::milli>(std::chrono::steady_clock::now() - t0).count());
  }
  return median(ms);
}

// [C, H, W] of the network's input: sample.json's input where there is one, else the spec's.
std::vector<int64_t> input_chw(const fs::path& dir, const isp::json& structure, const isp::Backbone& net) {
  if (fs::exists(dir / "sample.json")) {
    const isp::json s = isp::json::parse(isp::read_text_file((dir / "sample.json").string()));
    const auto shape = s.at("input").at("shape").get<std::vector<int64_t>>();
    if (shape.size() == 4) return {shape[1], shape[2], shape[3]};
  }
  const int64_t c = structure.at("spec").value("in_channels", int64_t{3});
  return {c, net.input_size(), net.input_size()};
}

struct Case {
  std::string folder, runtime;
  int64_t batch;
  std::function<void()> forward;
  std::vector<double> round_ms;
};

}  // namespace

int latency(isp::Registry& reg, const LatencyOptions& o) {
  at::set_num_threads(o.threads);
  c10::NoGradGuard no_grad;
  std::vector<Case> cases;
  std::vector<std::shared_ptr<isp::Backbone>> keep;
  std::vector<std::shared_ptr<torch::jit::Module>> scripts;
  for (const auto& d : o.export_dirs) {
    const fs::path dir(d);
    isp::LoadedExport e = isp::load_export(reg, dir.string());
    e.model->eval();
    keep.push_back(e.model);
    const auto chw = input_chw(dir, e.structure, *e.model);
    std::shared_ptr<torch::jit::Module> script;
    if (fs::exists(dir / "model.ts.pt")) {
      script = std::make_shared<torch::jit::Module>(torch::jit::load((dir / "model.ts.pt").string()));
      script->eval();
      scripts.push_back(script);
    }
    for (const int64_t batch : o.batches) {
      const at::Tensor x = at::randn({batch, chw[0], chw[1], chw[2]});
      isp::Backbone* net = e.model.get();
      cases.push_back({d, "LibTorch C++ eager (isp modules, BN folded per call)", batch, [net, x] {
                         isp::ScopedBatchNormFolding on(true);
                         net->forward(x);
                       }, {}});
      cases.push_back({d, "LibTorch C++ eager (isp modules, BN unfolded)", batch, [net, x] {
                         isp::ScopedBatchNormFolding off(false);
                         net->forward(x);
                       }, {}});
      if (script)
        cases.push_back({d, "LibTorch C++ TorchScript (torch::jit::load model.ts.pt)", batch,
                         [s = script.get(), x] { s->forward({x}); }, {}});
    }
  }
  for (int r = 0; r < o.rounds; ++r)
    for (auto& c : cases) c.round_ms.push_back(median_ms(c.forward, o.runs));

  isp::json rows = isp::json::array();
  std::printf("LibTorch %s, %d thread(s); median over %d interleaved rounds of the median of %d runs (ms)\n",
              TORCH_VERSION, o.threads, o.rounds, o.runs);
  std::printf("%-58s %6s  %s\n", "runtime", "batch", "ms per folder");
  std::map<std::pair<std::string, int64_t>, std::vector<std::string>> table;
  for (const auto& c : cases) {
    const double ms = median(c.round_ms);
    rows.push_back({{"folder", c.folder}, {"runtime", c.runtime}, {"batch", c.batch}, {"ms", ms},
                    {"round_medians_ms", c.round_ms}});
    char buf[64];
    std::snprintf(buf, sizeof buf, "%s %.3f", fs::path(c.folder).filename().c_str(), ms);
    table[{c.runtime, c.batch}].push_back(buf);
  }
  for (const auto& [key, cells] : table) {
    std::printf("%-58s %6lld ", key.first.c_str(), static_cast<long long>(key.second));
    for (const auto& cell : cells) std::printf("  %s", cell.c_str());
    std::printf("\n");
  }
  if (!o.json_out.empty())
    isp::write_file_atomic(o.json_out, isp::json{{"threads", o.threads}, {"runs", o.runs}, {"rounds", o.rounds},
                                                 {"libtorch", TORCH_VERSION}, {"rows", rows}}.dump(1) + "\n");
  return 0;
}

}  // namespace isp_app
