// Weights saved by Python (torch.save(model.state_dict()), the zip format) loaded into isp's modules by name:
// isp::load_state_dict_from_python, which TrainClassifier's init_from and load_export use.
#include "test_support.h"

#include <torch/torch.h>

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
