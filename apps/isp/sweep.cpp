// `isp sweep SWEEP.json` (README "Sweeps"). A sweep file:
//   {"description": "...", "recipe": "../isp/quick_fmnist.json",   (relative to the sweep file)
//    "mode": "grid" | "zip",                                        (default grid)
//    "set": {"runtime.threads": 1},                                 (optional: the same for every point)
//    "axes": [{"path": "nodes.interp.weight", "values": [0, 1, 10], "name": "w"},   (name optional)
//             {"path": "nodes.gates", "values": [{"type": "L1NormPruner", ...}, ...],
//              "labels": ["L1-norm", ...]},                             (labels: names for folders and tables)
//             {"path": "recipe", "values": ["../isp/a.json", "../isp/b.json"]},   (whole recipes as an axis)
//             {"path": "seed", "values": [1, 2, 3]}]}
// Every point is the recipe with its `--set path=value`s. All points are validated before anything runs; then
// each runs as its own `isp run` process (a crash stays in its point), up to --jobs at once, in
// <work>/<name=value,...>/, taking over every stage an earlier finished point already ran with the same
// fingerprint (--reuse), so a sweep over pruners trains one classifier and one AEM. A point whose folder holds
// a run resumes it. At the end: sweep.json, sweep.csv and sweep.md (mean ± std over the seed axis).
#include "sweep.h"

#include <fcntl.h>
#include <sys/wait.h>
#include <unistd.h>

#include <algorithm>
#include <cctype>
#include <chrono>
#include <cmath>
#include <cstdio>
#include <filesystem>
#include <map>
#include <sstream>

#include "isp/registry/error.h"
#include "isp/registry/recipe.h"
#include "isp/report_html.h"
#include "isp/runner.h"
#include "sweep_points.h"

namespace fs = std::filesystem;
using isp::json;

namespace isp_app {
namespace {

// A value as it appears in a folder name and a table: numbers and strings as they are, a component by its type.
std::string short_value(const json& v) {
  if (v.is_string()) return v.get<std::string>();
  if (v.is_object() && v.contains("type") && v["type"].is_string()) {
    std::string t = v["type"].get<std::string>();
    if (v.size() > 1) t += "+" + std::to_string(std::hash<std::string>{}(v.dump()) % 10000);
    return t;
  }
  return v.dump();
}


std::string folder_safe(const std::string& s) {
  std::string out;
  for (char c : s) out += (std::isalnum(static_cast<unsigned char>(c)) || c == '.' || c == '-' || c == '_' || c == '=' || c == ',') ? c : '_';
  return out;
}

std::vector<Axis> read_axes(const json& doc, const std::string& file) {
  if (!doc.contains("axes") || !doc["axes"].is_array() || doc["axes"].empty())
    throw isp::Error(file + ": /axes: expected a non-empty array of {\"path\": \"nodes.x.y\", \"values\": [...]}");
  std::vector<Axis> axes;
  for (std::size_t i = 0; i < doc["axes"].size(); ++i) {
    const json& a = doc["axes"][i];
    const std::string where = file + ": /axes/" + std::to_string(i);
    if (!a.is_object()) throw isp::Error(where + ": expected an object {\"path\", \"values\", \"name\"}");
    for (auto it = a.begin(); it != a.end(); ++it)
      if (it.key() != "path" && it.key() != "values" && it.key() != "name" && it.key() != "labels")
        throw isp::Error(where + "/" + it.key() + ": unknown key (expected path, values, name, labels)");
    if (!a.contains("path") || !a["path"].is_string() || a["path"].get<std::string>().empty())
      throw isp::Error(where + "/path: expected a recipe path such as \"nodes.interp.weight\"");
    if (!a.contains("values") || !a["values"].is_array() || a["values"].empty())
      throw isp::Error(where + "/values: expected a non-empty array");
    Axis ax;
    ax.path = a["path"].get<std::string>();
    ax.name = a.value("name", ax.path.substr(ax.path.rfind('.') == std::string::npos ? 0 : ax.path.rfind('.') + 1));
    ax.values = a["values"].get<std::vector<json>>();
    if (a.contains("labels")) {
      if (!a["labels"].is_array() || a["labels"].size() != ax.values.size())
        throw isp::Error(where + "/labels: expected one string per value (" + std::to_string(ax.values.size()) + ")");
      for (const auto& l : a["labels"]) {
        if (!l.is_string()) throw isp::Error(where + "/labels: expected strings");
        ax.labels.push_back(l.get<std::string>());
      }
    }
    if (ax.is_recipe())
      for (std::size_t v = 0; v < ax.values.size(); ++v)
        if (!ax.values[v].is_string())
          throw isp::Error(where + "/values/" + std::to_string(v) + ": a recipe axis takes recipe files (relative to the sweep file)");
    axes.push_back(ax);
  }
  return axes;
}

std::vector<Point> make_points(const std::vector<Axis>& axes, const std::string& mode, const std::string& file) {
  std::vector<std::vector<std::size_t>> combos;  // one value index per axis
  if (mode == "zip") {
    for (const auto& a : axes)
      if (a.values.size() != axes[0].values.size())
        throw isp::Error(file + ": /mode: \"zip\" needs axes of one length; " + a.path + " has " +
                         std::to_string(a.values.size()) + ", " + axes[0].path + " has " + std::to_string(axes[0].values.size()));
    for (std::size_t i = 0; i < axes[0].values.size(); ++i) combos.push_back(std::vector<std::size_t>(axes.size(), i));
  } else if (mode == "grid") {
    combos = {{}};
    for (const auto& a : axes) {
      std::vector<std::vector<std::size_t>> next;
      for (const auto& c : combos)
        for (std::size_t v = 0; v < a.values.size(); ++v) {
          auto d = c;
          d.push_back(v);
          next.push_back(d);
        }
      combos = next;
    }
  } else {
    throw isp::Error(file + ": /mode: expected \"grid\" or \"zip\", got \"" + mode + "\"");
  }
  std::vector<Point> points;
  std::map<std::string, int> seen;
  for (const auto& c : combos) {
    Point p;
    for (std::size_t i = 0; i < axes.size(); ++i) {
      const json& value = axes[i].values[c[i]];
      p.values.push_back(value);
      p.label += (i ? "," : "") + axes[i].name + "=" + axes[i].label(c[i]);
      p.shown.push_back(axes[i].label(c[i]));
      if (axes[i].is_recipe()) p.recipe = value.get<std::string>();
      else p.overrides.push_back(axes[i].path + "=" + value.dump());
    }
    p.label = folder_safe(p.label);
    if (seen[p.label]++) p.label += "_" + std::to_string(seen[p.label]);
    points.push_back(p);
  }
  return points;
}

// Starts `isp run` for one point; stdout and stderr go to <point>.log. Returns the child's pid.
pid_t start_point(const std::string& isp, const std::vector<std::string>& args, const std::string& log) {
  std::vector<char*> argv;
  argv.push_back(const_cast<char*>(isp.c_str()));
  for (const auto& a : args) argv.push_back(const_cast<char*>(a.c_str()));
  argv.push_back(nullptr);
  const pid_t pid = ::fork();
  if (pid < 0) throw isp::Error("isp sweep: fork failed");
  if (pid == 0) {
    const int fd = ::open(log.c_str(), O_WRONLY | O_CREAT | O_TRUNC, 0644);
    if (fd >= 0) {
      ::dup2(fd, 1);
      ::dup2(fd, 2);
      ::close(fd);
    }
    ::execv(isp.c_str(), argv.data());
    std::_Exit(127);
  }
  return pid;
}

}  // namespace

std::string Axis::label(std::size_t i) const {
  if (!labels.empty()) return labels[i];
  if (is_recipe()) return fs::path(values[i].get<std::string>()).stem().string();
  return short_value(values[i]);
}

int sweep(isp::Registry& reg, const SweepOptions& o) {
  const std::string file = o.sweep_path;
  json doc;
  try {
    doc = json::parse(isp::read_text_file(file));
  } catch (const json::exception& e) {
    throw isp::Error(file + ": not valid JSON: " + e.what());
  }
  if (!doc.is_object()) throw isp::Error(file + ": expected a JSON object");
  for (auto it = doc.begin(); it != doc.end(); ++it)
    if (it.key() != "description" && it.key() != "recipe" && it.key() != "mode" && it.key() != "set" &&
        it.key() != "axes" && it.key() != "work_dir")
      throw isp::Error(file + ": /" + it.key() + ": unknown key (expected description, recipe, mode, set, axes, work_dir)");
  const std::vector<Axis> axes = read_axes(doc, file);
  const bool recipe_axis = std::any_of(axes.begin(), axes.end(), [](const Axis& a) { return a.is_recipe(); });
  if (!recipe_axis && (!doc.contains("recipe") || !doc["recipe"].is_string()))
    throw isp::Error(file + ": /recipe: expected the path of the recipe (relative to the sweep file), or an axis "
                     "with \"path\": \"recipe\"");
  auto recipe_of = [&](const Point& p) {
    return (fs::path(file).parent_path() / (p.recipe.empty() ? doc["recipe"].get<std::string>() : p.recipe)).lexically_normal();
  };
  std::vector<std::string> common;
  if (doc.contains("set")) {
    if (!doc["set"].is_object()) throw isp::Error(file + ": /set: expected an object {\"recipe.path\": value}");
    for (auto it = doc["set"].begin(); it != doc["set"].end(); ++it) common.push_back(it.key() + "=" + it.value().dump());
  }
  const std::vector<Point> points = make_points(axes, doc.value("mode", std::string("grid")), file);
  std::string work = o.work_dir;
  if (work.empty()) work = doc.value("work_dir", std::string());
  if (work.empty()) work = "work_dirs/" + fs::path(file).stem().string();

  // Every point is checked completely before any runs: a typo in the last point costs nothing.
  int invalid = 0;
  const auto shared_data = isp::share_validation_data();  // the points' datasets, decoded once
  for (const auto& p : points) {
    isp::RunOptions v;
    v.recipe_path = recipe_of(p).string();
    if (!fs::exists(v.recipe_path)) {
      std::fprintf(stderr, "[sweep] point %s: recipe %s does not exist\n", p.label.c_str(), v.recipe_path.c_str());
      ++invalid;
      continue;
    }
    v.overrides = common;
    v.overrides.insert(v.overrides.end(), p.overrides.begin(), p.overrides.end());
    v.validate_only = true;
    v.shared_components = shared_data;
    try {
      if (isp::run_recipe(reg, v) != 0) throw isp::Error("validation failed");
    } catch (const std::exception& e) {
      std::fprintf(stderr, "[sweep] point %s: %s\n", p.label.c_str(), e.what());
      ++invalid;
    }
  }
  if (invalid) throw isp::Error(file + ": " + std::to_string(invalid) + " of " + std::to_string(points.size()) + " points are invalid (above); nothing was run");
  std::fprintf(stderr, "[sweep] %zu points valid -> %s/\n", points.size(), work.c_str());
  if (o.validate_only) return 0;

  fs::create_directories(work);
  std::string isp_bin = o.isp_binary;
  if (isp_bin.empty()) isp_bin = fs::read_symlink("/proc/self/exe").string();
  std::vector<json> runs(points.size(), json{{"status", "missing"}});
  std::vector<std::string> finished;  // folders later points may take stages from
  std::map<pid_t, std::size_t> running;
  const auto t0 = std::chrono::steady_clock::now();
  std::size_t next = 0, done = 0;
  int failures = 0;
  auto progress = [&] {
    const double s = std::chrono::duration<double>(std::chrono::steady_clock::now() - t0).count();
    const double eta = done ? s / done * (points.size() - done) : 0;
    std::fprintf(stderr, "[sweep] %zu/%zu points done, %zu running, %d failed, %.0f s elapsed%s\n", done, points.size(),
                 running.size(), failures, s, done ? (", ETA " + std::to_string(static_cast<int>(eta)) + " s").c_str() : "");
  };
  while (done < points.size()) {
    // The first point runs alone: it trains the stages every later point shares.
    const std::size_t slots = finished.empty() && done == 0 ? 1 : static_cast<std::size_t>(std::max(1, o.jobs));
    while (next < points.size() && running.size() < slots) {
      const Point& p = points[next];
      const fs::path dir = fs::path(work) / p.label;
      std::vector<std::string> args = {"run", recipe_of(p).string(), "--work-dir", dir.string()};
      for (const auto& s : common) args.insert(args.end(), {"--set", s});
      for (const auto& s : p.overrides) args.insert(args.end(), {"--set", s});
      if (fs::exists(dir / "state.json")) {
        args.push_back("--resume");
      } else {
        for (const auto& f : finished) args.insert(args.end(), {"--reuse", f});
      }
      running[start_point(isp_bin, args, dir.string() + ".log")] = next;
      std::fprintf(stderr, "[sweep] start %s (log %s.log)\n", p.label.c_str(), dir.c_str());
      ++next;
    }
    int status = 0;
    const pid_t pid = ::waitpid(-1, &status, 0);
    if (pid < 0) throw isp::Error("isp sweep: waitpid failed");
    auto it = running.find(pid);
    if (it == running.end()) continue;
    const std::size_t i = it->second;
    running.erase(it);
    const int code = WIFEXITED(status) ? WEXITSTATUS(status) : 128 + WTERMSIG(status);
    const fs::path dir = fs::path(work) / points[i].label;
    runs[i] = read_sweep_run(dir.string(), code);
    // Whatever stages it finished can be shared, even where it failed later (a missed budget: exit 4).
    if (fs::exists(dir / "state.json")) finished.push_back(dir.string());
    if (code != 0) ++failures;
    ++done;
    std::fprintf(stderr, "[sweep] %s: %s\n", points[i].label.c_str(), runs[i]["status"].get<std::string>().c_str());
    progress();
    write_sweep_tables(work, axes, points, runs, doc);  // the tables grow as points finish
    isp::write_sweep_report_html(work);
  }
  std::fprintf(stdout, "%s", isp::read_text_file(work + "/sweep.md").c_str());
  std::fprintf(stderr, "[sweep] wrote %s/sweep.md, sweep.json, sweep.csv, report.html\n", work.c_str());
  return failures ? 1 : 0;
}

}  // namespace isp_app
