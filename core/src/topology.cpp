// The Backbone's topology table and what is derived from it: channel groups for surgery, widths, gate plumbing.
#include <ATen/ATen.h>
#include <torch/nn/module.h>

#include <string>
#include <utility>

#include "isp/interfaces/backbone.h"
#include "isp/registry/error.h"

namespace isp {

namespace {

// Module::name() is the demangled class, e.g. "(anonymous namespace)::ResNetCifar": errors name the class.
std::string short_name(const torch::nn::Module& m) {
  const std::string& n = m.name();
  const auto colon = n.rfind("::");
  return colon == std::string::npos ? n : n.substr(colon + 2);
}

bool is_depthwise(const LayerShape& l) {
  return l.op == LayerOp::Conv && l.groups > 1 && l.groups == l.in_channels && l.groups == l.out_channels;
}

}  // namespace

const char* to_string(LayerOp op) {
  switch (op) {
    case LayerOp::Conv: return "conv";
    case LayerOp::BatchNorm: return "bn";
    case LayerOp::Relu: return "relu";
    case LayerOp::Linear: return "linear";
    case LayerOp::AvgPool: return "avgpool";
    case LayerOp::FunctionalRelu: return "functional_relu";
    case LayerOp::FunctionalAvgPool: return "functional_avgpool";
    case LayerOp::Add: return "add";
    case LayerOp::MaxPool: return "maxpool";
  }
  return "unknown";
}

int Backbone::declare_gate(std::string name, int64_t width) {
  if (width < 1) throw Error(short_name(*this) + ": gated layer '" + name + "' must have width >= 1");
  offsets_.push_back(gated_.empty() ? 0 : offsets_.back() + gated_.back().width);
  gated_.push_back({std::move(name), width});
  return static_cast<int>(gated_.size()) - 1;
}

void Backbone::declare_layer(LayerShape l) {
  const int L = static_cast<int>(gated_.size());
  for (int g : {l.in_gate, l.out_gate}) {
    if (g < -1 || g >= L)
      throw Error(short_name(*this) + ": layer '" + l.name + "' names gated layer " + std::to_string(g) +
                  ", but only " + std::to_string(L) + " are declared (declare_gate first)");
  }
  // Surgery slices whole channels; a grouped conv would need its groups cut consistently, which no backbone needs.
  if (l.op == LayerOp::Conv && l.groups > 1 && !is_depthwise(l) && (l.in_gate >= 0 || l.out_gate >= 0))
    throw Error(short_name(*this) + ": gated conv '" + l.name + "' must be dense or depthwise");
  if (is_depthwise(l) && l.in_gate != l.out_gate)
    throw Error(short_name(*this) + ": depthwise conv '" + l.name + "' must have in_gate == out_gate");
  layers_.push_back(std::move(l));
}

void Backbone::declare_conv(std::string name, int64_t in, int64_t out, int64_t kernel, int64_t in_hw, int64_t out_hw,
                            int in_gate, int out_gate, int64_t groups, bool bias) {
  LayerShape l;
  l.name = std::move(name);
  l.op = LayerOp::Conv;
  l.in_channels = in;
  l.out_channels = out;
  l.kernel = kernel;
  l.groups = groups;
  l.in_h = l.in_w = in_hw;
  l.out_h = l.out_w = out_hw;
  l.bias = bias;
  l.in_gate = in_gate;
  l.out_gate = out_gate;
  declare_layer(std::move(l));
}

void Backbone::declare_bn(std::string name, int64_t channels, int64_t hw, int gate) {
  declare_op(std::move(name), LayerOp::BatchNorm, channels, hw, hw, gate);
}

void Backbone::declare_linear(std::string name, int64_t in, int64_t out, int in_gate, int out_gate, bool bias) {
  LayerShape l;
  l.name = std::move(name);
  l.op = LayerOp::Linear;
  l.in_channels = in;
  l.out_channels = out;
  l.bias = bias;
  l.in_gate = in_gate;
  l.out_gate = out_gate;
  declare_layer(std::move(l));
}

void Backbone::declare_op(std::string name, LayerOp op, int64_t channels, int64_t in_hw, int64_t out_hw, int gate) {
  if (op == LayerOp::Conv || op == LayerOp::Linear)
    throw Error(short_name(*this) + ": declare '" + name + "' with declare_conv/declare_linear");
  LayerShape l;
  l.name = std::move(name);
  l.op = op;
  l.in_channels = l.out_channels = channels;
  const bool pool = op == LayerOp::AvgPool || op == LayerOp::FunctionalAvgPool;
  l.kernel = pool && out_hw > 0 ? in_hw / out_hw : 1;
  l.in_h = l.in_w = in_hw;
  l.out_h = l.out_w = out_hw;
  l.in_gate = l.out_gate = gate;
  declare_layer(std::move(l));
}

std::vector<ChannelGroup> Backbone::channel_groups() const {
  std::vector<ChannelGroup> groups(gated_.size());
  for (std::size_t i = 0; i < groups.size(); ++i) groups[i].gate = static_cast<int>(i);
  auto cut = [&](int gate, const LayerShape& l, const char* tensor, int64_t dim) {
    groups[static_cast<std::size_t>(gate)].slices.push_back({l.name + "." + tensor, dim});
  };
  for (const auto& l : layers_) {
    switch (l.op) {
      case LayerOp::Conv:
      case LayerOp::Linear:
        // A depthwise weight is [C, 1, k, k]: its one gate cuts rows only.
        if (l.out_gate >= 0) {
          cut(l.out_gate, l, "weight", 0);
          if (l.bias) cut(l.out_gate, l, "bias", 0);
        }
        if (l.in_gate >= 0 && !is_depthwise(l)) cut(l.in_gate, l, "weight", 1);
        break;
      case LayerOp::BatchNorm:
        if (l.out_gate >= 0)
          for (const char* t : {"weight", "bias", "running_mean", "running_var"}) cut(l.out_gate, l, t, 0);
        break;
      default:
        break;  // no parameters
    }
  }
  return groups;
}

std::vector<int64_t> Backbone::widths() const {
  std::vector<int64_t> w;
  for (const auto& g : gated_) w.push_back(g.width);
  return w;
}

void Backbone::set_gates(const at::Tensor& gates) {
  if (!gates.defined()) {
    gates_ = at::Tensor();
    return;
  }
  const int64_t total = total_gate_width();
  if ((gates.dim() == 1 && gates.size(0) == total) || (gates.dim() == 2 && gates.size(1) == total)) {
    gates_ = gates;
    return;
  }
  throw Error(short_name(*this) + "::set_gates: expected a gate tensor of shape [" + std::to_string(total) +
              "] or [N, " + std::to_string(total) + "], got " + c10::str(gates.sizes()));
}

at::Tensor Backbone::gate(int index) const {
  if (!gates_.defined()) return at::Tensor();
  const auto i = static_cast<std::size_t>(index);
  return gates_.narrow(-1, offsets_.at(i), gated_.at(i).width);
}

at::Tensor Backbone::apply_gate(const at::Tensor& x, const at::Tensor& gate) {
  if (!gate.defined()) return x;
  at::Tensor g = gate.to(x.device(), x.scalar_type());
  std::vector<int64_t> shape(static_cast<std::size_t>(x.dim()), 1);
  shape[0] = g.dim() == 1 ? 1 : g.size(0);
  shape[1] = g.size(-1);
  return x * g.view(shape);
}

}  // namespace isp
