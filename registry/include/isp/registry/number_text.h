#pragma once
// A figure as fixed-point text, or "n/a" where it is undefined: a missing or null JSON value, an empty optional
// (the object figures of a dataset that defines no foreground). Every summary line and report table that prints
// such figures uses this one rule.
#include <cstdio>
#include <optional>
#include <string>

#include <nlohmann/json.hpp>

namespace isp {

inline std::string fixed_or_na(std::optional<double> v, int digits = 3, double scale = 1.0) {
  if (!v) return "n/a";
  char b[64];
  std::snprintf(b, sizeof b, "%.*f", digits, scale * *v);
  return b;
}

inline std::string fixed_or_na(const nlohmann::json& v, int digits = 3, double scale = 1.0) {
  return v.is_number() ? fixed_or_na(std::optional<double>(v.get<double>()), digits, scale) : std::string("n/a");
}

}  // namespace isp
