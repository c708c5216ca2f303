#include "compare.h"

#include <cstdio>
#include <filesystem>
#include <iostream>
#include <sstream>

#include "isp/registry/recipe.h"

namespace fs = std::filesystem;
using isp::json;

namespace {
std::string pct(const json& v) {
  if (!v.is_number()) return "-";
  char b[32];
  std::snprintf(b, sizeof b, "%.2f", 100.0 * v.get<double>());
  return b;
}
std::string fixed3(const json& v) {
  if (!v.is_number()) return "-";
  char b[32];
  std::snprintf(b, sizeof b, "%.3f", v.get<double>());
  return b;
}
std::string mega(const json& v) {
  if (!v.is_number()) return "-";
  char b[32];
  std::snprintf(b, sizeof b, "%.3f", v.get<double>() / 1e6);
  return b;
}
// "original→pruned" for one saliency metric of the export report (docs/method.md §9), "-" where absent.
std::string both(const json& sal, const char* key) {
  const json o = sal.value("original", json::object()).value(key, json());
  const json p = sal.value("pruned", json::object()).value(key, json());
  if (!o.is_number() && !p.is_number()) return "-";
  return fixed3(o) + "→" + fixed3(p);
}
}  // namespace

int compare_runs(const std::vector<std::string>& runs, bool md) {
  std::vector<std::vector<std::string>> rows;
  rows.push_back({"run", "pruner", "baseline %", "pruned %", "finetuned %", "Δ", "MFLOPs", "FLOPs ratio", "budget met", "FLOPs ↓ %", "Mparams",
                  "params ↓ %", "mask IoU", "centre shift px", "deletion AUC orig→pruned", "insertion AUC orig→pruned",
                  "mass on object orig→pruned"});
  for (const auto& r : runs) {
    fs::path p = fs::path(r) / "report.json";
    if (!fs::exists(p)) p = fs::path(r) / "summary.json";
    if (!fs::exists(p)) throw isp::Error(r + ": no report.json or summary.json (is it a finished run folder?)");
    json j = json::parse(isp::read_text_file(p.string()));
    json sal = j.value("saliency", json::object());
    rows.push_back({fs::path(r).filename().string(), j.value("pruner", std::string("-")), pct(j.value("baseline_top1", j.value("test_top1", json()))),
                    pct(j.value("pruned_top1", json())), pct(j.value("finetuned_top1", json())),
                    pct(j.value("delta_top1", json())), mega(j.value("flops_after", json())),
                    j.contains("flops_ratio") ? fixed3(j["flops_ratio"]) : "-",
                    j.contains("budget_met") ? (j["budget_met"].get<bool>() ? "yes" : "NO") : "-",
                    pct(j.value("flops_reduction", json())), mega(j.value("params_after", json())),
                    pct(j.value("params_reduction", json())), fixed3(sal.value("mask_iou_at_0.5", json())),
                    fixed3(sal.value("mean_center_shift_px", json())), both(sal, "deletion_auc"),
                    both(sal, "insertion_auc"), both(sal, "mass_on_object")});
  }
  std::vector<std::size_t> w(rows[0].size(), 0);
  auto len = [](const std::string& s) {  // count UTF-8 code points for alignment
    std::size_t n = 0;
    for (unsigned char c : s) n += (c & 0xC0) != 0x80;
    return n;
  };
  for (const auto& row : rows)
    for (std::size_t i = 0; i < row.size(); ++i) w[i] = std::max(w[i], len(row[i]));
  for (std::size_t k = 0; k < rows.size(); ++k) {
    std::ostringstream os;
    for (std::size_t i = 0; i < rows[k].size(); ++i) {
      os << (md ? "| " : "") << rows[k][i] << std::string(w[i] - len(rows[k][i]) + 1, ' ');
      if (!md) os << " ";
    }
    std::cout << os.str() << (md ? "|" : "") << "\n";
    if (k == 0 && md) {
      for (std::size_t i = 0; i < w.size(); ++i) std::cout << "|" << std::string(w[i] + 2, '-');
      std::cout << "|\n";
    }
  }
  return 0;
}
