// Weights saved by Python (torch.save(model.state_dict()), the zip format) loaded into isp's modules by name:
// isp::load_state_dict_from_python, which TrainClassifier's init_from and load_export use.
#include "test_support.h"

#include <torch/torch.h>

#include <fstream>

#include "isp/checkpoint.h"
#include "isp/registry/recipe.h"

namespace {
struct Net : torch::nn::Module {
  Net() {
    fc = register_module("fc", torch::nn::Linear(3, 2));
    steps = register_buffer("steps", torch::zeros({2}, torch::kLong));
  }
  torch::nn::Linear fc{nullptr};
  at::Tensor steps;
};
}  // namespace

TEST_CASE("state dicts saved by Python's torch.save load into isp modules by name and mismatches name the tensors") {
  const std::string py = isp_test::python_with_torch();
  // scripts/setup.sh installs python3-torch; without it this test fails (it never passes by skipping).
  REQUIRE_MESSAGE(!py.empty(), "python3 with torch is required (scripts/setup.sh installs python3-torch)");
  const auto dir = isp_test::temp_dir("python_state_dict");
  auto save = [&](const std::string& name, const std::string& dict) {
    const std::string path = (dir / name).string();
    const std::string cmd = py + " -c \"import torch; torch.save(" + dict + ", '" + path + "')\"";
    REQUIRE(std::system(cmd.c_str()) == 0);
    return path;
  };
  const std::string good = save("good.pt", "{'fc.weight': torch.arange(6.).reshape(2, 3) * 0.5, "
                                           "'fc.bias': torch.tensor([3., 4.]), 'steps': torch.tensor([5, -6])}");
  CHECK(isp::is_python_state_dict_file(good));
  Net net;
  isp::load_state_dict_from_python(net, good);
  CHECK(net.fc->weight.equal(torch::arange(6, torch::kFloat).reshape({2, 3}) * 0.5));
  CHECK(net.fc->bias.equal(torch::tensor({3.f, 4.f})));
  CHECK(net.steps.equal(torch::tensor({5, -6}, torch::kLong)));

  const std::string missing = save("missing.pt", "{'fc.weight': torch.zeros(2, 3), 'steps': torch.zeros(2).long()}");
  CHECK(isp_test::error_of([&] { isp::load_state_dict_from_python(net, missing); }).find("missing fc.bias") != std::string::npos);
  const std::string extra = save("extra.pt", "{'fc.weight': torch.zeros(2, 3), 'fc.bias': torch.zeros(2), "
                                             "'steps': torch.zeros(2).long(), 'head.weight': torch.zeros(1)}");
  CHECK(isp_test::error_of([&] { isp::load_state_dict_from_python(net, extra); }).find("does not have: head.weight") !=
        std::string::npos);
  const std::string shape = save("shape.pt", "{'fc.weight': torch.zeros(3, 3), 'fc.bias': torch.zeros(2), "
                                             "'steps': torch.zeros(2).long()}");
  const std::string shape_err = isp_test::error_of([&] { isp::load_state_dict_from_python(net, shape); });
  CHECK(shape_err.find("fc.weight [3, 3] (the network has [2, 3])") != std::string::npos);
  // Any other file (an isp checkpoint, text) is recognised as not a torch.save zip, and refused as one.
  isp::write_file_atomic((dir / "text.pt").string(), "hello");
  CHECK(!isp::is_python_state_dict_file((dir / "text.pt").string()));
  CHECK(isp_test::error_of([&] { isp::load_state_dict_from_python(net, (dir / "text.pt").string()); })
            .find("not a state dict saved by torch.save") != std::string::npos);
  std::filesystem::remove_all(dir);
}

TEST_CASE("model.state_dict() as torch.save writes it (an OrderedDict with _metadata) loads, views and shared storages included") {
  const std::string py = isp_test::python_with_torch();
  REQUIRE_MESSAGE(!py.empty(), "python3 with torch is required (scripts/setup.sh installs python3-torch)");
  const auto dir = isp_test::temp_dir("python_ordered_dict");
  const std::string path = (dir / "sd.pt").string(), bad = (dir / "bad.pt").string(), evil = (dir / "evil.pt").string();
  // A real module's state dict: OrderedDict, _metadata, a long buffer (num_batches_tracked); plus a transposed view
  // and two slices of one storage (offsets, strides, a storage shared between entries), in half precision too.
  const std::string script =
      "import torch, collections\n"
      "m = torch.nn.Sequential(torch.nn.Conv2d(2, 3, 1), torch.nn.BatchNorm2d(3))\n"
      "with torch.no_grad():\n"
      "    m[0].weight.copy_(torch.arange(6.).reshape(3, 2, 1, 1)); m[1].running_mean.fill_(0.25)\n"
      "sd = m.state_dict()\n"
      "base = torch.arange(12.).reshape(3, 4)\n"
      "sd['t'] = base.t(); sd['row'] = base[1]; sd['half'] = torch.tensor([1.5, -2.0]).half()\n"
      "assert type(sd) is collections.OrderedDict and hasattr(sd, '_metadata')\n"
      "torch.save(sd, '" + path + "')\n"
      "torch.save({'w': torch.zeros(2), 'epoch': 3}, '" + bad + "')\n"
      "import os\n"
      "class Evil:\n"
      "    def __reduce__(self): return (os.system, ('true',))\n"
      "torch.save({'w': Evil()}, '" + evil + "')\n";
  {
    std::ofstream f(dir / "make.py");
    f << script;
  }
  REQUIRE(std::system((py + " " + (dir / "make.py").string()).c_str()) == 0);
  struct Net : torch::nn::Module {
    torch::nn::Conv2d conv = register_module("0", torch::nn::Conv2d(torch::nn::Conv2dOptions(2, 3, 1)));
    torch::nn::BatchNorm2d bn = register_module("1", torch::nn::BatchNorm2d(3));
    at::Tensor t = register_buffer("t", torch::zeros({4, 3}));
    at::Tensor row = register_buffer("row", torch::zeros({4}));
    at::Tensor half = register_buffer("half", torch::zeros({2}, torch::kHalf));
  } net;
  isp::load_state_dict_from_python(net, path);
  CHECK(net.conv->weight.flatten().equal(torch::arange(6, torch::kFloat)));
  CHECK(net.bn->running_mean.equal(torch::full({3}, 0.25)));
  CHECK(net.bn->num_batches_tracked.item<int64_t>() == 0);
  CHECK(net.t.equal(torch::arange(12, torch::kFloat).reshape({3, 4}).t()));
  CHECK(net.row.equal(torch::tensor({4.f, 5.f, 6.f, 7.f})));
  CHECK(net.half.equal(torch::tensor({1.5, -2.0}).to(torch::kHalf)));
  // Not a state dict: named. An object that would run code when unpickled: refused by name, never called.
  CHECK(isp_test::error_of([&] { isp::load_state_dict_from_python(net, bad); }).find("'epoch' is not a tensor") !=
        std::string::npos);
  const std::string evil_err = isp_test::error_of([&] { isp::load_state_dict_from_python(net, evil); });
  CHECK(evil_err.find("posix.system") != std::string::npos);
  CHECK(evil_err.find(evil) != std::string::npos);
  std::filesystem::remove_all(dir);
}
