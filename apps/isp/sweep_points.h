#pragma once
// The points of an `isp sweep` (apps/isp/sweep.cpp) and its tables (apps/isp/sweep_table.cpp).
#include <string>
#include <vector>

#include "isp/registry/options.h"

namespace isp_app {

struct Axis {  // one axis of the sweep file's axes
  std::string path, name;
  std::vector<isp::json> values;
  std::vector<std::string> labels;  // empty: short_value of each value
  bool is_recipe() const { return path == "recipe"; }
  std::string label(std::size_t i) const;
};

struct Point {  // one combination of axis values: one run folder
  std::vector<isp::json> values;  // one per axis
  std::vector<std::string> shown;  // one per axis: its label
  std::string recipe;        // from a recipe axis (relative to the sweep file); empty: the sweep's recipe
  std::string label;         // folder name
  std::vector<std::string> overrides;
};


// A finished (or failed) point's folder as the tables read it: {"status", "summary", "report", "wall_seconds"}.
isp::json read_sweep_run(const std::string& dir, int exit_code);
// sweep.json, sweep.csv and sweep.md in `work` from every point's run (status "missing" where not yet run).
void write_sweep_tables(const std::string& work, const std::vector<Axis>& axes, const std::vector<Point>& points,
                        const std::vector<isp::json>& runs, const isp::json& doc);

}  // namespace isp_app
