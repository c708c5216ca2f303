#pragma once
// Runs a recipe: loads plugins, builds nodes and stages, executes stages in order with resume support.
#include <string>
#include <vector>

#include "isp/recipe.h"
#include "isp/registry.h"

namespace isp {

struct RunOptions {
  std::string recipe_path;
  std::vector<std::string> overrides;
  std::string work_dir;  // default: work_dirs/<recipe name>
  bool resume = false;
  bool validate_only = false;
};

// Loads the recipe's `plugins` entries (files or folders, relative to the recipe) into `reg`.
ISP_API void load_recipe_plugins(Registry& reg, const Recipe& r);
// Sets torch threads and picks the device from the recipe's "runtime" section.
ISP_API void apply_runtime(const Recipe& r);
// Returns the process exit code; throws isp::Error on bad input.
ISP_API int run_recipe(Registry& reg, const RunOptions& opt);

}  // namespace isp
