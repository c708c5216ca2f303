// report.html for runs and sweeps (isp/report_html.h). Every plot is an <svg class="plot"> drawn here.
#include "isp/report_html.h"

#include <algorithm>
#include <cmath>
#include <cstdio>
#include <filesystem>
#include <fstream>
#include <limits>
#include <map>
#include <sstream>
#include <vector>

#include "isp/registry/recipe.h"

namespace fs = std::filesystem;

namespace isp {
namespace {

const char* kPalette[] = {"#1f77b4", "#d62728", "#2ca02c", "#ff7f0e", "#9467bd", "#8c564b", "#e377c2", "#17becf"};

std::string esc(const std::string& s) {
  std::string o;
  for (char c : s) {
    if (c == '<') o += "&lt;";
    else if (c == '>') o += "&gt;";
    else if (c == '&') o += "&amp;";
    else if (c == '"') o += "&quot;";
    else o += c;
  }
  return o;
}

std::string num(double v, int digits = 3) {
  char b[48];
  std::snprintf(b, sizeof b, "%.*g", digits, v);
  return b;
}

std::string base64(const std::string& in) {
  static const char* t = "ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789+/";
  std::string out;
  std::size_t i = 0;
  for (; i + 2 < in.size(); i += 3) {
    const unsigned v = (static_cast<unsigned char>(in[i]) << 16) | (static_cast<unsigned char>(in[i + 1]) << 8) |
                       static_cast<unsigned char>(in[i + 2]);
    out += {t[v >> 18], t[(v >> 12) & 63], t[(v >> 6) & 63], t[v & 63]};
  }
  if (i + 1 == in.size()) {
    const unsigned v = static_cast<unsigned char>(in[i]) << 16;
    out += {t[v >> 18], t[(v >> 12) & 63], '=', '='};
  } else if (i + 2 == in.size()) {
    const unsigned v = (static_cast<unsigned char>(in[i]) << 16) | (static_cast<unsigned char>(in[i + 1]) << 8);
    out += {t[v >> 18], t[(v >> 12) & 63], t[(v >> 6) & 63], '='};
  }
  return out;
}

struct Series {
  std::string name;
  std::vector<std::pair<double, double>> xy;
};

// Axis range with a little margin; a flat series gets a unit range.
std::pair<double, double> range_of(const std::vector<double>& v) {
  double lo = std::numeric_limits<double>::infinity(), hi = -lo;
  for (double x : v) lo = std::min(lo, x), hi = std::max(hi, x);
  if (!std::isfinite(lo)) return {0, 1};
  if (hi - lo < 1e-12) return {lo - 0.5, hi + 0.5};
  const double m = 0.05 * (hi - lo);
  return {lo - m, hi + m};
}

// One plot: lines (with dots) or a scatter; `front` (optional) drawn as a step line over the scatter.
class Plot {
 public:
  Plot(std::string title, std::string xlabel, std::string ylabel) : title_(std::move(title)), xl_(std::move(xlabel)), yl_(std::move(ylabel)) {}
  void add(Series s) { series_.push_back(std::move(s)); }
  void front(std::vector<std::pair<double, double>> f) { front_ = std::move(f); }
  bool empty() const { return series_.empty(); }

  std::string svg(bool lines) const {
    const double W = 520, H = 300, L = 60, R = 150, T = 28, B = 42;
    std::vector<double> xs, ys;
    for (const auto& s : series_)
      for (const auto& [x, y] : s.xy) xs.push_back(x), ys.push_back(y);
    const auto [x0, x1] = range_of(xs);
    const auto [y0, y1] = range_of(ys);
    auto X = [&](double x) { return L + (x - x0) / (x1 - x0) * (W - L - R); };
    auto Y = [&](double y) { return H - B - (y - y0) / (y1 - y0) * (H - T - B); };
    std::ostringstream o;
    o << "<svg class=\"plot\" xmlns=\"http://www.w3.org/2000/svg\" width=\"" << W << "\" height=\"" << H
      << "\" viewBox=\"0 0 " << W << " " << H << "\" font-family=\"sans-serif\" font-size=\"11\">\n";
    o << "<rect x=\"0\" y=\"0\" width=\"" << W << "\" height=\"" << H << "\" fill=\"white\"/>\n";
    o << "<text x=\"" << L << "\" y=\"16\" font-size=\"13\" font-weight=\"bold\">" << esc(title_) << "</text>\n";
    for (int i = 0; i <= 4; ++i) {  // grid and tick labels
      const double gx = x0 + (x1 - x0) * i / 4, gy = y0 + (y1 - y0) * i / 4;
      o << "<line x1=\"" << X(gx) << "\" y1=\"" << T << "\" x2=\"" << X(gx) << "\" y2=\"" << H - B << "\" stroke=\"#eee\"/>";
      o << "<line x1=\"" << L << "\" y1=\"" << Y(gy) << "\" x2=\"" << W - R << "\" y2=\"" << Y(gy) << "\" stroke=\"#eee\"/>";
      o << "<text x=\"" << X(gx) << "\" y=\"" << H - B + 14 << "\" text-anchor=\"middle\">" << num(gx) << "</text>";
      o << "<text x=\"" << L - 4 << "\" y=\"" << Y(gy) + 4 << "\" text-anchor=\"end\">" << num(gy) << "</text>\n";
    }
    o << "<rect x=\"" << L << "\" y=\"" << T << "\" width=\"" << W - L - R << "\" height=\"" << H - T - B
      << "\" fill=\"none\" stroke=\"#999\"/>\n";
    o << "<text x=\"" << (L + W - R) / 2 << "\" y=\"" << H - 8 << "\" text-anchor=\"middle\">" << esc(xl_) << "</text>\n";
    o << "<text transform=\"translate(14," << (T + H - B) / 2 << ") rotate(-90)\" text-anchor=\"middle\">" << esc(yl_) << "</text>\n";
    if (!front_.empty()) {
      o << "<polyline fill=\"none\" stroke=\"#888\" stroke-dasharray=\"4 3\" points=\"";
      for (std::size_t i = 0; i < front_.size(); ++i) {
        if (i) o << X(front_[i].first) << "," << Y(front_[i - 1].second) << " ";
        o << X(front_[i].first) << "," << Y(front_[i].second) << " ";
      }
      o << "\"/>\n";
    }
    for (std::size_t k = 0; k < series_.size(); ++k) {
      const auto& s = series_[k];
      const char* c = kPalette[k % 8];
      if (lines && s.xy.size() > 1) {
        o << "<polyline fill=\"none\" stroke=\"" << c << "\" stroke-width=\"1.5\" points=\"";
        for (const auto& [x, y] : s.xy) o << X(x) << "," << Y(y) << " ";
        o << "\"/>\n";
      }
      for (std::size_t i = 0; i < s.xy.size(); ++i) {
        o << "<circle cx=\"" << X(s.xy[i].first) << "\" cy=\"" << Y(s.xy[i].second) << "\" r=\"" << (lines ? 2 : 4)
          << "\" fill=\"" << c << "\"><title>" << esc(s.name) << ": " << num(s.xy[i].first, 4) << ", "
          << num(s.xy[i].second, 4) << "</title></circle>";
      }
      if (k >= 16) continue;  // the legend holds 16 entries; hovering a dot names any of them
      o << "<rect x=\"" << W - R + 10 << "\" y=\"" << T + 14 * k << "\" width=\"10\" height=\"10\" fill=\"" << c << "\"/>";
      o << "<text x=\"" << W - R + 24 << "\" y=\"" << T + 14 * k + 9 << "\">" << esc(s.name) << "</text>\n";
    }
    o << "</svg>\n";
    return o.str();
  }

 private:
  std::string title_, xl_, yl_;
  std::vector<Series> series_;
  std::vector<std::pair<double, double>> front_;
};

// Kept vs full channels per gated layer, as horizontal-free vertical bars.
std::string width_bars(const json& kept, const json& full) {
  const std::size_t n = std::min(kept.size(), full.size());
  if (n == 0) return "";
  double top = 1;
  for (std::size_t i = 0; i < n; ++i) top = std::max(top, full[i].get<double>());
  const double W = std::max(520.0, 60.0 + 14.0 * n), H = 240, L = 50, B = 30, T = 28, bw = (W - L - 10) / n;
  std::ostringstream o;
  o << "<svg class=\"plot\" xmlns=\"http://www.w3.org/2000/svg\" width=\"" << W << "\" height=\"" << H
    << "\" font-family=\"sans-serif\" font-size=\"11\">\n<rect width=\"" << W << "\" height=\"" << H << "\" fill=\"white\"/>\n";
  o << "<text x=\"" << L << "\" y=\"16\" font-size=\"13\" font-weight=\"bold\">Kept channels per gated layer (grey: "
       "original width)</text>\n";
  auto Y = [&](double v) { return H - B - v / top * (H - T - B); };
  for (std::size_t i = 0; i < n; ++i) {
    const double x = L + i * bw, f = full[i].get<double>(), k = kept[i].get<double>();
    o << "<rect x=\"" << x + 1 << "\" y=\"" << Y(f) << "\" width=\"" << bw - 2 << "\" height=\"" << Y(0) - Y(f)
      << "\" fill=\"#ddd\"/><rect x=\"" << x + 1 << "\" y=\"" << Y(k) << "\" width=\"" << bw - 2 << "\" height=\""
      << Y(0) - Y(k) << "\" fill=\"#1f77b4\"><title>layer " << i << ": " << k << " of " << f << "</title></rect>\n";
  }
  for (int i = 0; i <= 4; ++i)
    o << "<text x=\"" << L - 4 << "\" y=\"" << Y(top * i / 4) + 4 << "\" text-anchor=\"end\">" << num(top * i / 4) << "</text>";
  o << "<text x=\"" << L << "\" y=\"" << H - 10 << "\">gated layers, input to output</text>\n</svg>\n";
  return o.str();
}

std::string image_tag(const fs::path& png, const std::string& caption) {
  if (!fs::exists(png)) return "";
  std::ifstream f(png, std::ios::binary);
  const std::string bytes((std::istreambuf_iterator<char>(f)), std::istreambuf_iterator<char>());
  return "<figure><img alt=\"" + esc(caption) + "\" src=\"data:image/png;base64," + base64(bytes) +
         "\"/><figcaption>" + esc(caption) + "</figcaption></figure>\n";
}

const char* kHead =
    "<!DOCTYPE html>\n<html><head><meta charset=\"utf-8\"><title>%s</title><style>"
    "body{font-family:sans-serif;margin:24px;max-width:1200px;color:#222}"
    "table{border-collapse:collapse;margin:8px 0 16px;display:block;overflow-x:auto}td,th{border:1px solid #ccc;padding:3px 8px;text-align:right}"
    "th{background:#f4f4f4}td:first-child,th:first-child{text-align:left}"
    ".plots{display:flex;flex-wrap:wrap;gap:12px}figure{margin:8px 0}img{max-width:100%%;image-rendering:pixelated}"
    "</style></head><body>\n";

std::string page_head(const std::string& title) {
  char b[1024];
  std::snprintf(b, sizeof b, kHead, esc(title).c_str());
  return b;
}

std::string table(const std::vector<std::string>& header, const std::vector<std::vector<std::string>>& rows) {
  std::ostringstream o;
  o << "<table><tr>";
  for (const auto& h : header) o << "<th>" << esc(h) << "</th>";
  o << "</tr>\n";
  for (const auto& r : rows) {
    o << "<tr>";
    for (const auto& c : r) o << "<td>" << c << "</td>";
    o << "</tr>\n";
  }
  o << "</table>\n";
  return o.str();
}

std::string cell(const json& v, double scale = 1) {
  if (v.is_number()) return num(v.get<double>() * scale, 4);
  if (v.is_boolean()) return v.get<bool>() ? "yes" : "NO";
  if (v.is_string()) return esc(v.get<std::string>());
  return "–";
}

// Which metrics.jsonl keys go in which plot of a stage.
bool is_loss_key(const std::string& k) {
  return (k.rfind("train_", 0) == 0 || k.rfind("val_", 0) == 0) &&
         (k.find("loss") != std::string::npos || k.find("kl") != std::string::npos);
}
bool is_rate_key(const std::string& k) {
  return k.find("top1") != std::string::npos || k.find("agreement") != std::string::npos ||
         k.find("flops_ratio") != std::string::npos || k.find("mask_area") != std::string::npos;
}

void write_atomic(const std::string& path, const std::string& text) { write_file_atomic(path, text); }

}  // namespace

std::string write_run_report_html(const std::string& run_dir) {
  const fs::path dir(run_dir);
  json report = json::object(), summary = json::object();
  if (fs::exists(dir / "report.json")) report = json::parse(read_text_file((dir / "report.json").string()));
  if (fs::exists(dir / "summary.json")) summary = json::parse(read_text_file((dir / "summary.json").string()));
  std::ostringstream o;
  const std::string title = "isp report: " + dir.filename().string();
  o << page_head(title) << "<h1>" << esc(title) << "</h1>\n<p>" << esc(report.value("recipe", std::string())) << "</p>\n";
  if (!report.empty()) {
    o << "<h2>Before and after pruning</h2>\n";
    o << table({"baseline top-1 %", "pruned top-1 %", "finetuned top-1 %", "FLOPs ratio", "budget met", "params ↓ %",
                "mask IoU", "centre shift px"},
               {{cell(report.value("baseline_top1", json()), 100), cell(report.value("pruned_top1", json()), 100),
                 cell(report.value("finetuned_top1", json()), 100), cell(report.value("flops_ratio", json())),
                 cell(report.value("budget_met", json())), cell(report.value("params_reduction", json()), 100),
                 cell(report.value("saliency", json::object()).value("mask_iou_at_0.5", json())),
                 cell(report.value("saliency", json::object()).value("mean_center_shift_px", json()))}});
    const json sal = report.value("saliency", json::object());
    if (sal.contains("original") && sal.contains("pruned")) {
      std::vector<std::vector<std::string>> rows;
      for (const char* w : {"original", "pruned"}) {
        const json& m = sal[w];
        rows.push_back({w, cell(m.value("deletion_auc", json())),
                        cell(m.value("centred_gaussian", json::object()).value("deletion_auc", json())),
                        cell(m.value("insertion_auc", json())), cell(m.value("mass_on_object", json())),
                        cell(m.value("foreground_share", json())), cell(m.value("centre_std_row_px", json())),
                        cell(m.value("centre_std_col_px", json()))});
      }
      o << "<h2>How well the maps explain</h2>\n"
        << table({"network", "deletion AUC", "centred Gaussian's", "insertion AUC", "mass on object", "foreground share",
                  "centre spread row px", "col px"}, rows);
    }
  }
  // Training curves per stage.
  std::map<std::string, std::vector<json>> by_stage;
  std::vector<std::string> order;
  if (fs::exists(dir / "metrics.jsonl")) {
    std::ifstream in(dir / "metrics.jsonl");
    for (std::string line; std::getline(in, line);) {
      const json j = json::parse(line, nullptr, false);
      if (j.is_discarded() || !j.contains("stage") || !j.contains("epoch")) continue;
      const std::string s = j["stage"].get<std::string>();
      if (!by_stage.count(s)) order.push_back(s);
      by_stage[s].push_back(j);
    }
  }
  o << "<h2>Training curves</h2>\n<div class=\"plots\">\n";
  for (const auto& stage : order) {
    for (int kind = 0; kind < 2; ++kind) {
      std::map<std::string, Series> series;
      for (const auto& j : by_stage[stage])
        for (auto it = j.begin(); it != j.end(); ++it)
          if (it.value().is_number() && (kind == 0 ? is_loss_key(it.key()) : is_rate_key(it.key()))) {
            auto& s = series[it.key()];
            s.name = it.key();
            s.xy.push_back({j["epoch"].get<double>(), it.value().get<double>()});
          }
      if (series.empty()) continue;
      Plot p(stage + (kind == 0 ? ": losses" : ": accuracy, agreement, FLOPs ratio"), "epoch", kind == 0 ? "loss" : "value");
      for (auto& [k, s] : series) p.add(s);
      o << p.svg(true);
    }
  }
  o << "</div>\n";
  if (report.contains("kept_widths") && report.contains("full_widths"))
    o << "<h2>Kept widths</h2>\n" << width_bars(report["kept_widths"], report["full_widths"]);
  const std::string sal_png = image_tag(dir / "explain" / "saliency.png",
                                        "Original network (isp explain): input | P | input·P | s ~ P | input·s");
  const std::string pruned_png = image_tag(dir / "explain_pruned" / "saliency.png",
                                           "Pruned network, same AEM (isp explain --network pruned)");
  const std::string curves_png = image_tag(dir / "explain" / "curves.png", "Deletion and insertion curves (original)");
  if (!sal_png.empty() || !curves_png.empty())
    o << "<h2>Saliency: original vs pruned</h2>\n<div class=\"plots\">" << sal_png << pruned_png << "</div>\n" << curves_png;
  else o << "<p>No saliency figure yet: <code>isp explain --run " << esc(run_dir) << " --out " << esc(run_dir)
         << "/explain</code> (and <code>--network pruned --out " << esc(run_dir) << "/explain_pruned</code>) draw them, "
         << "then <code>isp report " << esc(run_dir) << "</code> adds them here.</p>\n";
  if (summary.contains("stages")) {
    std::vector<std::vector<std::string>> rows;
    for (const auto& [name, st] : summary["stages"].items())
      rows.push_back({esc(name), cell(st.value("wall_seconds", json())), esc(st.value("reused_from", std::string()))});
    o << "<h2>Stages</h2>\n" << table({"stage", "wall s", "reused from"}, rows);
  }
  o << "</body></html>\n";
  const std::string path = (dir / "report.html").string();
  write_atomic(path, o.str());
  return path;
}

std::string write_sweep_report_html(const std::string& sweep_dir) {
  const fs::path dir(sweep_dir);
  const json sw = json::parse(read_text_file((dir / "sweep.json").string()));
  std::ostringstream o;
  const std::string title = "isp sweep: " + dir.filename().string();
  o << page_head(title) << "<h1>" << esc(title) << "</h1>\n<p>"
    << esc(sw.value("sweep", json::object()).value("description", std::string())) << "</p>\n";
  std::vector<std::string> metric_names, axis_names;
  for (const auto& p : sw["points"]) {
    const json axes = p.value("axes", json::object()), metrics = p.value("metrics", json::object());  // lvalues for items()
    for (const auto& [k, v] : axes.items())
      if (std::find(axis_names.begin(), axis_names.end(), k) == axis_names.end()) axis_names.push_back(k);
    for (const auto& [k, v] : metrics.items())
      if (std::find(metric_names.begin(), metric_names.end(), k) == metric_names.end()) metric_names.push_back(k);
  }
  if (sw.contains("columns")) metric_names = sw["columns"].get<std::vector<std::string>>();
  std::vector<std::string> header = {"run"};
  header.insert(header.end(), axis_names.begin(), axis_names.end());
  header.push_back("status");
  header.insert(header.end(), metric_names.begin(), metric_names.end());
  std::vector<std::vector<std::string>> rows;
  Series pts;
  std::vector<std::string> names;
  for (const auto& p : sw["points"]) {
    const std::string run = p["run"].get<std::string>();
    const bool has_html = fs::exists(dir / run / "report.html");
    std::vector<std::string> r = {has_html ? "<a href=\"" + esc(run) + "/report.html\">" + esc(run) + "</a>" : esc(run)};
    const json labels = p.value("labels", json::object());
    for (const auto& a : axis_names) r.push_back(cell(labels.value(a, json())));
    r.push_back(esc(p.value("status", std::string())));
    const json m = p.value("metrics", json::object());
    // sweep.json keeps fractions; columns named "... %" show percentages, as sweep.md does.
    for (const auto& k : metric_names) r.push_back(cell(m.value(k, json()), k.find('%') != std::string::npos ? 100 : 1));
    rows.push_back(r);
    const json acc = m.value("finetuned top-1 %", json()), flops = m.value("FLOPs ratio", json());
    if (acc.is_number() && flops.is_number()) {
      pts.xy.push_back({flops.get<double>(), 100 * acc.get<double>()});
      std::string name;  // the point's axis labels, shorter than its folder name
      for (const auto& a : axis_names) name += (name.empty() ? "" : ", ") + labels.value(a, std::string());
      names.push_back(name.empty() ? run : name);
    }
  }
  o << "<h2>Points</h2>\n" << table(header, rows);
  if (!pts.xy.empty()) {
    // Pareto front: no other point has fewer FLOPs and at least the accuracy.
    std::vector<std::pair<double, double>> sorted = pts.xy, front;
    std::sort(sorted.begin(), sorted.end(), [](auto a, auto b) { return a.first < b.first || (a.first == b.first && a.second > b.second); });
    double best = -std::numeric_limits<double>::infinity();
    for (const auto& q : sorted)
      if (q.second > best) front.push_back(q), best = q.second;
    Plot p("Accuracy vs FLOPs (dashed: Pareto front)", "FLOPs ratio (pruned / original)", "finetuned top-1 %");
    for (std::size_t i = 0; i < pts.xy.size(); ++i) p.add(Series{names[i], {pts.xy[i]}});
    p.front(front);
    o << "<h2>Accuracy vs FLOPs</h2>\n" << p.svg(false);
  }
  o << "</body></html>\n";
  const std::string path = (dir / "report.html").string();
  write_atomic(path, o.str());
  return path;
}

}  // namespace isp
