#pragma once
// Runs a recipe: loads plugins, freezes the registry, builds nodes and stages, executes the stages in order,
// and keeps the run folder resumable (run_folder.cpp: fingerprints, reuse, restore).
#include <memory>
#include <string>
#include <utility>
#include <vector>

#include <c10/core/Device.h>

#include "isp/distributed.h"
#include "isp/interfaces/stage.h"
#include "isp/registry/build_context.h"
#include "isp/registry/recipe.h"

namespace isp {

struct RunOptions {
  std::string recipe_path;
  std::vector<std::string> overrides;
  std::string work_dir;  // default: work_dirs/<recipe name>
  bool resume = false;
  // with resume: rerun the stages whose fingerprint changed (and those that take their results); their old
  // folders are renamed to <stage>.replaced-N. Without it a changed recipe is an error.
  bool force = false;
  // finished run folders: every stage whose fingerprint matches a finished stage of one of them (the first that
  // has it) is taken over (hard-linked) instead of run
  std::vector<std::string> reuse_from;
  bool validate_only = false;
  // with validate_only: print the resolved recipe (bases merged, --set applied, components named) as JSON on
  // stdout, and the OK line on stderr
  bool print_resolved = false;
  // with validate_only: load every dataset node and print the size of each split and the number of classes as
  // JSON on stdout ({"data": {"train": 54000, "val": 6000, "test": 10000, "classes": 10}}), the OK line on stderr
  bool print_data_sizes = false;
  // Several recipes checked in one process: objects of the shared kinds (datasets) built for one recipe are taken
  // by the next one that builds the same component with the same options (share_validation_data()).
  std::shared_ptr<SharedComponents> shared_components;
};

// What `isp validate` with several recipes and `isp sweep --validate` share between recipes: the two most recently
// used datasets (a Fashion-MNIST bundle is about 200 MB; decoding it is most of a validation's time).
ISP_API std::shared_ptr<SharedComponents> share_validation_data();

// The recipe's "runtime" section, applied: torch threads set, device chosen.
struct Runtime {
  c10::Device device = c10::Device(c10::kCPU);
  int threads = 1;
  SpeedSettings speed;
  dist::Settings dist;  // runtime.dist_backend, dist_timeout_s, dist_allow_reshard (data-parallel runs)
};

// Loads the recipe's `plugins` entries (files or folders, relative to the recipe) into `reg`.
ISP_API void load_recipe_plugins(Registry& reg, const Recipe& r);
// Sets torch threads and picks the device from the recipe's "runtime" section.
ISP_API Runtime apply_runtime(const Recipe& r);

// A finished (or partly finished) run folder rebuilt for inspection: the resolved recipe, its nodes, and every
// completed stage restored (its artifact rebuilt), in recipe order. Used by `isp explain` and tests.
struct ISP_API RestoredRun {
  Recipe recipe;
  std::unique_ptr<BuildContext> ctx;
  std::vector<std::pair<std::string, std::shared_ptr<Stage>>> stages;  // completed stages only
  std::string work_dir;
  json summary;
  Runtime runtime;
  std::shared_ptr<Stage> stage(const std::string& name) const;  // nullptr if absent
  // The artifact of the last completed stage that produces an A (nullptr if none), and that stage's name.
  template <class A>
  std::shared_ptr<const A> latest(std::string* stage_name = nullptr) const {
    for (auto it = stages.rbegin(); it != stages.rend(); ++it)
      if (std::string(it->second->produces()) == A::kType) {
        if (stage_name) *stage_name = it->first;
        return std::static_pointer_cast<const A>(it->second->result());  // produces() checked by publish()
      }
    return nullptr;
  }
};
ISP_API RestoredRun restore_run(Registry& reg, const std::string& work_dir);

// A stage's name: the node it references ({"$ref": "prune"} -> "prune"), else its "name", else type + index i.
ISP_API std::string stage_name(const json& spec, std::size_t i);

// Returns the process exit code; throws isp::Error on bad input.
ISP_API int run_recipe(Registry& reg, const RunOptions& opt);

}  // namespace isp
