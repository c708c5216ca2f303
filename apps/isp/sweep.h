#pragma once
// `isp sweep SWEEP.json`: one recipe over a grid (or a zip) of recipe values, component swaps and seeds; one run
// folder per point, finished stages shared between points (--reuse), one table per sweep.
#include <string>

namespace isp { class Registry; }

namespace isp_app {

struct SweepOptions {
  std::string sweep_path;
  std::string work_dir;      // default: the sweep file's "work_dir", else work_dirs/<sweep file name>
  int jobs = 1;              // points run at once (each an `isp run` process with `threads` LibTorch threads)
  bool validate_only = false;
  std::string isp_binary;    // the `isp` executable that runs the points (default: this process's own)
};

int sweep(isp::Registry& reg, const SweepOptions& o);

}  // namespace isp_app
