// Faithfulness and localisation of saliency maps (isp/saliency_metrics.h, docs/method.md §9).
#include "isp/saliency_metrics.h"
#include "isp/distributed.h"

#include <torch/torch.h>

#include <ATen/CPUGeneratorImpl.h>

#include <cmath>

#include "isp/interfaces/dataset.h"
#include "isp/registry/error.h"
#include "isp/selector.h"

namespace isp {
namespace {

// Rank of every pixel under an ordering given as scores (higher first; ties by pixel index): [n, HW] int64.
at::Tensor ranks_of(const at::Tensor& scores) {
  const at::Tensor order = std::get<1>(scores.sort(/*stable=*/true, /*dim=*/1, /*descending=*/true));
  at::Tensor ranks = at::empty_like(order);
  ranks.scatter_(1, order, at::arange(order.size(1), order.options()).expand_as(order).contiguous());
  return ranks;
}

// Trapezoidal area under a curve sampled at 0, 1/S, ..., 1: [n, S+1] -> [n].
at::Tensor auc_of(const at::Tensor& curve) {
  const int64_t s = curve.size(1) - 1;
  return (curve.sum(1) - 0.5 * (curve.select(1, 0) + curve.select(1, s))) / static_cast<double>(s);
}

std::vector<double> to_vector(const at::Tensor& t) {
  at::Tensor c = t.to(at::kCPU).to(at::kDouble).contiguous();
  return std::vector<double>(c.data_ptr<double>(), c.data_ptr<double>() + c.numel());
}

// Deletion and insertion curves [n, steps+1] of one ordering, for the probability of class `cls`. Their ends
// are the same for every ordering -- nothing removed is the whole image, everything removed the empty one -- so
// the caller passes those probabilities (`p_whole`, `p_empty`: [n]) and only the steps in between are run.
std::pair<at::Tensor, at::Tensor> curves(const std::function<at::Tensor(const at::Tensor&)>& logits,
                                         const at::Tensor& x, const at::Tensor& ranks, const at::Tensor& cls,
                                         int64_t steps, const at::Tensor& p_whole, const at::Tensor& p_empty) {
  const int64_t n = x.size(0), h = x.size(2), w = x.size(3), hw = h * w;
  std::vector<at::Tensor> del{p_whole}, ins{p_empty};
  for (int64_t k = 1; k < steps; ++k) {
    // The first round(k*HW/steps) pixels of the ordering are the ones removed (deletion) / revealed (insertion).
    const int64_t cut = (k * hw + steps / 2) / steps;
    const at::Tensor first = ranks.lt(cut).view({n, 1, h, w}).to(x.scalar_type());
    const at::Tensor both = at::cat({x * (1 - first), x * first}, 0);
    const at::Tensor p = at::softmax(logits(both).to(at::kFloat), 1);
    const at::Tensor pc = p.gather(1, at::cat({cls, cls}, 0).view({-1, 1})).view({2, n});
    del.push_back(pc[0]);
    ins.push_back(pc[1]);
  }
  del.push_back(p_empty);
  ins.push_back(p_whole);
  return {at::stack(del, 1), at::stack(ins, 1)};
}

// A centred isotropic Gaussian exp(-D/(2 sigma^2)) on an h x w grid, per image sigma: [n, h, w].
at::Tensor centred_gaussian(const at::Tensor& sigma, int64_t h, int64_t w) {
  const auto opts = sigma.options();
  const at::Tensor i = at::arange(h, opts).view({1, h, 1}) - (h - 1) / 2.0;
  const at::Tensor j = at::arange(w, opts).view({1, 1, w}) - (w - 1) / 2.0;
  const at::Tensor d = i.pow(2) + j.pow(2);
  return at::exp(-d / (2 * sigma.view({-1, 1, 1}).pow(2)));
}

}  // namespace

double weights_fingerprint(const torch::nn::Module& m) {
  // A serial sum in double over CPU copies: the same weights give the same value in any process, whatever the
  // thread count or kernels (a parallel reduction would not).
  double fp = 0;
  int64_t index = 0;
  auto add = [&](const at::Tensor& t) {
    ++index;
    const at::Tensor c = t.detach().to(at::kCPU).to(at::kDouble).contiguous();
    const double* v = c.data_ptr<double>();
    double plain = 0, weighted = 0;
    for (int64_t j = 0; j < c.numel(); ++j) {
      plain += v[j];
      weighted += v[j] * static_cast<double>(j % 97 + 1);
    }
    fp += static_cast<double>(index) * (plain + 1e-3 * weighted + static_cast<double>(c.numel()));
  };
  for (const auto& p : m.parameters()) add(p);
  for (const auto& b : m.buffers()) add(b);
  return fp;
}

at::Tensor foreground_of(const at::Tensor& images, const std::vector<double>& mean, const std::vector<double>& std,
                         double above) {
  const int64_t c = images.size(1);
  auto per_channel = [&](const std::vector<double>& v, double fallback) {
    std::vector<float> out(static_cast<std::size_t>(c), static_cast<float>(v.empty() ? fallback : v[0]));
    for (std::size_t k = 0; k < v.size() && k < out.size(); ++k) out[k] = static_cast<float>(v[k]);
    return at::tensor(out, images.options().dtype(at::kFloat)).view({1, c, 1, 1});
  };
  const at::Tensor raw = images.to(at::kFloat) * per_channel(std, 1.0) + per_channel(mean, 0.0);
  return std::get<0>(raw.gt(above).max(1));  // any channel
}

SaliencyReport measure_saliency(const std::function<at::Tensor(const at::Tensor&)>& logits, const SaliencyInputs& in,
                                const SaliencyMetricOptions& opt) {
  if (!in.images.defined() || in.images.dim() != 4) throw Error("measure_saliency: images must be [n, C, H, W]");
  const int64_t n = in.images.size(0), h = in.images.size(2), w = in.images.size(3);
  const at::Tensor maps = in.maps.reshape({n, h, w}).to(at::kFloat);
  if (opt.steps < 1 || opt.steps > h * w) throw Error("measure_saliency: steps must lie in 1..H*W");
  SaliencyReport r;
  r.images = n;
  r.steps = opt.steps;
  if (n == 0) return r;
  torch::NoGradGuard no_grad;
  const auto fopts = maps.options();

  // Orderings: the maps, random (seeded, independent of the device), a centred Gaussian.
  at::Generator gen = at::detail::createCPUGenerator(opt.seed);
  const at::Tensor random_scores = at::rand({n, h * w}, gen, at::TensorOptions().dtype(at::kFloat)).to(fopts.device());
  const at::Tensor one_sigma = at::full({1}, static_cast<double>(std::max(h, w)), fopts);
  const at::Tensor centred_scores = centred_gaussian(one_sigma, h, w).view({1, h * w}).expand({n, h * w});
  const at::Tensor rank_map = ranks_of(maps.view({n, h * w})), rank_random = ranks_of(random_scores),
                   rank_centred = ranks_of(centred_scores.contiguous());

  // Curves measured before for the first k images are taken as they are; only the others are run.
  const int64_t k = in.known_curves.defined() && in.known_curves.dim() > 0 ? in.known_curves.size(0) : 0;
  if (in.known_curves.defined() &&
      (in.known_curves.dim() != 4 || k > n || in.known_curves.size(1) != 3 || in.known_curves.size(2) != 2 ||
       in.known_curves.size(3) != opt.steps + 1)) {
    std::string shape;
    for (int64_t d : in.known_curves.sizes()) shape += (shape.empty() ? "" : ", ") + std::to_string(d);
    throw Error("measure_saliency: known_curves must be [k <= " + std::to_string(n) + ", 3, 2, " +
                std::to_string(opt.steps + 1) + "], got [" + shape + "]");
  }
  // Data-parallel: each rank draws the curves of its share of the images (the costly part: 3 orderings x steps
  // classifier passes), and every rank gathers all of them.
  const auto [first, last] = dist::active() ? dist::shard_range(n - k, dist::rank(), dist::world_size())
                                             : std::pair<int64_t, int64_t>{0, n - k};
  std::vector<at::Tensor> cd[3], ci[3];
  for (int64_t b0 = k + first; b0 < k + last; b0 += opt.batch_size) {
    const int64_t b = std::min(opt.batch_size, k + last - b0);
    const at::Tensor x = in.images.narrow(0, b0, b);
    // The whole image and the empty one (every pixel removed: the value 0) in one call: the class the classifier
    // predicts on the whole image, and both ends of every curve.
    const at::Tensor ends = at::softmax(logits(at::cat({x, at::zeros_like(x)}, 0)).to(at::kFloat), 1);
    const at::Tensor cls = ends.narrow(0, 0, b).argmax(1);
    const at::Tensor p_ends = ends.gather(1, at::cat({cls, cls}, 0).view({-1, 1})).view({2, b});
    const at::Tensor* ranks[3] = {&rank_map, &rank_random, &rank_centred};
    for (int o = 0; o < 3; ++o) {
      auto [d, i] = curves(logits, x, ranks[o]->narrow(0, b0, b), cls, opt.steps, p_ends[0], p_ends[1]);
      cd[o].push_back(d);
      ci[o].push_back(i);
    }
  }
  const at::Tensor known = k > 0 ? in.known_curves.to(fopts.device()).to(at::kDouble) : at::Tensor();
  std::vector<at::Tensor> all;  // per ordering: [n, 2, steps+1]
  CurvePair* pairs[3] = {&r.map, &r.random, &r.centred};
  for (int o = 0; o < 3; ++o) {
    const auto share = [&](std::vector<at::Tensor>& parts, int64_t kind) {
      at::Tensor t = parts.empty() ? at::zeros({0, opt.steps + 1}, fopts) : at::cat(parts, 0).to(at::kFloat);
      t = dist::allgather_rows(t, n - k, "saliency curves").to(at::kDouble);
      return k > 0 ? at::cat({known.select(1, o).select(1, kind), t}, 0) : t;
    };
    const at::Tensor d = share(cd[o], 0), i = share(ci[o], 1);
    all.push_back(at::stack({d, i}, 1));
    pairs[o]->deletion = to_vector(d.mean(0));
    pairs[o]->insertion = to_vector(i.mean(0));
    pairs[o]->deletion_auc = auc_of(d).mean().item<double>();
    pairs[o]->insertion_auc = auc_of(i).mean().item<double>();
    if (o == 0) {
      r.deletion_auc_per_image = to_vector(auc_of(d));
      r.insertion_auc_per_image = to_vector(auc_of(i));
    }
  }
  r.curves = at::stack(all, 1).to(at::kCPU);

  const bool has_centres = in.centres.defined() && in.centres.dim() == 2 && in.centres.size(1) >= 2;
  const at::Tensor area = maps.view({n, -1}).mean(1);  // [n]
  r.mean_map_area = area.mean().item<double>();
  if (in.foreground.defined()) {
    const at::Tensor fg = in.foreground.reshape({n, h, w}).to(at::kFloat);
    const at::Tensor mass = (maps * fg).view({n, -1}).sum(1) / maps.view({n, -1}).sum(1).clamp_min(1e-12);
    r.mass_on_object_per_image = to_vector(mass);
    r.mass_on_object = mass.mean().item<double>();
    r.foreground_share = fg.mean().item<double>();
    // The centred Gaussian whose mean value equals the map's area: sigma by bisection (mean value grows with it).
    at::Tensor lo = at::full({n}, 0.05, fopts), hi = at::full({n}, 8.0 * static_cast<double>(std::max(h, w)), fopts);
    const at::Tensor target = area.clamp(1e-6, 1.0 - 1e-6);
    for (int it = 0; it < 40; ++it) {
      const at::Tensor mid = 0.5 * (lo + hi);
      const at::Tensor too_wide = centred_gaussian(mid, h, w).view({n, -1}).mean(1).gt(target);
      hi = at::where(too_wide, mid, hi);
      lo = at::where(too_wide, lo, mid);
    }
    const at::Tensor g = centred_gaussian(0.5 * (lo + hi), h, w);
    r.mass_on_object_centred = ((g * fg).view({n, -1}).sum(1) / g.view({n, -1}).sum(1)).mean().item<double>();
    // Where the objects themselves sit: the spread of their foreground centroids is what a map that follows each
    // object exactly would show as centre spread (images without foreground are left out).
    const at::Tensor count = fg.view({n, -1}).sum(1);
    const at::Tensor has = count.gt(0);
    if (has.any().item<bool>()) {
      const at::Tensor rows = at::arange(h, fopts).view({1, h, 1}), cols = at::arange(w, fopts).view({1, 1, w});
      const at::Tensor cr = (fg * rows).view({n, -1}).sum(1) / count.clamp_min(1);
      const at::Tensor cc = (fg * cols).view({n, -1}).sum(1) / count.clamp_min(1);
      r.object_centroid_std_row = cr.masked_select(has).to(at::kDouble).std(/*unbiased=*/false).item<double>();
      r.object_centroid_std_col = cc.masked_select(has).to(at::kDouble).std(/*unbiased=*/false).item<double>();
      if (has_centres) {
        // How far each map's centre lies from its object's centroid, next to the same distance from the image's
        // centre: a map that follows the objects beats that constant point.
        const at::Tensor c = in.centres.to(fopts.dtype());
        const at::Tensor dist = (c.select(1, 0) - cr).pow(2).add((c.select(1, 1) - cc).pow(2)).sqrt();
        const at::Tensor dist0 = (cr - 0.5 * (h - 1)).pow(2).add((cc - 0.5 * (w - 1)).pow(2)).sqrt();
        r.centre_to_object = dist.masked_select(has).to(at::kDouble).mean().item<double>();
        r.image_centre_to_object = dist0.masked_select(has).to(at::kDouble).mean().item<double>();
      }
    }
  }
  if (has_centres) {
    const at::Tensor c = in.centres.to(at::kDouble);
    r.centre_std_row = c.select(1, 0).std(/*unbiased=*/false).item<double>();
    r.centre_std_col = c.select(1, 1).std(/*unbiased=*/false).item<double>();
  }
  return r;
}

json SaliencyReport::to_json(bool with_curves) const {
  auto opt = [](const std::optional<double>& v) { return v ? json(*v) : json(nullptr); };
  auto pair = [&](const CurvePair& p) {
    json j = {{"deletion_auc", p.deletion_auc}, {"insertion_auc", p.insertion_auc}};
    if (with_curves) j["deletion_curve"] = p.deletion, j["insertion_curve"] = p.insertion;
    return j;
  };
  return {{"images", images},
          {"steps", steps},
          {"deletion_auc", map.deletion_auc},
          {"insertion_auc", map.insertion_auc},
          {"map", pair(map)},
          {"random_order", pair(random)},
          {"centred_gaussian", pair(centred)},
          {"mass_on_object", opt(mass_on_object)},
          {"foreground_share", opt(foreground_share)},
          {"mass_on_object_centred_gaussian", opt(mass_on_object_centred)},
          {"centre_std_row_px", opt(centre_std_row)},
          {"centre_std_col_px", opt(centre_std_col)},
          {"object_centroid_std_row_px", opt(object_centroid_std_row)},
          {"object_centroid_std_col_px", opt(object_centroid_std_col)},
          {"centre_to_object_px", opt(centre_to_object)},
          {"image_centre_to_object_px", opt(image_centre_to_object)},
          {"mean_map_area", mean_map_area}};
}

namespace {
// The metrics of a selector's maps (and RBF centres, if any) of `images`, scored by its encoder in eval mode.
SaliencyReport selector_report(SelectorNet& sel, const at::Tensor& images, const at::Tensor& maps,
                               const at::Tensor& centres, const DataBundle& data, const SaliencyMetricOptions& opt,
                               const at::Tensor& known_curves = {}) {
  torch::NoGradGuard no_grad;
  const bool encoder_training = sel.encoder->is_training();
  sel.encoder->eval();
  SaliencyInputs in;
  in.images = images;
  in.maps = maps;
  in.centres = centres;
  in.known_curves = known_curves;
  if (data.foreground_above >= 0) in.foreground = foreground_of(images, data.mean, data.std, data.foreground_above);
  SaliencyReport report = measure_saliency([&](const at::Tensor& x) { return sel.encoder->forward(x); }, in, opt);
  sel.encoder->train(encoder_training);
  return report;
}

at::Tensor rbf_centres(const SelectorNet& sel, const MaskDistribution& d) {
  return sel.head->predicts_rbf_parameters() && d.readable.defined() ? d.readable.narrow(1, 0, 2) : at::Tensor();
}
}  // namespace

SaliencyReport measure_selector_saliency(SelectorNet& sel, const at::Tensor& images, const at::Tensor& labels,
                                        const DataBundle& data, const SaliencyMetricOptions& opt, int64_t batch_size,
                                        const at::Tensor& known_curves) {
  torch::NoGradGuard no_grad;
  const bool was_training = sel.is_training(), encoder_training = sel.encoder->is_training();
  sel.eval();
  sel.encoder->eval();
  const int64_t n = images.size(0);
  std::vector<at::Tensor> maps, centres;
  for (int64_t b0 = 0; b0 < n; b0 += batch_size) {
    const int64_t b = std::min(batch_size, n - b0);
    const at::Tensor x = images.narrow(0, b0, b);
    // One encoder pass: its logits give the predicted class (where no labels are given), its features the maps.
    BackboneFeatures f = sel.encoder->forward_features(x);
    const at::Tensor y = labels.defined() ? labels.narrow(0, b0, b) : f.logits.argmax(1);
    const MaskDistribution d = sel.decode(std::move(f.scales), y);
    maps.push_back(d.probs);
    const at::Tensor c = rbf_centres(sel, d);
    if (c.defined()) centres.push_back(c);
  }
  SaliencyReport report =
      selector_report(sel, images, at::cat(maps, 0), centres.empty() ? at::Tensor() : at::cat(centres, 0), data, opt,
                      known_curves);
  sel.train(was_training);
  sel.encoder->train(encoder_training);
  return report;
}

SaliencyReport measure_selector_saliency(SelectorNet& sel, const at::Tensor& images, const MaskDistribution& dist,
                                        const DataBundle& data, const SaliencyMetricOptions& opt) {
  if (!dist.probs.defined() || dist.probs.size(0) != images.size(0))
    throw Error("measure_selector_saliency: the mask distribution must hold one map per image");
  return selector_report(sel, images, dist.probs, rbf_centres(sel, dist), data, opt);
}

}  // namespace isp
