// Inference graphs (isp/interfaces/inference_graph.h) and a pruned backbone as a self-contained TorchScript
// module (isp::save_torchscript) and ONNX model (isp::save_onnx), both declared in isp/checkpoint.h.
//
// The module is built directly, not traced: one attribute per folded convolution and per remaining weight,
// and a forward() written from the graph the backbone declares (Backbone::inference_graph). Each conv + BN pair of the
// layer table becomes one convolution, W * s and beta + s * (b - mean) with s = gamma / sqrt(var + eps),
// computed in double and rounded once, so the file is an inference network: eval-mode BN, nothing to train.
#include <torch/csrc/jit/api/module.h>
#include <torch/nn/modules/batchnorm.h>
#include <torch/nn/modules/conv.h>

#include <filesystem>
#include <fstream>
#include <utility>
#include <vector>
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
std::string InferenceGraph::relu6(const std::string& in) {
  Op op;
  op.kind = Kind::Relu6, op.a = in;
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
std::string InferenceGraph::max_pool(const std::string& in, int64_t kernel, int64_t stride, int64_t padding) {
  Op op;
  op.kind = Kind::MaxPool, op.a = in, op.kernel = kernel, op.stride = stride, op.padding = padding;
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
      case Kind::Relu6: e = "torch.clamp(" + op.a + ", 0.0, 6.0)"; break;
      case Kind::Add: e = op.a + " + " + op.b; break;
      case Kind::AvgPool: e = "torch.avg_pool2d(" + op.a + ", " + pair(op.stride) + ", " + pair(op.stride) + ")"; break;
      case Kind::MaxPool:
        e = "torch.max_pool2d(" + op.a + ", " + pair(op.kernel) + ", " + pair(op.stride) + ", " + pair(op.padding) + ")";
        break;
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

namespace {

// The exported tensors by their names in the network: each conv's weight and bias with the BN that follows it
// in the layer table folded in (a conv without BN keeps its bias, or zeros), and each linear layer's weight and
// bias. Computed in double, rounded once to float32.
std::vector<std::pair<std::string, at::Tensor>> inference_tensors(const Backbone& net) {
  std::map<std::string, at::Tensor> tensors;
  for (const auto& p : net.named_parameters()) tensors[p.key()] = p.value().detach();
  for (const auto& b : net.named_buffers()) tensors[b.key()] = b.value().detach();
  auto need = [&](const std::string& name) -> at::Tensor {
    auto it = tensors.find(name);
    if (it == tensors.end()) throw Error("export: the layer table names " + name + ", which the network lacks");
    return it->second.to(at::kCPU, at::kDouble);
  };
  auto have = [&](const std::string& name) { return tensors.count(name) > 0; };
  const auto modules = net.named_modules();
  auto eps_of = [&](const std::string& bn) {
    const auto* found = modules.find(bn);
    const auto* impl = found ? (*found)->as<torch::nn::BatchNorm2d>() : nullptr;
    if (!impl) throw Error("export: " + bn + " is not a BatchNorm2d module");
    return impl->options.eps();
  };
  std::vector<std::pair<std::string, at::Tensor>> out;
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
      out.emplace_back(l.name + ".weight", w.to(at::kFloat).contiguous());
      out.emplace_back(l.name + ".bias", b.to(at::kFloat).contiguous());
    } else if (l.op == LayerOp::Linear) {
      for (const char* t : {".weight", ".bias"})
        if (have(l.name + t)) out.emplace_back(l.name + t, need(l.name + t).to(at::kFloat).contiguous());
    }
  }
  return out;
}

void rename_into_place(const std::string& tmp, const std::string& path) { std::filesystem::rename(tmp, path); }

}  // namespace

void save_torchscript(const Backbone& net, const std::string& path) {
  const InferenceGraph graph = net.inference_graph();
  if (graph.empty()) throw Error("save_torchscript: backbone " + net.name() + " declares no inference graph");
  torch::jit::Module m("IspPrunedNetwork");
  m.register_attribute("training", c10::BoolType::get(), false);
  for (const auto& [name, t] : inference_tensors(net))
    m.register_parameter(InferenceGraph::attribute_of(name), t, false);
  m.define("def forward(self, x):\n" + graph.torchscript());
  const std::string tmp = path + ".tmp";
  m.save(tmp);
  rename_into_place(tmp, path);
}

// ---- ONNX ----------------------------------------------------------------------------------------------------
// The file is written with a small protobuf encoder over onnx.proto's field numbers (no protobuf library needed):
// ModelProto{ir_version 7, opset_import {"" 13}, graph}, one node per graph operator, the folded weights as
// initializers, input "input" [batch, C, H, W] and output "logits" [batch, classes] with a symbolic batch.
namespace {

class Proto {
 public:
  const std::string& bytes() const { return b_; }
  Proto& varint_field(int field, uint64_t v) { return key(field, 0).varint(v); }
  Proto& int_field(int field, int64_t v) { return varint_field(field, static_cast<uint64_t>(v)); }
  Proto& bytes_field(int field, const std::string& s) {
    key(field, 2).varint(s.size());
    b_ += s;
    return *this;
  }
  Proto& message(int field, const Proto& m) { return bytes_field(field, m.bytes()); }

 private:
  Proto& key(int field, int wire) { return varint((static_cast<uint64_t>(field) << 3) | static_cast<uint64_t>(wire)); }
  Proto& varint(uint64_t v) {
    while (v >= 0x80) {
      b_ += static_cast<char>((v & 0x7f) | 0x80);
      v >>= 7;
    }
    b_ += static_cast<char>(v);
    return *this;
  }
  std::string b_;
};

// onnx.proto enums and field numbers used below.
constexpr int kFloat = 1, kInt64 = 7;                 // TensorProto.DataType
constexpr int kAttrInt = 2, kAttrInts = 7;            // AttributeProto.AttributeType

Proto tensor_proto(const std::string& name, const at::Tensor& t) {
  Proto p;
  for (int64_t d : t.sizes()) p.int_field(1, d);  // dims
  const bool is_long = t.scalar_type() == at::kLong;
  p.int_field(2, is_long ? kInt64 : kFloat);      // data_type
  p.bytes_field(8, name);                          // name
  const at::Tensor c = t.contiguous();             // raw_data: little-endian, as x86 and ARM hold it
  p.bytes_field(9, std::string(static_cast<const char*>(c.data_ptr()), c.numel() * c.element_size()));
  return p;
}

Proto int_attr(const std::string& name, int64_t v) {
  Proto a;
  a.bytes_field(1, name).int_field(3, v).int_field(20, kAttrInt);
  return a;
}
Proto ints_attr(const std::string& name, const std::vector<int64_t>& v) {
  Proto a;
  a.bytes_field(1, name);
  for (int64_t x : v) a.int_field(8, x);
  a.int_field(20, kAttrInts);
  return a;
}

Proto node(const std::string& op, const std::vector<std::string>& in, const std::string& out,
           const std::vector<Proto>& attrs = {}) {
  Proto n;
  for (const auto& i : in) n.bytes_field(1, i);
  n.bytes_field(2, out).bytes_field(3, out + "_" + op).bytes_field(4, op);
  for (const auto& a : attrs) n.message(5, a);
  return n;
}

// ValueInfoProto of a float tensor whose first dimension is the symbolic "batch".
Proto value_info(const std::string& name, const std::vector<int64_t>& dims_after_batch) {
  Proto shape;
  shape.message(1, Proto().bytes_field(2, "batch"));
  for (int64_t d : dims_after_batch) shape.message(1, Proto().int_field(1, d));
  Proto tensor_type;
  tensor_type.int_field(1, kFloat).message(2, shape);
  Proto type;
  type.message(1, tensor_type);
  Proto v;
  v.bytes_field(1, name).message(2, type);
  return v;
}

}  // namespace

void save_onnx(const Backbone& net, const std::string& path) {
  const InferenceGraph graph = net.inference_graph();
  if (graph.empty()) throw Error("save_onnx: backbone " + net.name() + " declares no inference graph");
  const auto layers = net.layer_shapes();
  if (layers.empty() || layers.front().op != LayerOp::Conv)
    throw Error("save_onnx: backbone " + net.name() + " does not start with a convolution");
  std::map<std::string, std::vector<int64_t>> weight_shape;
  Proto g;
  g.bytes_field(2, "isp_pruned_network");
  for (const auto& [name, t] : inference_tensors(net)) {
    g.message(5, tensor_proto(name, t));
    weight_shape[name] = t.sizes().vec();
  }
  auto value = [](const std::string& v) { return v == InferenceGraph::input() ? std::string("input") : v; };
  for (const auto& op : graph.ops()) {
    using K = InferenceGraph::Kind;
    const std::string a = value(op.a), out = op.out;
    switch (op.kind) {
      case K::Conv: {
        const auto& w = weight_shape.at(op.layer + ".weight");
        const int64_t p = op.padding;
        g.message(1, node("Conv", {a, op.layer + ".weight", op.layer + ".bias"}, out,
                          {ints_attr("kernel_shape", {w[2], w[3]}), ints_attr("strides", {op.stride, op.stride}),
                           ints_attr("pads", {p, p, p, p}), ints_attr("dilations", {1, 1}), int_attr("group", op.groups)}));
        break;
      }
      case K::Relu: g.message(1, node("Relu", {a}, out)); break;
      case K::Relu6: {  // Clip (opset 13) takes its bounds as inputs: two scalar initializers
        g.message(5, tensor_proto(out + "_min", at::scalar_tensor(0.0, at::kFloat)));
        g.message(5, tensor_proto(out + "_max", at::scalar_tensor(6.0, at::kFloat)));
        g.message(1, node("Clip", {a, out + "_min", out + "_max"}, out));
        break;
      }
      case K::Add: g.message(1, node("Add", {a, value(op.b)}, out)); break;
      case K::AvgPool:
        g.message(1, node("AveragePool", {a}, out,
                          {ints_attr("kernel_shape", {op.stride, op.stride}), ints_attr("strides", {op.stride, op.stride})}));
        break;
      case K::MaxPool: {
        const int64_t p = op.padding;  // ONNX MaxPool pads with -inf, as torch.max_pool2d does
        g.message(1, node("MaxPool", {a}, out,
                          {ints_attr("kernel_shape", {op.kernel, op.kernel}), ints_attr("strides", {op.stride, op.stride}),
                           ints_attr("pads", {p, p, p, p})}));
        break;
      }
      case K::PadChannels: {
        // pads = [begin of N, C, H, W, end of N, C, H, W]: zero channels appended at the end of C.
        const std::string pads = out + "_pads";
        g.message(5, tensor_proto(pads, at::tensor(std::vector<int64_t>{0, 0, 0, 0, 0, op.amount, 0, 0}, at::kLong)));
        g.message(1, node("Pad", {a, pads}, out));
        break;
      }
      case K::GlobalMean:
        g.message(1, node("GlobalAveragePool", {a}, out + "_pooled"));
        g.message(1, node("Flatten", {out + "_pooled"}, out, {int_attr("axis", 1)}));
        break;
      case K::Linear:
        g.message(1, node("Gemm", {a, op.layer + ".weight", op.layer + ".bias"}, out, {int_attr("transB", 1)}));
        break;
    }
  }
  g.message(1, node("Identity", {graph.output()}, "logits"));
  const int64_t size = net.input_size();
  g.message(11, value_info("input", {layers.front().in_channels, size, size}));
  g.message(12, value_info("logits", {net.num_classes()}));

  Proto model;
  model.int_field(1, 7);  // ir_version 7 goes with opset 13
  model.bytes_field(2, "isp").bytes_field(3, "1");
  model.message(7, g);
  model.message(8, Proto().bytes_field(1, "").int_field(2, 13));
  const std::string tmp = path + ".tmp";
  {
    std::ofstream f(tmp, std::ios::binary | std::ios::trunc);
    f.write(model.bytes().data(), static_cast<std::streamsize>(model.bytes().size()));
    f.flush();
    if (!f) throw Error("save_onnx: cannot write " + tmp);
  }
  rename_into_place(tmp, path);
}

}  // namespace isp
