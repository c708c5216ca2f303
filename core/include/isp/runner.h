#pragma once
// Runs a recipe: loads plugins, builds nodes and stages, executes stages in order with resume support.
#include <string>
#include <vector>

#include "isp/recipe.h"
#include "isp/registry.h"

#include <memory>

#include <c10/core/Device.h>

namespace isp { class Stage; }

namespace isp {

struct RunOptions {
  std::string recipe_path;
  std::vector<std::string> overrides;
  std::string work_dir;  // default: work_dirs/<recipe name>
  bool resume = false;
  // with resume: rerun the stages whose fingerprint changed (and those after them); their old folders are
  // renamed to <stage>.replaced-N. Without it a changed recipe is an error.
  bool force = false;
  // a finished run folder: its stages are taken over (hard-linked) for as long as their fingerprints match
  std::string reuse_from;
  bool validate_only = false;
};

// Loads the recipe's `plugins` entries (files or folders, relative to the recipe) into `reg`.
ISP_API void load_recipe_plugins(Registry& reg, const Recipe& r);
// Sets torch threads and picks the device from the recipe's "runtime" section.
ISP_API void apply_runtime(const Recipe& r);
// A finished (or partly finished) run folder rebuilt for inspection: the resolved recipe, its nodes, and every
// completed stage restored (weights loaded), in recipe order. Used by `isp explain`, `isp export`, reports.
struct RestoredRun {
  Recipe recipe;
  std::unique_ptr<BuildContext> ctx;
  std::vector<std::pair<std::string, std::shared_ptr<Stage>>> stages;  // completed stages only
  std::string work_dir;
  json summary;
  std::shared_ptr<Stage> stage(const std::string& name) const;  // nullptr if absent
};
ISP_API RestoredRun restore_run(Registry& reg, const std::string& work_dir);
// The device apply_runtime() chose.
ISP_API c10::Device current_device();

// A stage's name: the node it references ({"$ref": "prune"} -> "prune"), else its "name", else type + index i.
ISP_API std::string stage_name(const json& spec, std::size_t i);

// Returns the process exit code; throws isp::Error on bad input.
ISP_API int run_recipe(Registry& reg, const RunOptions& opt);

}  // namespace isp
