// libFuzzer target: recipe loading as `isp run`/`isp validate` do it -- JSON parsing, `_base_` merging (relative
// and isp:// bases), ${VAR} expansion, --set overrides, $ref checks and the nesting/chain limits.
// Input: the recipe text, then optional lines "\n--set <assignment>" after a line "#--set".
// Expected failures are isp::Error (a clear message); anything else escaping is a finding (abort), as are
// crashes, sanitizer reports and hangs (libFuzzer's -timeout).
#include <unistd.h>

#include <cstdint>
#include <cstdlib>
#include <cstdio>
#include <exception>
#include <filesystem>
#include <fstream>
#include <string>
#include <vector>

#include "isp/registry/error.h"
#include "isp/registry/recipe.h"

namespace {
std::string& work_dir() {
  static std::string dir = [] {
    std::string d = std::filesystem::temp_directory_path().string() + "/isp_fuzz_recipe_" + std::to_string(::getpid());
    std::filesystem::create_directories(d);
    // A base the fuzzer can find by name (the corpus uses "base.json"), and a chain of two.
    std::ofstream(d + "/base.json") << R"({"nodes": {"a": {"type": "X", "k": [1, 2, {"$ref": "b"}]}, "b": {"type": "Y"}}})";
    std::ofstream(d + "/base2.json") << R"({"_base_": "base.json", "vars": {"V": "3"}, "nodes": {"a": {"k": "${V}"}}})";
    return d;
  }();
  return dir;
}
}  // namespace

extern "C" int LLVMFuzzerTestOneInput(const uint8_t* data, size_t size) {
  std::string text(reinterpret_cast<const char*>(data), size);
  std::vector<std::string> sets;
  const std::string marker = "\n#--set";
  const std::size_t cut = text.find(marker);
  if (cut != std::string::npos) {
    std::string rest = text.substr(cut + marker.size());
    text.resize(cut);
    std::size_t pos = 0;
    while (pos < rest.size()) {
      std::size_t nl = rest.find('\n', pos);
      if (nl == std::string::npos) nl = rest.size();
      const std::string line = rest.substr(pos, nl - pos);
      if (line.rfind("--set ", 0) == 0) sets.push_back(line.substr(6));
      pos = nl + 1;
    }
  }
  const std::string path = work_dir() + "/input.json";
  {
    std::ofstream out(path, std::ios::binary | std::ios::trunc);
    out << text;
  }
  try {
    isp::Recipe r = isp::load_recipe(path, sets);
    (void)r.doc.dump();  // every string in the result must be valid to serialise (UTF-8)
  } catch (const isp::Error&) {
    // the expected way to reject an input
  } catch (const std::exception& e) {
    std::fprintf(stderr, "uncaught non-isp exception: %s\n", e.what());
    std::abort();
  }
  return 0;
}
