#pragma once
// Scratch folders for tests, torch-free so that tests which avoid <torch/torch.h> (test_recipe.cpp) share them.
#include <unistd.h>

#include <cstdlib>
#include <filesystem>
#include <string>
#include <system_error>
#include <vector>

namespace isp_test {
// The folders temp_dir made, removed when the test process ends (ISP_KEEP_TEST_DIRS=1 keeps them for a look).
// Only by the process that made them: a forked child that exits must not delete its parent's files.
struct TempDirs {
  std::vector<std::filesystem::path> made;
  pid_t owner = ::getpid();
  ~TempDirs() {
    if (::getpid() != owner || std::getenv("ISP_KEEP_TEST_DIRS")) return;
    std::error_code ec;
    for (const auto& p : made) std::filesystem::remove_all(p, ec);
  }
};
// A fresh, empty folder <tmp>/isp_test_<tag>_<pid>.
inline std::filesystem::path temp_dir(const std::string& tag) {
  static TempDirs dirs;
  auto p = std::filesystem::temp_directory_path() / ("isp_test_" + tag + "_" + std::to_string(::getpid()));
  std::filesystem::remove_all(p);
  std::filesystem::create_directories(p);
  dirs.made.push_back(p);
  return p;
}
}  // namespace isp_test
