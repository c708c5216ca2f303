// Recipe engine: _base_ merge rules, _delete_, list replacement, --set, ${VAR}, $ref checks, error locations.
#include <sys/resource.h>
#include <unistd.h>

#include <csignal>

#include <cstdlib>
#include <filesystem>
#include <fstream>

#include "isp/registry/recipe.h"
#include "temp_dirs.h"
#undef CHECK
#include <doctest/doctest.h>

namespace fs = std::filesystem;
using isp::json;

namespace {
// One scratch folder per test process (ctest runs each case in its own process), removed when it ends.
fs::path scratch() {
  static const fs::path dir = [] {
    fs::path d = isp_test::temp_dir("recipe");
    fs::create_directories(d / "_base_");
    return d;
  }();
  return dir;
}
void write(const fs::path& p, const json& j) {
  fs::create_directories(p.parent_path());
  std::ofstream(p) << j.dump(2);
}
std::string error_of(const std::function<void()>& f) {
  try {
    f();
  } catch (const std::exception& e) {
    return e.what();
  }
  return "";
}
}  // namespace

TEST_CASE("bases merge in order, child wins, objects merge recursively, lists are replaced whole") {
  auto d = scratch();
  write(d / "_base_/a.json", {{"nodes", {{"backbone", {{"type", "ResNetCifar"}, {"depth", 56}, {"widths", {1, 2, 3}}}}}},
                              {"seed", 1}});
  write(d / "_base_/b.json", {{"nodes", {{"backbone", {{"num_classes", 10}}}}}, {"seed", 2}});
  write(d / "child.json", {{"_base_", {"_base_/a.json", "_base_/b.json"}},
                           {"nodes", {{"backbone", {{"depth", 20}, {"widths", {7}}}}}}});
  isp::Recipe r = isp::load_recipe((d / "child.json").string());
  const json& bb = r.doc["nodes"]["backbone"];
  CHECK(bb["type"] == "ResNetCifar");
  CHECK(bb["depth"] == 20);             // child wins
  CHECK(bb["num_classes"] == 10);       // from the second base
  CHECK(bb["widths"] == json({7}));     // list replaced, not merged
  CHECK(r.doc["seed"] == 2);            // later base wins over earlier
  CHECK(!r.doc.contains("_base_"));
  // Origins name the file that set each value.
  CHECK(r.where("/nodes/backbone/depth").file.find("child.json") != std::string::npos);
  CHECK(r.where("/nodes/backbone/num_classes").file.find("b.json") != std::string::npos);
  CHECK(r.where("/nodes/backbone/type").file.find("a.json") != std::string::npos);
}

TEST_CASE("_delete_ replaces the base object") {
  auto d = scratch();
  write(d / "_base_/del.json", {{"nodes", {{"head", {{"type", "RbfMaskHead"}, {"num_kernels", 16}}}}}});
  write(d / "del_child.json", {{"_base_", "_base_/del.json"},
                               {"nodes", {{"head", {{"_delete_", true}, {"type", "ConvMaskHead"}}}}}});
  isp::Recipe r = isp::load_recipe((d / "del_child.json").string());
  CHECK(r.doc["nodes"]["head"] == json({{"type", "ConvMaskHead"}}));
}

TEST_CASE("--set overrides with dotted paths and list indices, values parsed as JSON") {
  auto d = scratch();
  write(d / "set.json", {{"nodes", {{"b", {{"type", "X"}, {"depth", 56}}}}}, {"stages", {{{"type", "S"}, {"epochs", 3}}}}});
  isp::Recipe r = isp::load_recipe((d / "set.json").string(),
                                   {"nodes.b.depth=20", "stages.0.epochs=1", "nodes.b.tag=hello", "nodes.b.list=[1,2]"});
  CHECK(r.doc["nodes"]["b"]["depth"] == 20);
  CHECK(r.doc["stages"][0]["epochs"] == 1);
  CHECK(r.doc["nodes"]["b"]["tag"] == "hello");
  CHECK(r.doc["nodes"]["b"]["list"] == json({1, 2}));
  CHECK(r.where("/nodes/b/depth").file == "--set nodes.b.depth=20");
  CHECK(error_of([&] { isp::load_recipe((d / "set.json").string(), {"stages.5.epochs=1"}); }).find("not a valid index") != std::string::npos);
  CHECK(error_of([&] { isp::load_recipe((d / "set.json").string(), {"nodes.b.depth.x=1"}); }).find("cannot set key") != std::string::npos);
  CHECK(error_of([&] { isp::load_recipe((d / "set.json").string(), {"novalue"}); }).find("KEY.PATH=VALUE") != std::string::npos);
  // Found by bench/fuzz.sh: bytes that are not UTF-8 in a --set value (kept as a bare string) or key used to
  // escape as nlohmann's type_error at the next dump(); now a clear error at the source.
  CHECK(error_of([&] { isp::load_recipe((d / "set.json").string(), {"nodes.b.tag=\xa5\xa2"}); })
            .find("--set argument: not valid UTF-8") != std::string::npos);
  CHECK(error_of([&] { isp::load_recipe((d / "set.json").string(), {"nodes.\xff.tag=1"}); })
            .find("not valid UTF-8") != std::string::npos);
  write(d / "env.json", {{"nodes", {{"b", {{"type", "${ISP_TEST_BAD_BYTES}"}}}}}, {"stages", json::array()}});
  ::setenv("ISP_TEST_BAD_BYTES", "\xc3\x28", 1);
  CHECK(error_of([&] { isp::load_recipe((d / "env.json").string()); }).find("environment variable ISP_TEST_BAD_BYTES: not valid UTF-8") !=
        std::string::npos);
  ::unsetenv("ISP_TEST_BAD_BYTES");
}

TEST_CASE("${VAR} expansion from the environment, recipe vars and defaults") {
  auto d = scratch();
  ::setenv("ISP_TEST_ROOT", "/data/x", 1);
  write(d / "vars.json", {{"vars", {{"depth_name", "d56"}}},
                          {"nodes", {{"a", {{"type", "T"}, {"root", "${ISP_TEST_ROOT}/f"}, {"tag", "${depth_name}"},
                                            {"o", "${ISP_UNSET_VAR_XYZ:-fallback}"}}}}}});
  isp::Recipe r = isp::load_recipe((d / "vars.json").string());
  CHECK(r.doc["nodes"]["a"]["root"] == "/data/x/f");
  CHECK(r.doc["nodes"]["a"]["tag"] == "d56");
  CHECK(r.doc["nodes"]["a"]["o"] == "fallback");
  write(d / "badvar.json", {{"nodes", {{"a", {{"type", "T"}, {"root", "${ISP_UNSET_VAR_XYZ}"}}}}}});
  std::string e = error_of([&] { isp::load_recipe((d / "badvar.json").string()); });
  CHECK(e.find("badvar.json: /nodes/a/root") != std::string::npos);
  CHECK(e.find("ISP_UNSET_VAR_XYZ") != std::string::npos);
}

TEST_CASE("$ref: dangling references and cycles are errors with the JSON path") {
  auto d = scratch();
  write(d / "dangling.json", {{"nodes", {{"backbone", {{"type", "X"}}}}},
                              {"stages", {{{"type", "S"}, {"model", {{"$ref", "backbon"}}}}}}});
  std::string e = error_of([&] { isp::load_recipe((d / "dangling.json").string()); });
  CHECK(e.find("dangling.json: /stages/0/model/$ref") != std::string::npos);
  CHECK(e.find("did you mean 'backbone'") != std::string::npos);
  write(d / "cycle.json", {{"nodes", {{"a", {{"type", "X"}, {"in", {{"$ref", "b"}}}}}, {"b", {{"type", "X"}, {"in", {{"$ref", "a"}}}}}}}});
  e = error_of([&] { isp::load_recipe((d / "cycle.json").string()); });
  CHECK(e.find("reference cycle") != std::string::npos);
  CHECK(e.find("cycle.json: /nodes/") != std::string::npos);
  write(d / "ok.json", {{"nodes", {{"a", {{"type", "X"}}}, {"b", {{"type", "X"}, {"in", {{"$ref", "a"}}}}}}}});
  CHECK_NOTHROW(isp::load_recipe((d / "ok.json").string()));
}

TEST_CASE("bad files: missing base, invalid JSON, base cycles") {
  auto d = scratch();
  write(d / "nobase.json", {{"_base_", {"_base_/missing.json"}}});
  std::string e = error_of([&] { isp::load_recipe((d / "nobase.json").string()); });
  CHECK(e.find("nobase.json: /_base_/0") != std::string::npos);
  CHECK(e.find("not found") != std::string::npos);
  // Found by bench/fuzz.sh: a number beyond double escaped as nlohmann's out_of_range.
  std::ofstream(d / "huge.json") << R"({"nodes": {"a": {"type": "X", "lr": 1e99999}}})";
  e = error_of([&] { isp::load_recipe((d / "huge.json").string()); });
  CHECK(e.find("huge.json: /: invalid JSON") != std::string::npos);
  CHECK(e.find("number overflow") != std::string::npos);
  std::ofstream(d / "small.json") << R"({"nodes": {"a": {"type": "X", "lr": 0.1}}})";
  e = error_of([&] { isp::load_recipe((d / "small.json").string(), {"nodes.a.lr=-2e400"}); });
  CHECK(e.find("--set nodes.a.lr=-2e400: /: invalid JSON") != std::string::npos);
  CHECK(e.find("number overflow") != std::string::npos);
  // Found by bench/fuzz.sh: a base path the OS rejects (name too long) escaped as std::filesystem_error.
  write(d / "longbase.json", {{"_base_", std::string(5000, 'x') + ".json"}});
  e = error_of([&] { isp::load_recipe((d / "longbase.json").string()); });
  CHECK(e.find("longbase.json: /_base_: base recipe not found (File name too long)") != std::string::npos);
  e = error_of([&] { isp::load_recipe((d / (std::string(5000, 'y') + ".json")).string()); });
  CHECK(e.find("recipe file not found (File name too long)") != std::string::npos);
  std::ofstream(d / "broken.json") << "{ \"nodes\": ";
  e = error_of([&] { isp::load_recipe((d / "broken.json").string()); });
  CHECK(e.find("broken.json") != std::string::npos);
  CHECK(e.find("invalid JSON") != std::string::npos);
  write(d / "loop_a.json", {{"_base_", "loop_b.json"}});
  write(d / "loop_b.json", {{"_base_", "loop_a.json"}});
  e = error_of([&] { isp::load_recipe((d / "loop_a.json").string()); });
  CHECK(e.find("cycle") != std::string::npos);
}

TEST_CASE("atomic file writes leave no temporary files and replace the old content") {
  auto d = scratch();
  std::string p = (d / "atomic.txt").string();
  isp::write_file_atomic(p, "one");
  isp::write_file_atomic(p, "two");
  CHECK(isp::read_text_file(p) == "two");
  int files = 0;
  for (auto& e : fs::directory_iterator(d)) files += e.path().filename().string().rfind("atomic.txt", 0) == 0;
  CHECK(files == 1);
}

TEST_CASE("input decides no recursion depth: deep nesting, long _base_ chains and long $ref chains are bounded") {
  auto d = scratch();
  // 100 000 nested arrays once crashed `isp validate` with SIGSEGV.
  std::ofstream(d / "deep.json") << "{\"nodes\": {\"x\": " << std::string(100000, '[') << std::string(100000, ']') << "}}";
  std::string e = error_of([&] { isp::load_recipe((d / "deep.json").string()); });
  CHECK(e.find("deep.json: /: nested deeper than " + std::to_string(isp::kMaxRecipeNesting)) != std::string::npos);
  // The same through --set.
  write(d / "flat.json", {{"nodes", json::object()}});
  e = error_of([&] { isp::load_recipe((d / "flat.json").string(), {"nodes.x=" + std::string(100, '[') + std::string(100, ']')}); });
  CHECK(e.find("nested deeper than") != std::string::npos);
  // Brackets inside strings do not count.
  write(d / "strings.json", {{"nodes", {{"a", {{"type", "X"}, {"doc", std::string(200, '[')}}}}}});
  CHECK_NOTHROW(isp::load_recipe((d / "strings.json").string()));
  // A _base_ chain longer than the limit.
  for (int i = 0; i <= isp::kMaxBaseChain + 2; ++i)
    write(d / ("chain" + std::to_string(i) + ".json"),
          i == isp::kMaxBaseChain + 2 ? json{{"nodes", json::object()}} : json{{"_base_", "chain" + std::to_string(i + 1) + ".json"}});
  e = error_of([&] { isp::load_recipe((d / "chain0.json").string()); });
  CHECK(e.find("_base_ chain longer than " + std::to_string(isp::kMaxBaseChain)) != std::string::npos);
  // A $ref chain of 100 000 nodes is checked without recursion (and a cycle at its end is still found).
  json nodes = json::object();
  const int n = 100000;
  for (int i = 0; i < n; ++i) nodes["n" + std::to_string(i)] = {{"type", "X"}, {"in", {{"$ref", "n" + std::to_string(i + 1)}}}};
  nodes["n" + std::to_string(n)] = {{"type", "X"}};
  write(d / "refs.json", {{"nodes", nodes}});
  CHECK_NOTHROW(isp::load_recipe((d / "refs.json").string()));
  nodes["n" + std::to_string(n)]["in"] = {{"$ref", "n0"}};
  write(d / "ref_cycle.json", {{"nodes", nodes}});
  e = error_of([&] { isp::load_recipe((d / "ref_cycle.json").string()); });
  CHECK(e.find("reference cycle") != std::string::npos);
}

TEST_CASE("a write that fails (file size limit, as on a full disk) is a clear error and keeps the previous file") {
  auto d = scratch() / "fsize";
  fs::create_directories(d);
  const std::string path = (d / "checkpoint.pt").string();
  isp::write_file_atomic(path, std::string(1000, 'a'));
  struct rlimit old {};
  REQUIRE(::getrlimit(RLIMIT_FSIZE, &old) == 0);
  auto previous_handler = std::signal(SIGXFSZ, SIG_IGN);  // EFBIG instead of the signal
  struct rlimit small = old;
  small.rlim_cur = 4096;
  REQUIRE(::setrlimit(RLIMIT_FSIZE, &small) == 0);
  const std::string e = error_of([&] { isp::write_file_atomic(path, std::string(100000, 'b')); });
  ::setrlimit(RLIMIT_FSIZE, &old);
  std::signal(SIGXFSZ, previous_handler);
  CHECK(e.find(path + ": write failed (File too large); the previous version of the file is unchanged") != std::string::npos);
  CHECK(isp::read_text_file(path) == std::string(1000, 'a'));
  int files = 0;
  for (const auto& entry : fs::directory_iterator(d)) files += entry.is_regular_file();
  CHECK(files == 1);  // no temporary file left behind
}
