// FLOPs / parameter counting from a backbone's layer list, and channel surgery (docs/method.md §1e, §3.3, §8).
//
// Counting convention = the official print_model_param_flops (multiply_adds=False), which hooks nn.Module layers
// only: conv k²·(Cin/g)·Cout·Hout·Wout (+Cout·Hout·Wout with bias), linear in·out (+out), BN 2·numel(out),
// ReLU numel(out), pooling numel(in) (k²·C·Hout·Wout with kernel = stride). Operations the reference models apply
// functionally are invisible to that counter; backbones list them as LayerOp::Add, FunctionalRelu and
// FunctionalAvgPool and they count 0 FLOPs here. This reproduces the references exactly: ResNet-56
// 127 087 242 FLOPs (0.12709 G), MobileNetV2-CIFAR 312 877 578 FLOPs (0.31288 G).
// Params: conv/linear weights + biases, BN affine 2·C (running statistics are buffers, not parameters).
#include "isp/cost.h"

#include <ATen/ATen.h>
#include <torch/nn/module.h>
#include <torch/utils.h>

#include <map>
#include <string>
#include <utility>

#include "isp/registry/error.h"

namespace isp {

namespace {

std::string shape_str(const at::Tensor& t) {
  std::string s = "[";
  for (int64_t d = 0; d < t.dim(); ++d) s += (d ? ", " : "") + std::to_string(t.size(d));
  return s + "]";
}

// A depthwise conv: its groups follow its (gated) channel count.
bool is_depthwise(const LayerShape& l) {
  return l.op == LayerOp::Conv && l.groups > 1 && l.groups == l.in_channels && l.groups == l.out_channels;
}

// Cost of one layer with effective channel counts; `g` is the effective groups.
LayerCostBreakdown layer_cost(const LayerShape& l, double cin, double cout, double g) {
  LayerCostBreakdown c{l.name, to_string(l.op), 0.0, 0.0};
  const double k2 = static_cast<double>(l.kernel) * static_cast<double>(l.kernel);
  const double ohw = static_cast<double>(l.out_h) * static_cast<double>(l.out_w);
  const double ihw = static_cast<double>(l.in_h) * static_cast<double>(l.in_w);
  switch (l.op) {
    case LayerOp::Conv:
      c.params = k2 * (cin / g) * cout + (l.bias ? cout : 0.0);
      c.flops = k2 * (cin / g) * cout * ohw + (l.bias ? cout * ohw : 0.0);
      return c;
    case LayerOp::Linear:
      c.params = cin * cout + (l.bias ? cout : 0.0);
      c.flops = c.params;
      return c;
    case LayerOp::BatchNorm:
      c.params = 2.0 * cout;
      c.flops = 2.0 * cout * ohw;
      return c;
    case LayerOp::Relu:
      c.flops = cout * ohw;
      return c;
    case LayerOp::AvgPool:
      c.flops = cin * ihw;
      return c;
    case LayerOp::MaxPool:  // the official pooling hook: kernel^2 per output element
      c.flops = static_cast<double>(l.kernel * l.kernel) * cout * ohw;
      return c;
    case LayerOp::FunctionalRelu:
    case LayerOp::FunctionalAvgPool:
    case LayerOp::Add:
      return c;
  }
  throw Error("CostModel: layer '" + l.name + "' has an unknown op (" + std::to_string(static_cast<int>(l.op)) + ")");
}

// Layer cost as a polynomial in the kept counts: c0 + a·c[in_gate] + b·c[out_gate] + q·c[in_gate]·c[out_gate].
// When in_gate == out_gate (BN, ReLU, depthwise conv) everything folds into the linear term.
struct LinearCost {
  double c0 = 0, a = 0, b = 0, q = 0;
  int in_gate = -1, out_gate = -1;
};

LinearCost linear_flops(const LayerShape& l) {
  // Evaluate the layer at (cin, cout) ∈ {1, 2}² with groups following the gate for depthwise convs: the cost is
  // bilinear in (cin, cout) for every op, so four samples identify it exactly.
  auto f = [&l](double ci, double co) {
    const double cin = l.in_gate >= 0 ? ci : static_cast<double>(l.in_channels);
    const double cout = l.out_gate >= 0 ? co : static_cast<double>(l.out_channels);
    double g = static_cast<double>(l.groups);
    if (is_depthwise(l)) {
      if (l.in_gate != l.out_gate)
        throw Error("CostModel: depthwise conv '" + l.name + "' must have in_gate == out_gate");
      g = l.in_gate >= 0 ? ci : g;
      return layer_cost(l, g, g, g).flops;
    }
    return layer_cost(l, cin, cout, g).flops;
  };
  LinearCost r;
  r.in_gate = l.in_gate;
  r.out_gate = l.out_gate;
  const double f11 = f(1, 1), f21 = f(2, 1), f12 = f(1, 2), f22 = f(2, 2);
  r.q = f22 - f21 - f12 + f11;
  r.a = f21 - f11 - r.q;   // d/dcin at cout = 0
  r.b = f12 - f11 - r.q;   // d/dcout at cin = 0
  r.c0 = f11 - r.a - r.b - r.q;
  if (is_depthwise(l) || (l.op != LayerOp::Conv && l.op != LayerOp::Linear)) {
    // Single-gate layers: f depends on one count only (the same gate on both sides).
    if (r.in_gate >= 0 && r.in_gate == r.out_gate) {
      r.a += r.b;
      r.b = 0;
      r.out_gate = -1;
    }
  }
  if (r.in_gate < 0) r.a = 0;
  if (r.out_gate < 0) r.b = 0;
  if (r.in_gate < 0 || r.out_gate < 0) r.q = 0;
  return r;
}

}  // namespace

CostModel::CostModel(std::vector<LayerShape> layers, std::vector<GatedLayer> gated)
    : layers_(std::move(layers)), gated_(std::move(gated)) {
  const int L = static_cast<int>(gated_.size());
  for (const auto& l : layers_) {
    for (int gidx : {l.in_gate, l.out_gate}) {
      if (gidx >= L) {
        throw Error("CostModel: layer '" + l.name + "' names gated layer " + std::to_string(gidx) + ", but only " +
                    std::to_string(L) + " gated layers exist");
      }
    }
  }
  full_ = count();
}

CostSummary CostModel::count(const std::vector<int64_t>& widths) const {
  if (!widths.empty() && widths.size() != gated_.size()) {
    throw Error("CostModel::count: expected " + std::to_string(gated_.size()) + " widths, got " +
                std::to_string(widths.size()));
  }
  auto width = [&](int gidx, int64_t full) -> double {
    if (gidx < 0 || widths.empty()) return static_cast<double>(full);
    return static_cast<double>(widths[static_cast<std::size_t>(gidx)]);
  };
  CostSummary s;
  for (const auto& l : layers_) {
    const double cin = width(l.in_gate, l.in_channels), cout = width(l.out_gate, l.out_channels);
    const double g = is_depthwise(l) ? cin : static_cast<double>(l.groups);
    LayerCostBreakdown c = layer_cost(l, cin, is_depthwise(l) ? cin : cout, g);
    s.flops += c.flops;
    s.params += c.params;
    s.layers.push_back(std::move(c));
  }
  return s;
}

// Both FLOPs formulas are quadratic forms in the kept counts k: c0 + Σ a_l·k_l + Σ q_t·k_i(t)·k_j(t). Their
// coefficients depend only on the layer list, so they are built once and kept on each device they are used
// on: an evaluation is then five kernels with no host data (a CUDA graph can capture it).
struct CostModel::QuadraticForm {
  double c0 = 0;
  std::vector<double> lin;
  std::vector<int64_t> qi, qj;
  std::vector<double> qw;
  struct OnDevice { at::Tensor lin, qi, qj, qw; };
  std::map<std::string, OnDevice> cache;  // by device
  at::Tensor evaluate(const at::Tensor& kept) {
    const std::string key = kept.device().str();
    auto it = cache.find(key);
    if (it == cache.end()) {
      const auto dopt = at::TensorOptions().dtype(at::kDouble);
      OnDevice d;
      d.lin = at::tensor(at::ArrayRef<double>(lin), dopt).to(kept.device());
      if (!qw.empty()) {
        d.qi = at::tensor(at::ArrayRef<int64_t>(qi), at::kLong).to(kept.device());
        d.qj = at::tensor(at::ArrayRef<int64_t>(qj), at::kLong).to(kept.device());
        d.qw = at::tensor(at::ArrayRef<double>(qw), dopt).to(kept.device());
      }
      it = cache.emplace(key, std::move(d)).first;
    }
    const OnDevice& d = it->second;
    at::Tensor k = kept.to(at::kDouble);
    at::Tensor out = (k * d.lin).sum() + c0;
    if (d.qw.defined()) out = out + (d.qw * k.index_select(0, d.qi) * k.index_select(0, d.qj)).sum();
    return out;
  }
};

CostModel::~CostModel() = default;
CostModel::CostModel(const CostModel& o) : layers_(o.layers_), gated_(o.gated_), full_(o.full_) {}

at::Tensor CostModel::flops(const at::Tensor& kept) const {
  const int64_t L = static_cast<int64_t>(gated_.size());
  if (kept.dim() != 1 || kept.size(0) != L)
    throw Error("CostModel::flops: expected kept counts of shape [" + std::to_string(L) + "], got " + shape_str(kept));
  if (!flops_form_) {
    // const + coeff·kept (+ Σ q·kept_i·kept_j for a conv between two different gated layers, absent in the
    // shipped backbones).
    auto f = std::make_unique<QuadraticForm>();
    f->lin.assign(static_cast<std::size_t>(L), 0.0);
    for (const auto& l : layers_) {
      LinearCost lc = linear_flops(l);
      f->c0 += lc.c0;
      if (lc.in_gate >= 0) f->lin[static_cast<std::size_t>(lc.in_gate)] += lc.a;
      if (lc.out_gate >= 0) f->lin[static_cast<std::size_t>(lc.out_gate)] += lc.b;
      if (lc.q != 0) {
        f->qi.push_back(lc.in_gate);
        f->qj.push_back(lc.out_gate);
        f->qw.push_back(lc.q);
      }
    }
    flops_form_ = std::move(f);
  }
  return flops_form_->evaluate(kept).to(kept.scalar_type());
}

at::Tensor CostModel::official_flops_ratio(const at::Tensor& kept) const {
  const int64_t L = static_cast<int64_t>(gated_.size());
  if (kept.dim() != 1 || kept.size(0) != L)
    throw Error("CostModel::official_flops_ratio: expected kept counts of shape [" + std::to_string(L) + "], got " +
                shape_str(kept));
  if (!official_form_) {
    // Family: MobileNetV2-style when a gated depthwise conv exists (numerator over every gated-block conv, with
    // the quadratic depthwise term 9·(c/G)·c·HW), else ResNet-style (numerator = convs whose outputs are gated
    // only). F(conv) = k²·(Cin/g)·Cout·HW + 3·Cout·HW; the denominator T_total sums the convs touching a gate
    // at full width. The form holds numerator / T_total.
    bool mobilenet = false;
    for (const auto& l : layers_)
      if (is_depthwise(l) && l.in_gate >= 0) mobilenet = true;
    auto f = std::make_unique<QuadraticForm>();
    f->lin.assign(static_cast<std::size_t>(L), 0.0);
    double total = 0;
    auto quad = [&](int64_t i, int64_t j, double w) {
      f->qi.push_back(i);
      f->qj.push_back(j);
      f->qw.push_back(w);
    };
    for (const auto& l : layers_) {
      if (l.op != LayerOp::Conv || (l.in_gate < 0 && l.out_gate < 0)) continue;
      const double k2 = static_cast<double>(l.kernel * l.kernel), hw = static_cast<double>(l.out_h * l.out_w);
      const double cin = static_cast<double>(l.in_channels), cout = static_cast<double>(l.out_channels);
      const double g = static_cast<double>(l.groups);
      total += k2 * (cin / g) * cout * hw + 3.0 * cout * hw;
      const auto in = static_cast<std::size_t>(std::max<int64_t>(l.in_gate, 0));
      const auto out = static_cast<std::size_t>(std::max<int64_t>(l.out_gate, 0));
      if (is_depthwise(l)) {
        if (!mobilenet) continue;
        quad(l.in_gate, l.in_gate, k2 * hw / g);  // k2·(c/g)·c·hw + 3·c·hw, c = kept[in_gate]
        f->lin[in] += 3.0 * hw;
      } else if (l.out_gate >= 0) {
        if (l.in_gate >= 0) quad(l.in_gate, l.out_gate, k2 * hw / g);
        else f->lin[out] += k2 * cin / g * hw;
        f->lin[out] += 3.0 * hw;
      } else if (mobilenet) {  // conv3: gated input, fixed output
        f->lin[in] += k2 * cout * hw / g;
        f->c0 += 3.0 * cout * hw;
      }
    }
    if (total <= 0) throw Error("CostModel::official_flops_ratio: no gated conv in the layer list");
    f->c0 /= total;
    for (auto& a : f->lin) a /= total;
    for (auto& q : f->qw) q /= total;
    official_form_ = std::move(f);
  }
  return official_form_->evaluate(kept).to(kept.scalar_type());
}

at::Tensor CostModel::kept_per_layer(const at::Tensor& gates) const {
  int64_t total = 0;
  for (const auto& g : gated_) total += g.width;
  if (gates.dim() < 1 || gates.size(-1) != total)
    throw Error("CostModel::kept_per_layer: expected gates [.., " + std::to_string(total) + "], got " +
                shape_str(gates));
  std::vector<at::Tensor> parts;
  int64_t offset = 0;
  for (const auto& g : gated_) {
    parts.push_back(gates.narrow(-1, offset, g.width).sum(-1));
    offset += g.width;
  }
  return at::stack(parts, -1);
}

// ---------------------------------------------------------------------------------------------- surgery

void copy_pruned_weights(const Backbone& from, Backbone& to, const std::vector<std::vector<int64_t>>& kept) {
  const auto gated = from.gated_layers();
  if (kept.size() != gated.size()) {
    throw Error("copy_pruned_weights: expected kept indices for " + std::to_string(gated.size()) +
                " gated layers, got " + std::to_string(kept.size()));
  }
  std::map<std::string, std::vector<std::pair<int, int64_t>>> slices;  // tensor -> (gate, dim)
  for (const auto& g : from.channel_groups()) {
    if (g.gate < 0 || g.gate >= static_cast<int>(kept.size()))
      throw Error("copy_pruned_weights: channel group names gated layer " + std::to_string(g.gate));
    for (const auto& s : g.slices) slices[s.param].emplace_back(g.gate, s.dim);
  }
  std::map<std::string, at::Tensor> source;
  for (const auto& p : from.named_parameters(/*recurse=*/true)) source[p.key()] = p.value();
  for (const auto& b : from.named_buffers(/*recurse=*/true)) source[b.key()] = b.value();
  for (const auto& [name, _] : slices) {
    if (!source.count(name)) throw Error("copy_pruned_weights: channel group names '" + name + "', which the model lacks");
  }

  torch::NoGradGuard no_grad;
  auto copy_one = [&](const std::string& name, at::Tensor dst) {
    auto it = source.find(name);
    if (it == source.end()) throw Error("copy_pruned_weights: the source model has no tensor '" + name + "'");
    at::Tensor src = it->second;
    if (auto s = slices.find(name); s != slices.end()) {
      for (const auto& [gate, dim] : s->second) {
        const auto& idx = kept[static_cast<std::size_t>(gate)];
        if (dim >= src.dim())
          throw Error("copy_pruned_weights: '" + name + "' has no dimension " + std::to_string(dim));
        for (int64_t i : idx) {
          if (i < 0 || i >= src.size(dim))
            throw Error("copy_pruned_weights: kept index " + std::to_string(i) + " out of range for '" + name +
                        "' of shape " + shape_str(src));
        }
        at::Tensor ix = at::tensor(at::ArrayRef<int64_t>(idx), at::kLong).to(src.device());
        src = src.index_select(dim, ix);
      }
    }
    if (src.sizes() != dst.sizes()) {
      throw Error("copy_pruned_weights: shape mismatch for '" + name + "': the pruned source is " + shape_str(src) +
                  ", the new model expects " + shape_str(dst));
    }
    dst.copy_(src);
  };
  for (const auto& p : to.named_parameters(/*recurse=*/true)) copy_one(p.key(), p.value());
  for (const auto& b : to.named_buffers(/*recurse=*/true)) copy_one(b.key(), b.value());
}

ExtractedNetwork extract_pruned(const Backbone& gated, const at::Tensor& gates) {
  const auto& layers = gated.gated_layers();
  const int64_t total = gated.total_gate_width();
  if (!gates.defined() || gates.dim() != 1 || gates.size(0) != total) {
    throw Error("extract_pruned: expected a gate vector of shape [" + std::to_string(total) + "], got " +
                (gates.defined() ? shape_str(gates) : std::string("an undefined tensor")));
  }
  at::Tensor g = gates.detach().to(at::kCPU, at::kFloat).contiguous();
  ExtractedNetwork out;
  std::vector<int64_t> widths;
  int64_t offset = 0;
  for (const auto& l : layers) {
    at::Tensor s = g.narrow(0, offset, l.width);
    const float* v = s.data_ptr<float>();
    std::vector<int64_t> idx;
    for (int64_t i = 0; i < l.width; ++i)
      if (v[i] > 0.5f) idx.push_back(i);
    if (idx.empty()) idx.push_back(s.argmax().item<int64_t>());  // never zero channels: the strongest gate
    widths.push_back(static_cast<int64_t>(idx.size()));
    out.kept_indices.push_back(std::move(idx));
    offset += l.width;
  }

  out.model = gated.with_widths(widths);
  if (!out.model) throw Error("extract_pruned: with_widths returned no network");
  // Same device / dtype and mode as the source.
  auto params = gated.parameters();
  if (!params.empty()) out.model->to(params.front().device(), params.front().scalar_type());
  out.model->train(gated.is_training());
  copy_pruned_weights(gated, *out.model, out.kept_indices);
  out.spec = out.model->structure();
  return out;
}


}  // namespace isp
