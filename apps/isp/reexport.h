#pragma once
// `isp export`: writes a finished run's pruned network again, in the formats asked for, without retraining.
#include <string>
#include <vector>

namespace isp { class Registry; }

namespace isp_app {

struct ReexportOptions {
  std::string run_dir;  // a run folder whose export stage finished (<run>/export/structure.json + weights.pt)
  std::string out_dir;  // default: <run>/export
  std::vector<std::string> formats = {"state_dict", "torchscript", "onnx"};
};

// Returns the exit code; throws isp::Error naming what is missing.
int reexport(isp::Registry& reg, const ReexportOptions& o);

}  // namespace isp_app
