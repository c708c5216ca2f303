// One export folder (isp/checkpoint.h: write_export): structure.json, weights.pt, model.ts.pt, model.onnx and
// sample.json, written the same way by the export stage (the pruned network and the original) and by
// `isp export --run` (again, from a finished run).
#include <ATen/ATen.h>
#include <c10/core/GradMode.h>
#include <torch/version.h>

#include <filesystem>
#include <string>
#include <vector>

#include "isp/checkpoint.h"
#include "isp/interfaces/backbone.h"
#include "isp/registry/error.h"
#include "isp/registry/recipe.h"

namespace isp {
namespace {

json tensor_entry(const at::Tensor& t) {
  const at::Tensor c = t.detach().to(at::kCPU).to(at::kFloat).contiguous();
  return {{"shape", c.sizes().vec()}, {"values", std::vector<float>(c.data_ptr<float>(), c.data_ptr<float>() + c.numel())}};
}

}  // namespace

json export_sample(Backbone& net, const at::Tensor& input) {
  c10::NoGradGuard no_grad;
  ScopedBatchNormFolding unfolded(false);  // the layers as weights.pt stores them
  const bool training = net.is_training();
  net.eval();
  const auto params = net.parameters();
  const c10::Device dev = params.empty() ? c10::Device(c10::kCPU) : params.front().device();
  const at::Tensor x = input.to(at::kFloat).contiguous();
  const at::Tensor logits = net.forward(x.to(dev));
  net.train(training);
  return {{"what", "test images (normalised, NCHW) and this network's logits in isp (C++, LibTorch " TORCH_VERSION
                   ", eval mode, fp32, BatchNorm not folded)"},
          {"input", tensor_entry(x)},
          {"logits", tensor_entry(logits)}};
}

json export_structure(const json& spec, const json& layers, const json& pruner, const json& plugins) {
  return {{"format", "isp-export-1"}, {"spec", spec}, {"layers", layers}, {"pruner", pruner}, {"plugins", plugins}};
}

json unpruned_layers(const Backbone& net) {
  json layers = json::array();
  for (const auto& g : net.gated_layers()) {
    std::vector<int64_t> kept(static_cast<std::size_t>(g.width));
    for (int64_t c = 0; c < g.width; ++c) kept[static_cast<std::size_t>(c)] = c;
    layers.push_back({{"name", g.name}, {"width", g.width}, {"kept", kept}});
  }
  return layers;
}

std::vector<std::string> write_export(Backbone& net, const json& structure, const at::Tensor& sample_input,
                                      const std::string& dir, const std::vector<std::string>& formats) {
  namespace fs = std::filesystem;
  fs::create_directories(dir);
  std::vector<std::string> written;
  auto wrote = [&](const std::string& name) { written.push_back((fs::path(dir) / name).string()); };
  write_file_atomic(dir + "/structure.json", structure.dump(2) + "\n");
  wrote("structure.json");
  const bool graph = !net.inference_graph().empty();
  for (const auto& f : formats) {
    if (f == "state_dict") {
      save_state_dict_for_python(net, dir + "/weights.pt");
      wrote("weights.pt");
    } else if (f == "torchscript" || f == "onnx") {
      if (!graph) continue;  // the backbone declares no inference graph: weights.pt only
      if (f == "torchscript") save_torchscript(net, dir + "/model.ts.pt");
      else save_onnx(net, dir + "/model.onnx");
      wrote(f == "torchscript" ? "model.ts.pt" : "model.onnx");
    } else {
      throw Error("export format \"" + f + "\": unknown (known: state_dict, torchscript, onnx)");
    }
  }
  if (sample_input.defined()) {
    write_file_atomic(dir + "/sample.json", export_sample(net, sample_input).dump() + "\n");
    wrote("sample.json");
  }
  return written;
}

}  // namespace isp
