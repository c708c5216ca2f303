// The tables of an `isp sweep`: one row per point (sweep.json, sweep.csv) and one per group of points that
// differ only in the seed, mean +- std (sweep.md).
#include <cmath>
#include <cstdio>
#include <filesystem>
#include <map>
#include <sstream>

#include "isp/registry/recipe.h"
#include "sweep_points.h"

namespace fs = std::filesystem;
using isp::json;

namespace isp_app {
namespace {

// Number at a JSON pointer of a run's report.json (or summary.json), null where absent.
json metric(const json& run, const std::string& pointer) {
  const json::json_pointer p(pointer);
  return run.contains(p) ? run.at(p) : json();
}

struct Column {
  const char* name;
  const char* pointer;
  int scale;  // 100: shown as a percentage
};
// What a row shows, where the runs have it: the export report (pruning runs) or the run summary (AEM runs).
const std::vector<Column>& columns() {
  static const std::vector<Column> c = {
      {"baseline top-1 %", "/report/baseline_top1", 100},
      {"finetuned top-1 %", "/report/finetuned_top1", 100},
      {"FLOPs ratio", "/report/flops_ratio", 1},
      {"params ↓ %", "/report/params_reduction", 100},
      {"mask IoU", "/report/saliency/mask_iou_at_0.5", 1},
      {"centre shift px", "/report/saliency/mean_center_shift_px", 1},
      {"deletion AUC (pruned)", "/report/saliency/pruned/deletion_auc", 1},
      {"mass on object (pruned)", "/report/saliency/pruned/mass_on_object", 1},
      {"classifier top-1 %", "/summary/stages/classifier/test_top1", 100},  // the top level holds the last stage's
      {"selector agreement %", "/summary/selector_agreement", 100},
      {"deletion AUC", "/summary/saliency/deletion_auc", 1},
      {"centred deletion AUC", "/summary/saliency/centred_gaussian/deletion_auc", 1},
      {"mass on object", "/summary/saliency/mass_on_object", 1},
      {"centre spread row px", "/summary/saliency/centre_std_row_px", 1},
      {"centre spread col px", "/summary/saliency/centre_std_col_px", 1},
      {"wall s", "/wall_seconds", 1},
  };
  return c;
}

std::string fmt(double v, int scale) {
  char b[48];
  std::snprintf(b, sizeof b, scale == 100 ? "%.2f" : "%.3f", v * scale);
  return b;
}

}  // namespace

// The three tables. Rows that differ only in the seed axis are summarised as mean ± std (population std over
// the seeds that finished), beside the per-point rows in sweep.json/sweep.csv.
void write_sweep_tables(const std::string& work, const std::vector<Axis>& axes, const std::vector<Point>& points,
                        const std::vector<json>& runs, const json& doc) {
  std::vector<const Column*> shown;
  for (const auto& c : columns())
    for (const auto& r : runs)
      if (metric(r, c.pointer).is_number()) {
        shown.push_back(&c);
        break;
      }
  json rows = json::array();
  std::ostringstream csv;
  for (const auto& a : axes) csv << a.name << ",";
  csv << "run,status";
  for (const auto* c : shown) csv << "," << c->name;
  csv << "\n";
  for (std::size_t i = 0; i < points.size(); ++i) {
    json row = {{"run", points[i].label}, {"status", runs[i].value("status", std::string("missing"))}};
    for (std::size_t a = 0; a < axes.size(); ++a) {
      row["axes"][axes[a].name] = points[i].values[a];
      row["labels"][axes[a].name] = points[i].shown[a];
      csv << '"' << points[i].shown[a] << "\",";
    }
    csv << '"' << points[i].label << "\"," << row["status"].get<std::string>();  // folder names hold commas
    for (const auto* c : shown) {
      const json v = metric(runs[i], c->pointer);
      row["metrics"][c->name] = v;
      csv << "," << (v.is_number() ? fmt(v.get<double>(), c->scale) : (v.is_boolean() ? v.dump() : ""));
    }
    csv << "\n";
    rows.push_back(row);
  }
  // Group by every axis but the seed.
  std::size_t seed_axis = axes.size();
  for (std::size_t a = 0; a < axes.size(); ++a)
    if (axes[a].path == "seed") seed_axis = a;
  std::vector<std::string> keys;
  std::map<std::string, std::vector<std::size_t>> groups;
  for (std::size_t i = 0; i < points.size(); ++i) {
    std::string key;
    for (std::size_t a = 0; a < axes.size(); ++a)
      if (a != seed_axis) key += points[i].shown[a] + " | ";
    if (!groups.count(key)) keys.push_back(key);
    groups[key].push_back(i);
  }
  std::ostringstream md;
  md << "# Sweep: " << doc.value("description", std::string()) << "\n\n";
  md << "Recipe `" << doc.value("recipe", std::string("(an axis)")) << "`, " << points.size() << " points ("
     << doc.value("mode", std::string("grid")) << ")";
  if (seed_axis < axes.size()) md << "; mean ± std over " << axes[seed_axis].values.size() << " seeds";
  md << ".\n\n|";
  for (std::size_t a = 0; a < axes.size(); ++a)
    if (a != seed_axis) md << " " << axes[a].name << " |";
  md << " runs |";
  for (const auto* c : shown) md << " " << c->name << " |";
  md << "\n|";
  for (std::size_t a = 0; a < axes.size(); ++a)
    if (a != seed_axis) md << "---|";
  md << "---|";
  for (std::size_t k = 0; k < shown.size(); ++k) md << "---|";
  md << "\n";
  json summary = json::array();
  for (const auto& key : keys) {
    const auto& idx = groups[key];
    md << "| " << key;
    int finished = 0;
    for (auto i : idx) finished += runs[i].value("status", std::string()) == "finished";
    md << finished << "/" << idx.size() << " |";
    json srow = {{"runs", idx.size()}, {"finished", finished}};
    for (std::size_t a = 0; a < axes.size(); ++a)
      if (a != seed_axis) srow["axes"][axes[a].name] = points[idx[0]].shown[a];
    for (const auto* c : shown) {
      std::vector<double> v;
      for (auto i : idx)
        if (const json m = metric(runs[i], c->pointer); m.is_number()) v.push_back(m.get<double>());
      if (v.empty()) {
        md << " - |";
        continue;
      }
      double mean = 0, var = 0;
      for (double x : v) mean += x / v.size();
      for (double x : v) var += (x - mean) * (x - mean) / v.size();
      md << " " << fmt(mean, c->scale);
      if (v.size() > 1) md << " ± " << fmt(std::sqrt(var), c->scale);
      md << " |";
      srow["metrics"][c->name] = {{"mean", mean}, {"std", std::sqrt(var)}, {"n", v.size()}};
    }
    md << "\n";
    summary.push_back(srow);
  }
  json column_names = json::array();  // the table's order (a JSON object would sort them)
  for (const auto* c : shown) column_names.push_back(c->name);
  isp::write_file_atomic(work + "/sweep.json", json{{"sweep", doc}, {"columns", column_names}, {"points", rows},
                                                    {"summary", summary}}.dump(2) + "\n");
  isp::write_file_atomic(work + "/sweep.csv", csv.str());
  isp::write_file_atomic(work + "/sweep.md", md.str());
}

json read_sweep_run(const std::string& folder, int exit_code) {
  const fs::path dir(folder);
  json r = {{"status", exit_code == 0 ? "finished" : "failed (exit " + std::to_string(exit_code) + ")"}};
  if (fs::exists(dir / "summary.json")) r["summary"] = json::parse(isp::read_text_file((dir / "summary.json").string()));
  if (fs::exists(dir / "report.json")) r["report"] = json::parse(isp::read_text_file((dir / "report.json").string()));
  double wall = 0;
  const json stages = r.value("summary", json::object()).value("stages", json::object());  // items() needs an lvalue
  for (const auto& [stage, s] : stages.items())
    if (!s.contains("reused_from")) wall += s.value("wall_seconds", 0.0);
  r["wall_seconds"] = wall;
  return r;
}


}  // namespace isp_app
