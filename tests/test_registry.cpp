// Registry and schema errors, and the plugin-loader contract proven with fixture libraries.
#include <dlfcn.h>
#include <unistd.h>

#include <cstddef>
#include <cstdlib>
#include <cstring>
#include <filesystem>
#include <fstream>

#include "isp/interfaces/stage.h"
#include "isp/registry/plugin.h"
#include "isp/registry/recipe.h"
#include "isp/registry/registry.h"
#undef CHECK
#include <doctest/doctest.h>

using isp::json;

namespace {
std::string fixture(const std::string& name) { return std::string(ISP_TEST_FIXTURE_DIR) + "/libisp_fixture_" + name + ".so"; }
isp::Where w(const std::string& p) { return {"configs/x.json", p}; }
std::string error_of(const std::function<void()>& f) {
  try {
    f();
  } catch (const std::exception& e) {
    return e.what();
  }
  return "";
}

struct DepthOptions {
  int64_t depth = 56;
  double lr = 0.1;
  std::string mode = "a";
  std::vector<int64_t> widths;
  int64_t needed = 0;
  template <class V> void visit(V& v) {
    v("depth", depth, "layers", isp::one_of({20, 32, 44, 56, 110}));
    v("lr", lr, "learning rate", isp::greater_than(0));
    v("mode", mode, "mode", isp::one_of({"a", "b"}));
    v("widths", widths, "widths", isp::at_least(1));
    v("needed", needed, "a required int", isp::required());
  }
};
}  // namespace

TEST_CASE("schema: generated from the options struct, strict validation with file and JSON path") {
  isp::Schema s = isp::schema_of<DepthOptions>();
  REQUIRE(s.args.size() == 5);
  CHECK(s.args[0].default_value == 56);
  CHECK(s.args[4].required);
  const json base = {{"needed", 1}};
  json ok = s.validate(base, w("/nodes/backbone"));
  CHECK(ok["depth"] == 56);
  CHECK(ok["mode"] == "a");
  auto e = error_of([&] { s.validate({{"needed", 1}, {"depth", 57}}, w("/nodes/backbone")); });
  CHECK(e == "configs/x.json: /nodes/backbone/depth: expected one of 20,32,44,56,110, got 57");
  e = error_of([&] { s.validate({{"needed", 1}, {"dpeth", 20}}, w("/nodes/backbone")); });
  CHECK(e.find("/nodes/backbone/dpeth: unknown argument 'dpeth'; did you mean 'depth'?") != std::string::npos);
  e = error_of([&] { s.validate({{"needed", 1}, {"lr", "fast"}}, w("/n")); });
  CHECK(e == "configs/x.json: /n/lr: expected float, got \"fast\"");
  e = error_of([&] { s.validate({{"needed", 1}, {"lr", 0}}, w("/n")); });
  CHECK(e.find("expected a value > 0") != std::string::npos);
  e = error_of([&] { s.validate({{"needed", 1}, {"widths", {4, 0}}}, w("/n")); });
  CHECK(e.find("/n/widths/1: expected a value >= 1") != std::string::npos);
  e = error_of([&] { s.validate(json::object(), w("/n")); });
  CHECK(e.find("/n/needed: missing required argument") != std::string::npos);
  e = error_of([&] { s.validate({{"needed", 1.5}}, w("/n")); });
  CHECK(e.find("expected int") != std::string::npos);
  auto opts = isp::read_options<DepthOptions>(s.validate({{"needed", 3}, {"depth", 20}, {"widths", {5, 6}}}, w("")), w(""));
  CHECK(opts.depth == 20);
  CHECK(opts.needed == 3);
  CHECK(opts.widths == std::vector<int64_t>{5, 6});
}

TEST_CASE("registry: duplicates, versions and unknown names with known names and closest match") {
  isp::Registry reg;
  isp::ComponentInfo a;
  a.kind = "backbone";
  a.name = "ResNetCifar";
  a.version = 1;
  reg.add(a);
  auto b = a;
  b.version = 2;
  reg.add(b);
  CHECK(reg.find("backbone", "ResNetCifar")->version == 2);  // highest version by default
  CHECK(reg.find("backbone", "ResNetCifar", 1)->version == 1);
  CHECK_THROWS_AS(reg.add(a), isp::DuplicateComponent);
  auto e = error_of([&] { reg.get("backbone", "ResNetCifr", std::nullopt, w("/nodes/backbone/type")); });
  CHECK(e.find("'ResNetCifr' is not a registered backbone") != std::string::npos);
  CHECK(e.find("Known: ResNetCifar") != std::string::npos);
  CHECK(e.find("Did you mean 'ResNetCifar'?") != std::string::npos);
  CHECK(e.find("Plugin folders scanned:") != std::string::npos);
  CHECK(e.find("Failed loads:") != std::string::npos);
}

TEST_CASE("plugins: a good plugin registers, a second load of the same file is a no-op") {
  isp::Registry reg;
  reg.load_library(fixture("ok"));
  CHECK(reg.find("stage", "FixtureStage") != nullptr);
  CHECK_NOTHROW(reg.load_library(fixture("ok")));
  CHECK(reg.list("stage").size() == 1);
  CHECK(reg.find("stage", "FixtureStage")->origin().find("libisp_fixture_ok.so") != std::string::npos);
}

TEST_CASE("plugins: wrong plugin ABI or LibTorch version is refused before any plugin code runs") {
  ::unsetenv("ISP_FIXTURE_BAD_RAN");
  isp::Registry reg;
  auto e = error_of([&] { reg.load_library(fixture("bad_abi")); });
  CHECK(e.find("refused") != std::string::npos);
  // The bad_abi fixture claims the host's ABI + 998 (tests/fixtures/fixture_plugin.cpp).
  CHECK(e.find("built for ISP plugin ABI " + std::to_string(ISP_PLUGIN_ABI_VERSION + 998) + ",") != std::string::npos);
  CHECK(e.find("host is ISP plugin ABI " + std::to_string(ISP_PLUGIN_ABI_VERSION)) != std::string::npos);
  e = error_of([&] { reg.load_library(fixture("bad_torch")); });
  CHECK(e.find("LibTorch " + std::to_string(TORCH_VERSION_MAJOR) + "." + std::to_string(TORCH_VERSION_MINOR + 7)) != std::string::npos);
  CHECK(e.find("host is") != std::string::npos);
  CHECK(std::getenv("ISP_FIXTURE_BAD_RAN") == nullptr);  // its registration never ran
  CHECK(reg.find("stage", "FixtureBad") == nullptr);
}

TEST_CASE("plugins: a plugin built for the other CUDA setting (CPU-only vs CUDA LibTorch) is refused") {
  ::unsetenv("ISP_FIXTURE_BAD_RAN");
  isp::Registry reg;
  const std::string e = error_of([&] { reg.load_library(fixture("other_cuda")); });
  CHECK(e.find("refused") != std::string::npos);
  const std::string plugin_cuda = ISP_DESCRIPTOR_CUDA ? "CUDA off" : "CUDA on";
  const std::string host_cuda = ISP_DESCRIPTOR_CUDA ? "CUDA on" : "CUDA off";
  CHECK(e.find(plugin_cuda) < e.find("host is"));
  CHECK(e.find(host_cuda, e.find("host is")) != std::string::npos);
  CHECK(std::getenv("ISP_FIXTURE_BAD_RAN") == nullptr);
  CHECK(reg.find("stage", "FixtureBad") == nullptr);
}

TEST_CASE("plugins: a throwing registration leaves no entries behind") {
  isp::Registry reg;
  auto e = error_of([&] { reg.load_library(fixture("throwing")); });
  CHECK(e.find("fixture registration failure") != std::string::npos);
  CHECK(reg.find("stage", "FixtureThrowA") == nullptr);
  CHECK(reg.list().empty());
}

TEST_CASE("plugins: the same key from two different files is an error naming both") {
  isp::Registry reg;
  reg.load_library(fixture("dup_a"));
  auto e = error_of([&] { reg.load_library(fixture("dup_b")); });
  CHECK(e.find("duplicate component stage 'isp::FixtureDuplicate' v1") != std::string::npos);
  CHECK(e.find("libisp_fixture_dup_a.so") != std::string::npos);
  CHECK(e.find("libisp_fixture_dup_b.so") != std::string::npos);
  CHECK(reg.list().size() == 1);
}

TEST_CASE("plugins: scanning a folder records failed loads and shows them in unknown-name errors") {
  isp::Registry reg;
  reg.scan_directory(ISP_TEST_FIXTURE_DIR);
  CHECK(reg.find("stage", "FixtureStage") != nullptr);
  bool saw_abi = false;
  for (const auto& f : reg.load_failures()) saw_abi = saw_abi || f.find("bad_abi") != std::string::npos;
  CHECK(saw_abi);
  auto e = error_of([&] { reg.get("stage", "Nope", std::nullopt, w("/stages/0/type")); });
  CHECK(e.find("bad_abi") != std::string::npos);
  CHECK(e.find(ISP_TEST_FIXTURE_DIR) != std::string::npos);
}

TEST_CASE("plugins: a library stays loaded while an object it created is alive") {
  std::shared_ptr<isp::Stage> stage;
  const std::string path = fixture("ok");
  {
    isp::Registry reg;
    reg.load_library(path);
    json recipe = {{"nodes", {{"s", {{"type", "FixtureStage"}, {"marker", "ISP_FIXTURE_LIFETIME"}}}}}};
    isp::BuildContext ctx(reg, recipe, [](const std::string& p) { return isp::Where{"mem.json", p}; });
    stage = ctx.node<isp::Stage>("s");
  }  // registry and context gone: only `stage` keeps the library
  void* h = ::dlopen(path.c_str(), RTLD_LAZY | RTLD_NOLOAD);
  CHECK(h != nullptr);
  if (h) ::dlclose(h);
  ::unsetenv("ISP_FIXTURE_LIFETIME");
  isp::RunContext rc;
  stage->run(rc);  // a virtual call into the plugin's code
  CHECK(std::getenv("ISP_FIXTURE_LIFETIME") != nullptr);
}

TEST_CASE("build context: kinds are checked at references, schema errors carry the recipe path") {
  isp::Registry reg;
  reg.load_library(fixture("ok"));
  json recipe = {{"nodes", {{"s", {{"type", "FixtureStage"}, {"markr", "x"}}}}}};
  isp::BuildContext ctx(reg, recipe, [](const std::string& p) { return isp::Where{"r.json", p}; });
  auto e = error_of([&] { ctx.node<isp::Stage>("s"); });
  CHECK(e.find("r.json: /nodes/s/markr: unknown argument 'markr'; did you mean 'marker'?") != std::string::npos);
  json recipe2 = {{"nodes", {{"s", {{"type", "FixtureStage"}}}}}};
  isp::BuildContext ctx2(reg, recipe2, [](const std::string& p) { return isp::Where{"r.json", p}; });
  e = error_of([&] { ctx2.build_node("s", "backbone"); });
  CHECK(e.find("is not a registered backbone") != std::string::npos);
  auto s1 = ctx2.node<isp::Stage>("s");
  auto s2 = ctx2.node<isp::Stage>("s");
  CHECK(s1.get() == s2.get());  // nodes are built once and shared
  CHECK(ctx2.resolved_nodes().at("s")["marker"] == "ISP_FIXTURE_RAN");
}

TEST_CASE("registry: type names parse as [scope::]Name[@version] and malformed ones name the recipe path") {
  auto t = isp::TypeName::parse("mylab::RbfMaskHead@2");
  CHECK(t.scope == "mylab");
  CHECK(t.name == "RbfMaskHead");
  CHECK(t.version == 2);
  CHECK(isp::TypeName::parse("RbfMaskHead").scope.empty());
  CHECK(!isp::TypeName::parse("RbfMaskHead").version);
  for (const char* bad : {"RbfMaskHead@", "RbfMaskHead@x", "RbfMaskHead@0", "::RbfMaskHead", "a::", "a::b::C", "my-lab::X"}) {
    auto e = error_of([&] { isp::TypeName::parse(bad, w("/nodes/head/type")); });
    CHECK_MESSAGE(e.find("configs/x.json: /nodes/head/type: '" + std::string(bad) + "'") != std::string::npos, bad, ": ", e);
  }
}

TEST_CASE("registry: one name from two libraries is ambiguous unless a scope or a version picks one") {
  isp::Registry reg;
  reg.load_library(fixture("scoped_a"));  // lab_a::FixtureShared v1
  reg.load_library(fixture("scoped_b"));  // lab_b::FixtureShared v2
  auto e = error_of([&] { reg.get("stage", "FixtureShared", std::nullopt, w("/stages/0/type")); });
  CHECK(e.find("configs/x.json: /stages/0/type: 'FixtureShared' is offered by several libraries") != std::string::npos);
  CHECK(e.find("lab_a::FixtureShared@1") != std::string::npos);
  CHECK(e.find("lab_b::FixtureShared@2") != std::string::npos);
  CHECK(reg.find("stage", "lab_a::FixtureShared")->scope == "lab_a");
  CHECK(reg.find("stage", "FixtureShared@2")->scope == "lab_b");
  CHECK(reg.find("stage", "FixtureShared", 1)->scope == "lab_a");
  CHECK(reg.find("stage", "lab_a::FixtureShared@2") == nullptr);
  // In a recipe: the scope or the pin selects the component, and the record names what was built.
  json recipe = {{"nodes", {{"a", {{"type", "lab_a::FixtureShared"}}}, {"b", {{"type", "FixtureShared@2"}}},
                            {"c", {{"type", "FixtureShared"}}}}}};
  isp::BuildContext ctx(reg, recipe, [](const std::string& p) { return isp::Where{"r.json", p}; });
  auto a = ctx.node<isp::Stage>("a");
  CHECK(ctx.record_of(a.get())->type == "lab_a::FixtureShared");
  ctx.node<isp::Stage>("b");
  CHECK(ctx.records().at("/nodes/b").type == "lab_b::FixtureShared");
  CHECK(ctx.records().at("/nodes/b").version == 2);
  CHECK(ctx.records().at("/nodes/b").library.find("libisp_fixture_scoped_b.so") != std::string::npos);
  CHECK(ctx.records().at("/nodes/b").library_hash.size() == 16);
  e = error_of([&] { ctx.node<isp::Stage>("c"); });
  CHECK(e.find("r.json: /nodes/c/type: 'FixtureShared' is offered by several libraries") != std::string::npos);
}

TEST_CASE("registry: a frozen registry refuses new components and new libraries") {
  isp::Registry reg;
  reg.load_library(fixture("ok"));
  reg.freeze();
  CHECK_NOTHROW(reg.load_library(fixture("ok")));  // already loaded: still a no-op
  CHECK_THROWS_AS(reg.load_library(fixture("dup_a")), isp::RegistryFrozen);
  isp::ComponentInfo c;
  c.kind = "stage";
  c.name = "Late";
  CHECK_THROWS_AS(reg.add(c), isp::RegistryFrozen);
  CHECK(reg.find("stage", "FixtureDuplicate") == nullptr);
}

// Where a bad value came from: the file (or --set) that last wrote it, never the file that created its parent.
TEST_CASE("recipe errors name the file or --set that wrote the offending value") {
  namespace fs = std::filesystem;
  const fs::path dir = fs::temp_directory_path() / ("isp_test_where_" + std::to_string(::getpid()));
  fs::create_directories(dir);
  auto write = [&](const std::string& name, const json& j) { std::ofstream(dir / name) << j.dump(2); };
  write("base.json", {{"nodes", {{"backbone", {{"type", "ResNetCifar"}, {"depth", 20}, {"num_classes", 4}}}}}});
  isp::Registry reg;
  reg.load_library(ISP_TEST_PLUGIN_DIR "/libisp_backbones_resnet_cifar.so");
  auto culprit = [&](const std::string& file, const std::vector<std::string>& sets = {}) {
    isp::Recipe r = isp::load_recipe((dir / file).string(), sets);
    isp::BuildContext ctx(reg, r.doc, [&r](const std::string& p) { return r.where(p); });
    try {
      ctx.build_node("backbone", "backbone");
    } catch (const isp::RecipeError& e) {
      CHECK(e.where().pointer == "/nodes/backbone/depth");
      return e.where().file;
    }
    return std::string("no error");
  };
  // In a child over a base that created the object.
  write("child.json", {{"_base_", "base.json"}, {"nodes", {{"backbone", {{"depth", 57}}}}}});
  CHECK(culprit("child.json") == (dir / "child.json").string());
  // In the base itself (the child changes another key).
  write("base_bad.json", {{"nodes", {{"backbone", {{"type", "ResNetCifar"}, {"depth", 58}}}}}});
  write("child_ok.json", {{"_base_", "base_bad.json"}, {"nodes", {{"backbone", {{"num_classes", 4}}}}}});
  CHECK(culprit("child_ok.json") == (dir / "base_bad.json").string());
  // By --set, over a child that set it too.
  CHECK(culprit("child.json", {"nodes.backbone.depth=59"}) == "--set nodes.backbone.depth=59");
  // By ${VAR}: the file that holds the reference.
  ::setenv("ISP_TEST_DEPTH", "61", 1);
  write("var.json", {{"_base_", "base.json"}, {"nodes", {{"backbone", {{"depth", "${ISP_TEST_DEPTH}"}}}}}});
  const std::string var_file = culprit("var.json");
  CHECK(var_file == (dir / "var.json").string());
  // Inside an object that replaces the base's with _delete_.
  write("del.json", {{"_base_", "base.json"},
                     {"nodes", {{"backbone", {{"_delete_", true}, {"type", "ResNetCifar"}, {"depth", 62}}}}}});
  CHECK(culprit("del.json") == (dir / "del.json").string());
  // A value the component rejects itself, not its schema (isp::OptionError): at the option's own path, in the file
  // that set it, not at the node, whose object the base created.
  write("size.json", {{"_base_", "base.json"}, {"nodes", {{"backbone", {{"input_size", 30}}}}}});
  {
    isp::Recipe r = isp::load_recipe((dir / "size.json").string());
    isp::BuildContext ctx(reg, r.doc, [&r](const std::string& p) { return r.where(p); });
    std::string what;
    try {
      ctx.build_node("backbone", "backbone");
    } catch (const isp::RecipeError& e) {
      what = e.what();
      CHECK(e.where().pointer == "/nodes/backbone/input_size");
      CHECK(e.where().file == (dir / "size.json").string());
    }
    CHECK_MESSAGE(what.find("input_size must be a multiple of 4") != std::string::npos, what);
  }
  fs::remove_all(dir);
}

namespace {
struct Picky {
  static constexpr const char* kKind = "picky";
};
struct PickyOptions {
  std::vector<int64_t> widths;
  template <class V> void visit(V& v) { v("widths", widths, "widths", isp::at_least(1)); }
};
}  // namespace

TEST_CASE("build context: an OptionError with a key path is reported at that element, in the file that set it") {
  namespace fs = std::filesystem;
  const fs::path dir = fs::temp_directory_path() / ("isp_test_option_error_" + std::to_string(::getpid()));
  fs::create_directories(dir);
  auto write = [&](const std::string& name, const json& j) { std::ofstream(dir / name) << j.dump(2); };
  isp::Registry reg;
  reg.add(isp::make_component<Picky, PickyOptions>("Picky", 1, "refuses odd widths after the first",
                                                   [](const PickyOptions& o, isp::BuildContext&) {
                                                     for (std::size_t i = 1; i < o.widths.size(); ++i)
                                                       if (o.widths[i] % 2)
                                                         throw isp::OptionError("widths/" + std::to_string(i), "odd");
                                                     return std::make_shared<Picky>();
                                                   }));
  write("base.json", {{"nodes", {{"p", {{"type", "Picky"}, {"widths", {2, 4, 6}}}}}}});
  write("child.json", {{"_base_", "base.json"}, {"nodes", {{"p", {{"widths", {2, 4, 5}}}}}}});
  auto located = [&](const std::string& file, const std::vector<std::string>& sets) -> std::string {
    isp::Recipe r = isp::load_recipe((dir / file).string(), sets);
    isp::BuildContext ctx(reg, r.doc, [&r](const std::string& p) { return r.where(p); });
    try {
      ctx.build_node("p", "picky");
    } catch (const isp::RecipeError& e) {
      return e.what();
    }
    return "no error";
  };
  CHECK(located("base.json", {}) == "no error");
  CHECK(located("child.json", {}) == (dir / "child.json").string() + ": /nodes/p/widths/2: odd");
  CHECK(located("base.json", {"nodes.p.widths.1=3"}) == "--set nodes.p.widths.1=3: /nodes/p/widths/1: odd");
  fs::remove_all(dir);
}

TEST_CASE("plugins: the descriptor check reads only the bytes the symbol has, ABI number first, and no pointer") {
  const IspPluginDescriptor& host = isp::host_descriptor();
  std::vector<unsigned char> bytes(sizeof(IspPluginDescriptor), 0xff);  // pointers: garbage, never followed
  std::memcpy(bytes.data(), &host, offsetof(IspPluginDescriptor, json_minor) + sizeof host.json_minor);
  CHECK(isp::check_descriptor_bytes(bytes.data(), bytes.size(), host).empty());
  CHECK(isp::check_descriptor_bytes(bytes.data(), bytes.size() + 64, host).empty());  // ASan/padding may add bytes
  CHECK(isp::check_descriptor_bytes(bytes.data(), 3, host).find("3 bytes, too few to hold an ABI number") != std::string::npos);
  CHECK(isp::check_descriptor_bytes(nullptr, 0, host).find("too few") != std::string::npos);
  const std::string short_one = isp::check_descriptor_bytes(bytes.data(), 32, host);
  CHECK(short_one.find("has 32 bytes, ABI " + std::to_string(host.abi_version) + " needs " +
                       std::to_string(sizeof(IspPluginDescriptor))) != std::string::npos);
  // Another ABI: only its number is read -- a 4-byte symbol suffices to say so.
  const uint32_t other = host.abi_version + 1;
  std::memcpy(bytes.data(), &other, sizeof other);
  const std::string abi = isp::check_descriptor_bytes(bytes.data(), 4, host);
  CHECK(abi.find("refused: built for ISP plugin ABI " + std::to_string(other) + ", host is ISP plugin ABI " +
                 std::to_string(host.abi_version)) != std::string::npos);
  // Same ABI, another LibTorch patch level.
  std::memcpy(bytes.data(), &host.abi_version, sizeof other);
  const uint32_t patch = host.torch_patch + 1;
  std::memcpy(bytes.data() + offsetof(IspPluginDescriptor, torch_patch), &patch, sizeof patch);
  const std::string torch = isp::check_descriptor_bytes(bytes.data(), bytes.size(), host);
  CHECK(torch.find("." + std::to_string(patch) + ", C++11 ABI") < torch.find("host is"));
}

namespace {
// A component that builds its optional child first, then records where its own spec is.
struct Probe {
  static constexpr const char* kKind = "probe";
  std::string where, child_where;
};
struct ProbeOptions {
  isp::NodeRef child;
  template <class V> void visit(V& v) { v("child", child, "a nested probe", isp::optional_arg()); }
};
}  // namespace

TEST_CASE("build context: a factory learns where its own spec is, for a node, an inline spec and after nesting") {
  isp::Registry reg;
  reg.add(isp::make_component<Probe, ProbeOptions>("Probe", 1, "records spec_where()",
                                                   [](const ProbeOptions& o, isp::BuildContext& ctx) {
                                                     auto p = std::make_shared<Probe>();
                                                     if (!o.child.empty())
                                                       p->child_where = ctx.get<Probe>(o.child)->where;
                                                     p->where = ctx.spec_where().str();
                                                     return p;
                                                   }));
  json recipe = {{"nodes",
                  {{"leaf", {{"type", "Probe"}}},
                   {"by_ref", {{"type", "Probe"}, {"child", {{"$ref", "leaf"}}}}},
                   {"inline", {{"type", "Probe"}, {"child", {{"type", "Probe"}}}}}}}};
  isp::BuildContext ctx(reg, recipe, [](const std::string& p) { return isp::Where{"r.json", p}; });
  CHECK(ctx.spec_where().pointer.empty());  // outside any factory
  auto by_ref = ctx.node<Probe>("by_ref");
  CHECK(by_ref->where == "r.json: /nodes/by_ref");
  CHECK(by_ref->child_where == "r.json: /nodes/leaf");
  auto in_line = ctx.node<Probe>("inline");
  CHECK(in_line->where == "r.json: /nodes/inline");
  CHECK(in_line->child_where == "r.json: /nodes/inline/child");
  CHECK(ctx.spec_where().pointer.empty());
  // A factory that throws leaves no stale entry behind.
  json bad = {{"nodes", {{"broken", {{"type", "Probe"}, {"child", {{"type", "Nope"}}}}}}}};
  isp::BuildContext ctx2(reg, bad, [](const std::string& p) { return isp::Where{"r.json", p}; });
  CHECK(error_of([&] { ctx2.node<Probe>("broken"); }).find("/nodes/broken/child/type") != std::string::npos);
  CHECK(ctx2.spec_where().pointer.empty());
}

namespace {
struct Counted {
  static constexpr const char* kKind = "counted";
  int64_t n = 0;
};
struct CountedOptions {
  int64_t n = 0;
  isp::NodeRef child;
  template <class V> void visit(V& v) {
    v("n", n, "any number");
    v("child", child, "another counted component", isp::optional_arg());
  }
};
}  // namespace

TEST_CASE("build context: a shared kind is built once for recipes that ask for the same component and options") {
  isp::Registry reg;
  int builds = 0;
  reg.add(isp::make_component<Counted, CountedOptions>("Counted", 1, "counts its builds",
                                                       [&builds](const CountedOptions& o, isp::BuildContext& ctx) {
                                                         ++builds;
                                                         if (!o.child.empty()) ctx.get<Counted>(o.child);
                                                         auto c = std::make_shared<Counted>();
                                                         c->n = o.n;
                                                         return c;
                                                       }));
  auto shared = std::make_shared<isp::SharedComponents>(std::vector<std::string>{"counted"}, 2);
  auto build = [&](const json& spec, const std::shared_ptr<isp::SharedComponents>& with) {
    json recipe = {{"nodes", {{"a", spec}, {"leaf", {{"type", "Counted"}, {"n", 7}}}}}};
    isp::BuildContext ctx(reg, recipe, [](const std::string& p) { return isp::Where{"r.json", p}; });
    if (with) ctx.share_components(with);
    auto obj = ctx.node<Counted>("a");
    CHECK(ctx.record_of(obj.get()) != nullptr);  // recorded for recipe.resolved.json like any built object
    CHECK(ctx.records().count("/nodes/a") == 1);
    return obj;
  };
  const json one = {{"type", "Counted"}, {"n", 1}};
  auto first = build(one, shared);
  CHECK(builds == 1);
  CHECK(build(one, shared).get() == first.get());  // another recipe, the same options: the same object
  CHECK(builds == 1);
  CHECK(shared->hits() == 1);
  CHECK(build({{"type", "Counted"}, {"n", 2}}, shared)->n == 2);  // other options: built
  CHECK(builds == 2);
  CHECK(build({{"type", "Counted"}, {"n", 3}}, shared)->n == 3);  // a third: the least recent (n 1) leaves
  CHECK(builds == 3);
  CHECK(build(one, shared).get() != first.get());
  CHECK(builds == 4);
  // Without sharing, or for a kind not shared, every recipe builds its own.
  build(one, nullptr);
  CHECK(builds == 5);
  auto other_kinds = std::make_shared<isp::SharedComponents>(std::vector<std::string>{"dataset"}, 2);
  build(one, other_kinds);
  build(one, other_kinds);
  CHECK(builds == 7);
  // A spec that references another node of its recipe is never shared (its input belongs to that recipe).
  const json with_ref = {{"type", "Counted"}, {"n", 1}, {"child", {{"$ref", "leaf"}}}};
  const int before = builds;
  build(with_ref, shared);
  build(with_ref, shared);
  // "a" is built for each recipe; "leaf", a plain spec, is built for the first and shared with the second.
  CHECK(builds == before + 3);
}
