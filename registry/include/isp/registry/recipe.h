#pragma once
// JSON recipes: `_base_` inheritance, `_delete_`, `${VAR}` expansion, `--set a.b.0=1` overrides and
// `{"$ref": "node"}` links between nodes (a DAG; cycles and dangling references are errors).
#include <functional>
#include <map>
#include <memory>
#include <string>
#include <vector>

#include "isp/registry/options.h"

namespace isp {

// Limits on what input decides the depth of (an error past them, never a stack overflow): nesting of objects
// and arrays in one file or --set value, the length of a `_base_` chain, and the length of a `$ref` chain.
constexpr int kMaxRecipeNesting = 64;
constexpr int kMaxBaseChain = 16;
constexpr int kMaxRefChain = 64;

// Whether JSON `text` nests objects/arrays deeper than `limit`. Every parse of input-controlled JSON (recipes,
// --set values, checkpoint headers) asks this first: a linear scan that skips strings, where nlohmann's callback
// parser would be quadratic in the number of nodes and its recursive parser unbounded in depth.
ISP_API bool json_nests_deeper_than(const std::string& text, int limit);

struct Recipe {
  json doc;                                   // fully resolved
  std::string file;                           // the top-level recipe file
  std::map<std::string, std::string> origins;  // JSON pointer -> file (or "--set") that last set it
  // The file that set `pointer` (or its closest set ancestor) together with the pointer.
  Where where(const std::string& pointer) const;
  // After changing `origins` directly (the loader does), so Wheres handed out later see the change.
  void origins_changed() const { locate_.reset(); }

 private:
  // A shared copy of `origins` that the Wheres handed out consult (made once, redone if origins changed).
  mutable std::shared_ptr<const std::function<std::string(const std::string&)>> locate_;
  mutable std::size_t located_size_ = 0;
};

// Loads, merges bases, expands variables, applies overrides and checks references.
ISP_API Recipe load_recipe(const std::string& path, const std::vector<std::string>& overrides = {});
// Same, from an in-memory document (bases resolved relative to `base_dir`); used by tests and tools.
ISP_API Recipe recipe_from_json(json doc, const std::string& pretend_file, const std::string& base_dir,
                                const std::vector<std::string>& overrides = {});

// The folder of the recipes shipped with isp (ISP_CONFIG_DIR, else <prefix>/share/isp/configs next to the
// binary, else the source tree's configs/); `_base_` entries "isp://<path>" are read from it. "" if none.
ISP_API std::string shipped_config_dir();

// Merges `child` into `base` (objects recursively, arrays and scalars replaced, `_delete_` replaces).
ISP_API void merge_into(json& base, const json& child, const std::string& file, const std::string& pointer,
                        std::map<std::string, std::string>* origins);
// Applies one "a.b.0=value" override (value parsed as JSON, else taken as a string).
ISP_API void apply_override(json& doc, const std::string& assignment, std::map<std::string, std::string>* origins);
// Expands ${VAR} and ${VAR:-default} in every string (environment plus the recipe's "vars" object).
ISP_API void expand_variables(json& doc, const std::map<std::string, std::string>& vars, const Recipe& r);
// Every {"$ref": n} must name a node in /nodes; node references must form a DAG.
ISP_API void check_references(const Recipe& r);

// Writes text to `path` atomically: a temporary file in the same folder, fsync'd, then renamed over it.
ISP_API void write_file_atomic(const std::string& path, const std::string& content);
// Whether this process writes files. A data-parallel run (isp/distributed.h) turns it off on every rank but 0:
// they compute what rank 0 computes, and write_file_atomic (through which checkpoints, reports and the run
// folder's state all go) does nothing there.
ISP_API void set_writes_files(bool enabled);
ISP_API bool writes_files();
ISP_API std::string read_text_file(const std::string& path);

}  // namespace isp
