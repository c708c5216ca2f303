#pragma once
// Private to the runner: building a recipe's stages with their fingerprints, and the run folder's files.
#include <memory>
#include <string>
#include <vector>

#include "isp/runner.h"

namespace isp::detail {

struct PlannedStage {
  std::string name, type;
  std::shared_ptr<Stage> stage;
  std::string fingerprint;          // what the stage's artifact depends on (see stage_fingerprint)
  std::vector<std::string> inputs;  // the stages whose artifacts it takes
  uint64_t seed = 0;                // torch is seeded with it before the stage runs
};

uint64_t fnv1a(const std::string& s);
uint64_t stage_seed(uint64_t run_seed, const std::string& stage_name);
json read_json_or(const std::string& path, json fallback);
std::string plugin_path(const Recipe& r, std::size_t i);

// Builds every stage of the recipe in order (each under its own seed, so weight initialisation does not depend
// on other stages), then every other node (so validation sees the whole recipe). Checks that each stage takes
// artifacts only from stages listed before it, and computes the fingerprints.
std::vector<PlannedStage> build_stages(BuildContext& ctx, const Recipe& r, uint64_t seed);

// recipe.resolved.json: plugin paths absolute, every built type pinned to scope::Name@version, and a
// "components" section with the library (path, version, hash) behind every spec.
json resolved_document(const Recipe& r, const BuildContext& ctx);

// Hard-links a finished stage folder of another run (plain copies across file systems).
void link_tree(const std::string& from, const std::string& to);
// A free name next to `dir` for keeping an outdated stage folder: prune.replaced-1, prune.replaced-2, ...
std::string aside_name(const std::string& dir);

}  // namespace isp::detail
