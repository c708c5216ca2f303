// Inference graphs (isp/interfaces/inference_graph.h) and a pruned backbone as a self-contained TorchScript
// module (isp::save_torchscript, isp/checkpoint.h).
//
// The module is built directly, not traced: one attribute per folded convolution and per remaining weight,
// and a forward() written from the graph the backbone declares (Backbone::inference_graph). Each conv + BN pair of the
// layer table becomes one convolution, W * s and beta + s * (b - mean) with s = gamma / sqrt(var + eps),
// computed in double and rounded once, so the file is an inference network: eval-mode BN, nothing to train.
#include <torch/csrc/jit/api/module.h>
#include <torch/nn/modules/batchnorm.h>
#include <torch/nn/modules/conv.h>

#include <filesystem>
#include <map>
#include <string>

#include "isp/checkpoint.h"
#include "isp/interfaces/backbone.h"
#include "isp/registry/error.h"

namespace isp {

std::string InferenceGraph::attribute_of(const std::string& tensor) {
  std::string out = tensor;
  for (char& c : out)
    if (c == '.') c = '_';
  return out;
}

std::string InferenceGraph::push(Op op) {
  op.out = "v" + std::to_string(ops_.size());
  ops_.push_back(op);
  output_ = op.out;
  return op.out;
}

std::string InferenceGraph::conv(const std::string& layer, const std::string& in, int64_t stride, int64_t padding,
                                 int64_t groups) {
  Op op;
  op.kind = Kind::Conv, op.layer = layer, op.a = in, op.stride = stride, op.padding = padding, op.groups = groups;
  return push(op);
}
std::string InferenceGraph::relu(const std::string& in) {
  Op op;
  op.kind = Kind::Relu, op.a = in;
  return push(op);
}
std::string InferenceGraph::add(const std::string& a, const std::string& b) {
  Op op;
  op.kind = Kind::Add, op.a = a, op.b = b;
  return push(op);
}
std::string InferenceGraph::avg_pool(const std::string& in, int64_t kernel) {
  Op op;
  op.kind = Kind::AvgPool, op.a = in, op.stride = kernel;
  return push(op);
}
std::string InferenceGraph::pad_channels(const std::string& in, int64_t amount) {
  Op op;
  op.kind = Kind::PadChannels, op.a = in, op.amount = amount;
  return push(op);
}
std::string InferenceGraph::global_mean(const std::string& in) {
  Op op;
  op.kind = Kind::GlobalMean, op.a = in;
  return push(op);
}
std::string InferenceGraph::linear(const std::string& layer, const std::string& in) {
  Op op;
  op.kind = Kind::Linear, op.layer = layer, op.a = in;
  return push(op);
}

std::string InferenceGraph::torchscript() const {
  if (ops_.empty()) throw Error("InferenceGraph: no operators");
  auto pair = [](int64_t v) { return "[" + std::to_string(v) + ", " + std::to_string(v) + "]"; };
  auto self = [](const std::string& layer, const char* t) { return "self." + attribute_of(layer + t); };
  std::string src;
  for (const Op& op : ops_) {
    std::string e;
    switch (op.kind) {
      case Kind::Conv:
        e = "torch.conv2d(" + op.a + ", " + self(op.layer, ".weight") + ", " + self(op.layer, ".bias") + ", " +
            pair(op.stride) + ", " + pair(op.padding) + ", [1, 1], " + std::to_string(op.groups) + ")";
        break;
      case Kind::Relu: e = "torch.relu(" + op.a + ")"; break;
      case Kind::Add: e = op.a + " + " + op.b; break;
      case Kind::AvgPool: e = "torch.avg_pool2d(" + op.a + ", " + pair(op.stride) + ", " + pair(op.stride) + ")"; break;
      case Kind::PadChannels:  // pads run from the last dimension: W, H, then C at its end
        e = "torch.constant_pad_nd(" + op.a + ", [0, 0, 0, 0, 0, " + std::to_string(op.amount) + "], 0.0)";
        break;
      case Kind::GlobalMean: e = op.a + ".mean([2, 3])"; break;
      case Kind::Linear:
        e = "torch.matmul(" + op.a + ", " + self(op.layer, ".weight") + ".t()) + " + self(op.layer, ".bias");
        break;
    }
    src += "    " + op.out + " = " + e + "\n";
  }
  return src + "    return " + output_ + "\n";
}

void save_torchscript(const Backbone& net, const std::string& path) {
  const InferenceGraph graph = net.inference_graph();
  if (graph.empty()) throw Error("save_torchscript: backbone " + net.name() + " declares no inference graph");
  std::map<std::string, at::Tensor> tensors;
  for (const auto& p : net.named_parameters()) tensors[p.key()] = p.value().detach();
  for (const auto& b : net.named_buffers()) tensors[b.key()] = b.value().detach();
  auto need = [&](const std::string& name) -> at::Tensor {
    auto it = tensors.find(name);
    if (it == tensors.end()) throw Error("save_torchscript: the layer table names " + name + ", which the network lacks");
    return it->second.to(at::kCPU, at::kDouble);
  };
  auto have = [&](const std::string& name) { return tensors.count(name) > 0; };

  const auto modules = net.named_modules();
  auto eps_of = [&](const std::string& bn) {
    const auto* found = modules.find(bn);
    const auto* impl = found ? (*found)->as<torch::nn::BatchNorm2d>() : nullptr;
    if (!impl) throw Error("save_torchscript: " + bn + " is not a BatchNorm2d module");
    return impl->options.eps();
  };
  torch::jit::Module m("IspPrunedNetwork");
  m.register_attribute("training", c10::BoolType::get(), false);
  const auto layers = net.layer_shapes();
  for (std::size_t i = 0; i < layers.size(); ++i) {
    const LayerShape& l = layers[i];
    if (l.op == LayerOp::Conv) {
      at::Tensor w = need(l.name + ".weight");
      at::Tensor b = have(l.name + ".bias") ? need(l.name + ".bias") : at::zeros({w.size(0)}, w.options());
      if (i + 1 < layers.size() && layers[i + 1].op == LayerOp::BatchNorm) {
        const std::string bn = layers[i + 1].name;
        const at::Tensor var = need(bn + ".running_var"), mean = need(bn + ".running_mean");
        const at::Tensor gamma = have(bn + ".weight") ? need(bn + ".weight") : at::ones_like(var);
        const at::Tensor beta = have(bn + ".bias") ? need(bn + ".bias") : at::zeros_like(var);
        const at::Tensor scale = gamma / at::sqrt(var + eps_of(bn));
        w = w * scale.view({-1, 1, 1, 1});
        b = beta + scale * (b - mean);
      }
      m.register_parameter(InferenceGraph::attribute_of(l.name + ".weight"), w.to(at::kFloat).contiguous(), false);
      m.register_parameter(InferenceGraph::attribute_of(l.name + ".bias"), b.to(at::kFloat).contiguous(), false);
    } else if (l.op == LayerOp::Linear) {
      for (const char* t : {".weight", ".bias"})
        if (have(l.name + t))
          m.register_parameter(InferenceGraph::attribute_of(l.name + t), need(l.name + t).to(at::kFloat).contiguous(), false);
    }
  }
  m.define("def forward(self, x):\n" + graph.torchscript());
  const std::string tmp = path + ".tmp";
  m.save(tmp);
  std::filesystem::rename(tmp, path);
}

}  // namespace isp
