#pragma once
#include <string>
#include <vector>

// `isp compare RUN...`: one table over several runs' report.json (or summary.json for classifier-only runs).
int compare_runs(const std::vector<std::string>& runs, bool as_markdown);
