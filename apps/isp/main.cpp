// `isp`: run, validate and inspect recipes; list plugins.
#include <cstdio>
#include <filesystem>
#include <string>
#include <vector>

#include <CLI/CLI.hpp>

#include "isp/accel.h"
#include "isp/distributed.h"
#include "isp/registry/plugin.h"
#include "isp/registry/registry.h"
#include "isp/report_html.h"
#include "isp/runner.h"

#include "compare.h"
#include "explain.h"
#include "latency.h"
#include "sweep.h"
#include "reexport.h"

namespace {

int cmd_plugins(isp::Registry& reg, bool as_json, const std::string& kind) {
  if (as_json) {
    isp::json out = isp::json::array();
    for (const auto* c : reg.list(kind)) out.push_back(c->to_json());
    std::printf("%s\n", out.dump(2).c_str());
    return 0;
  }
  std::string last_kind;
  for (const auto* c : reg.list(kind)) {
    if (c->kind != last_kind) std::printf("%s:\n", c->kind.c_str()), last_kind = c->kind;
    std::printf("  %-24s v%d  %s\n      from %s\n", c->qualified_name().c_str(), c->version, c->doc.c_str(), c->origin().c_str());
    for (const auto& a : c->schema.args) {
      std::string dflt = a.required ? "required" : "default " + a.default_value.dump();
      std::printf("      %-22s %-14s %-20s %s\n", a.name.c_str(), isp::to_string(a.type), dflt.c_str(), a.doc.c_str());
    }
  }
  std::printf("plugin folders: ");
  for (const auto& d : reg.scanned_directories()) std::printf("%s ", d.c_str());
  std::printf("\nhost: %s\n", isp::describe(isp::host_descriptor()).c_str());
  for (const auto& f : reg.load_failures()) std::printf("failed: %s\n", f.c_str());
  return 0;
}

// `isp validate a.json b.json ...`: every recipe is checked in one start (LibTorch and the plugins load once), and
// each failure is reported with its recipe; the exit status is the first failure's. --set applies to all of them.
int cmd_validate(isp::Registry& reg, isp::RunOptions opt, const std::vector<std::string>& recipes) {
  if (recipes.size() > 1 && (opt.print_resolved || opt.print_data_sizes))
    throw isp::Error("--print-resolved and --print-data-sizes take one recipe (stdout holds one JSON document), got " +
                     std::to_string(recipes.size()));
  int status = 0;
  if (recipes.size() > 1) opt.shared_components = isp::share_validation_data();  // each dataset decoded once
  for (const std::string& recipe : recipes) {
    opt.recipe_path = recipe;
    int rc = 0;
    try {
      rc = isp::run_recipe(reg, opt);
    } catch (const std::exception& e) {
      if (recipes.size() == 1) throw;  // main's own message and status, as for every other command
      // Every failure is reported and the other recipes are still checked; main's statuses: 2 for the toolkit's
      // own errors, 3 for anything else (a bug, not the recipe's fault).
      const bool ours = dynamic_cast<const isp::Error*>(&e) != nullptr;
      // A recipe error starts with the file (or --set) that wrote the value. When that is not this recipe (a base
      // file, --set) or the error is of another kind, the recipe comes first, so each line says which one failed.
      const auto* located = dynamic_cast<const isp::RecipeError*>(&e);
      const std::string what = e.what();
      const std::string named = located && located->where().file == recipe ? what : recipe + ": " + what;
      std::fprintf(stderr, "%s: %s\n", ours ? "error" : "error (unexpected)", named.c_str());
      rc = ours ? 2 : 3;
    }
    if (status == 0) status = rc;
  }
  return status;
}

}  // namespace

int main(int argc, char** argv) {
  isp::keep_freed_memory_in_process();  // before any thread or tensor exists
  CLI::App app{"isp: interpretation-steered network pruning (ECCV 2022) as recipes and plugins"};
  app.require_subcommand(1);

  isp::RunOptions run_opt;
  auto* run = app.add_subcommand("run", "run a recipe: every stage in order, resumable");
  run->add_option("recipe", run_opt.recipe_path, "recipe JSON file")->required();
  run->add_option("--set", run_opt.overrides, "override a recipe value: a.b.0=VALUE (VALUE parsed as JSON)");
  run->add_option("--work-dir", run_opt.work_dir, "run folder (default: work_dirs/<recipe name>)");
  run->add_flag("--resume", run_opt.resume, "continue the run in the work dir from its checkpoints");
  run->add_flag("--force", run_opt.force,
                "with --resume: rerun the stages the changed recipe affects (old folders kept as <stage>.replaced-N)");
  run->add_option("--reuse", run_opt.reuse_from,
                  "start from another run's finished stages for as long as this recipe agrees with them "
                  "(e.g. one classifier and AEM shared by several pruners); repeat it to draw on several runs");
  isp::dist::LaunchOptions launch;
  launch.nproc_per_node = 0;
  run->add_option("--nproc-per-node", launch.nproc_per_node,
                  "data-parallel: start N worker processes on this node (c10d: Gloo on the CPU, NCCL on CUDA), as "
                  "torchrun does; the recipe's batch sizes stay global batches")->check(CLI::Range(1, 1024));
  run->add_option("--nnodes", launch.nnodes, "data-parallel: number of nodes (default 1)")->check(CLI::Range(1, 65536));
  run->add_option("--node-rank", launch.node_rank, "data-parallel: this node's rank (default 0)")->check(CLI::Range(0, 65535));
  run->add_option("--master-addr", launch.master_addr, "data-parallel: address of rank 0's node (default 127.0.0.1)");
  run->add_option("--master-port", launch.master_port, "data-parallel: rendezvous port on rank 0's node (default 29500)")
      ->check(CLI::Range(1, 65535));

  isp::RunOptions val_opt;
  val_opt.validate_only = true;
  std::vector<std::string> validate_recipes;
  auto* validate = app.add_subcommand("validate", "check recipes completely without running them");
  validate->add_option("recipe", validate_recipes, "recipe JSON file(s): several are checked in one start, each "
                                                   "failure reported with its file")->required();
  validate->add_option("--set", val_opt.overrides, "override a recipe value: a.b.0=VALUE (in every recipe)");
  validate->add_flag("--print-resolved", val_opt.print_resolved,
                     "print the resolved recipe as JSON on stdout: bases merged, --set applied, components named "
                     "(what `isp run` writes to recipe.resolved.json)");
  validate->add_flag("--print-data-sizes", val_opt.print_data_sizes,
                     "load every dataset node and print its split sizes and number of classes as JSON on stdout "
                     "(not with --print-resolved: stdout holds one JSON document)");

  bool as_json = false;
  std::string kind;
  auto* plugins = app.add_subcommand("plugins", "list registered components with their argument schemas");
  plugins->add_flag("--json", as_json, "print a JSON array");
  plugins->add_option("--kind", kind, "only this kind");

  isp_app::ExplainOptions ex_opt;
  auto* explain = app.add_subcommand("explain", "saliency figure of a finished AEM run: input | P | input*P | s ~ P | input*s");
  auto* ex_run = explain->add_option("--run", ex_opt.run_dir, "run folder (the --work-dir of `isp run`)");
  auto* ex_ck = explain->add_option("--checkpoint", ex_opt.checkpoint,
                                    "a checkpoint file inside a run folder (<run>/<stage>/final.pt): explains the run "
                                    "folder that contains it, i.e. the parent of the stage folder");
  ex_run->excludes(ex_ck);
  explain->add_option("--images", ex_opt.images, "the first N test images")->check(CLI::Range(1, 1000));
  explain->add_option("--network", ex_opt.network, "whose maps: original (the classifier the AEM was trained on) or "
                                                   "pruned (the run's pruned network under the same AEM)")
      ->check(CLI::IsMember({"original", "pruned"}));
  explain->add_option("--out", ex_opt.out_dir, "output folder: saliency.png, row_<i>_<class>.png, curves.png, params.json, saliency_metrics.json")->required();
  explain->add_option("--label", ex_opt.label, "class that conditions the feature filter")
      ->check(CLI::IsMember({"ground_truth", "predicted"}));
  explain->add_option("--seed", ex_opt.seed, "seed of the sampled masks s ~ P");

  isp_app::ReexportOptions rx_opt;
  auto* reexport = app.add_subcommand(
      "export", "write a finished run's pruned network (and export/original/) again without retraining: weights.pt, "
      "model.ts.pt, model.onnx, sample.json");
  reexport->add_option("--run", rx_opt.run_dir, "run folder whose export stage finished")->required();
  reexport->add_option("--format", rx_opt.formats, "formats, comma-separated (default: all)")
      ->delimiter(',')
      ->check(CLI::IsMember({"state_dict", "torchscript", "onnx"}));
  reexport->add_option("--out", rx_opt.out_dir, "output folder (default: <run>/export)");

  isp_app::SweepOptions sw_opt;
  auto* sweep = app.add_subcommand("sweep", "one recipe over a grid of values, component swaps and seeds: a run per "
                                            "point, shared stages reused, sweep.md/json/csv (configs/sweeps/)");
  sweep->add_option("sweep", sw_opt.sweep_path, "sweep JSON file")->required()->check(CLI::ExistingFile);
  sweep->add_option("--work-dir", sw_opt.work_dir, "sweep folder (default: the file's work_dir, else work_dirs/<name>)");
  sweep->add_option("--jobs", sw_opt.jobs, "points run at once after the first (default 1; mind the cores: each "
                                           "point uses runtime.threads)")->check(CLI::Range(1, 256));
  sweep->add_flag("--validate", sw_opt.validate_only, "check every point and stop");

  std::string report_dir;
  auto* report = app.add_subcommand("report", "write report.html for a run folder (with explain/ figures where present) "
                                              "or a sweep folder (with its accuracy-vs-FLOPs Pareto plot)");
  report->add_option("folder", report_dir, "run or sweep folder")->required()->check(CLI::ExistingDirectory);

  isp_app::LatencyOptions lat_opt;
  auto* latency = app.add_subcommand(
      "latency", "CPU latency of export folders in LibTorch from C++: isp's modules and model.ts.pt (torch::jit::load)");
  latency->add_option("folders", lat_opt.export_dirs, "export folders (e.g. <run>/export <run>/export/original)")
      ->required()->check(CLI::ExistingDirectory);
  latency->add_option("--batch", lat_opt.batches, "batch sizes, comma-separated (default 1,64)")->delimiter(',')
      ->check(CLI::Range(int64_t{1}, int64_t{4096}));
  latency->add_option("--runs", lat_opt.runs, "timed passes per round (default 100)")->check(CLI::Range(1, 100000));
  latency->add_option("--rounds", lat_opt.rounds, "interleaved rounds (default 3)")->check(CLI::Range(1, 100));
  latency->add_option("--threads", lat_opt.threads, "intra-op threads (default 1)")->check(CLI::Range(1, 1024));
  latency->add_option("--json", lat_opt.json_out, "also write the rows to this JSON file");

  std::vector<std::string> compare_dirs;
  bool compare_md = false;
  auto* compare = app.add_subcommand("compare", "one table over several runs (their report.json or summary.json)");
  compare->add_option("runs", compare_dirs, "run folders")->required();
  compare->add_flag("--markdown", compare_md, "print a Markdown table");

  CLI11_PARSE(app, argc, argv);
  isp::Registry& reg = isp::global_registry();
  try {
    reg.load_default_plugins();
    if (*run && launch.nproc_per_node > 0) {
      // The launcher: the workers are `isp run` with the same arguments and torchrun's environment variables.
      std::vector<std::string> args{"run", run_opt.recipe_path};
      for (const auto& s : run_opt.overrides) args.insert(args.end(), {"--set", s});
      if (!run_opt.work_dir.empty()) args.insert(args.end(), {"--work-dir", run_opt.work_dir});
      if (run_opt.resume) args.push_back("--resume");
      if (run_opt.force) args.push_back("--force");
      for (const auto& s : run_opt.reuse_from) args.insert(args.end(), {"--reuse", s});
      return isp::dist::launch(args, launch);
    }
    if (*run && launch.nproc_per_node == 0 && (launch.nnodes != 1 || launch.node_rank != 0))
      throw isp::Error("--nnodes and --node-rank need --nproc-per-node");
    if (*run) return isp::run_recipe(reg, run_opt);
    if (*validate) return cmd_validate(reg, val_opt, validate_recipes);
    if (*plugins) return cmd_plugins(reg, as_json, kind);
    if (*explain) return isp_app::explain(reg, ex_opt);
    if (*compare) return compare_runs(compare_dirs, compare_md);
    if (*reexport) return isp_app::reexport(reg, rx_opt);
    if (*latency) return isp_app::latency(reg, lat_opt);
    if (*sweep) return isp_app::sweep(reg, sw_opt);
    if (*report) {
      const bool is_sweep = std::filesystem::exists(std::filesystem::path(report_dir) / "sweep.json");
      std::printf("wrote %s\n", (is_sweep ? isp::write_sweep_report_html(report_dir) : isp::write_run_report_html(report_dir)).c_str());
      return 0;
    }
  } catch (const isp::Error& e) {
    std::fprintf(stderr, "error: %s\n", e.what());
    return 2;
  } catch (const std::exception& e) {
    std::fprintf(stderr, "error (unexpected): %s\n", e.what());
    return 3;
  }
  return 0;
}
