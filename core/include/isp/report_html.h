#pragma once
// Self-contained HTML reports (no network, no script: inline SVG plots, PNGs embedded as data URIs), written
// by a small SVG module of isp's own (core/src/report_html.cpp) rather than a vendored plotting library: the
// plots are few and fixed (lines, bars, a scatter with its Pareto front), and files that open from disk years
// later need nothing but a browser.
#include <string>

#include "isp/registry/options.h"

namespace isp {

// <run_dir>/report.html: the run's report.json table, training curves per stage from metrics.jsonl (losses;
// accuracy, agreement and FLOPs ratios), kept widths per gated layer, and explain/saliency.png and curves.png
// where `isp explain` wrote them. Returns the path written.
ISP_API std::string write_run_report_html(const std::string& run_dir);
// <sweep_dir>/report.html from sweep.json: the table, accuracy vs FLOPs ratio over the points with the Pareto
// front, and links to each point's own report.html.
ISP_API std::string write_sweep_report_html(const std::string& sweep_dir);

}  // namespace isp
