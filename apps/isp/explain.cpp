// `isp explain`: rebuilds a finished run, takes its last trained AEM selector and writes the saliency figure
// of the paper (input | mask distribution P | input * P | a sampled mask s ~ P | input * s) for the first N
// test images, per-row PNGs, the RBF parameters as JSON, and how well the maps explain (docs/method.md §9):
// deletion/insertion curves (curves.png), per-image AUCs and mass on object (params.json, the row captions) and
// the metrics over the images shown (saliency_metrics.json).
#include "explain.h"

#include <torch/torch.h>

#include <algorithm>
#include <array>
#include <cctype>
#include <cmath>
#include <cstdio>
#include <filesystem>
#include <vector>

#define STB_IMAGE_WRITE_IMPLEMENTATION
#include <stb/stb_image_write.h>
#include <stb/stb_easy_font.h>

#include "isp/interfaces/dataset.h"
#include "isp/artifacts.h"
#include "isp/registry/number_text.h"
#include "isp/registry/recipe.h"
#include "isp/registry/registry.h"
#include "isp/runner.h"
#include "isp/saliency_metrics.h"
#include "isp/selector.h"

namespace fs = std::filesystem;
using isp::json;

namespace isp_app {
namespace {

struct Image {
  int w = 0, h = 0;
  std::vector<uint8_t> px;  // RGB
  Image(int w_, int h_, uint8_t fill = 255) : w(w_), h(h_), px(static_cast<std::size_t>(w_) * h_ * 3, fill) {}
  void set(int x, int y, const std::array<uint8_t, 3>& c) {
    if (x < 0 || y < 0 || x >= w || y >= h) return;
    uint8_t* p = &px[(static_cast<std::size_t>(y) * w + x) * 3];
    p[0] = c[0], p[1] = c[1], p[2] = c[2];
  }
  void fill_rect(int x0, int y0, int x1, int y1, const std::array<uint8_t, 3>& c) {
    for (int y = y0; y < y1; ++y)
      for (int x = x0; x < x1; ++x) set(x, y, c);
  }
  void blit(const Image& src, int ox, int oy) {
    for (int y = 0; y < src.h; ++y)
      for (int x = 0; x < src.w; ++x) {
        const uint8_t* p = &src.px[(static_cast<std::size_t>(y) * src.w + x) * 3];
        set(ox + x, oy + y, {p[0], p[1], p[2]});
      }
  }
  Image crop(int x0, int y0, int cw, int ch) const {
    Image out(cw, ch);
    for (int y = 0; y < ch; ++y)
      for (int x = 0; x < cw; ++x) {
        const uint8_t* p = &px[(static_cast<std::size_t>(y0 + y) * w + x0 + x) * 3];
        out.set(x, y, {p[0], p[1], p[2]});
      }
    return out;
  }
  void save(const std::string& path) const {
    if (!stbi_write_png(path.c_str(), w, h, 3, px.data(), w * 3)) throw isp::Error(path + ": cannot write PNG");
  }
};

// Text from stb_easy_font's quads (axis-aligned rectangles), scaled by `scale`.
void draw_text(Image& img, int x, int y, const std::string& text, int scale, const std::array<uint8_t, 3>& c) {
  static char buffer[99999];
  int quads = stb_easy_font_print(0, 0, const_cast<char*>(text.c_str()), nullptr, buffer, sizeof buffer);
  for (int q = 0; q < quads; ++q) {
    float x0 = 1e9f, y0 = 1e9f, x1 = -1e9f, y1 = -1e9f;
    for (int v = 0; v < 4; ++v) {
      const float* f = reinterpret_cast<const float*>(buffer + (q * 4 + v) * 16);
      x0 = std::min(x0, f[0]), x1 = std::max(x1, f[0]), y0 = std::min(y0, f[1]), y1 = std::max(y1, f[1]);
    }
    img.fill_rect(x + static_cast<int>(x0 * scale), y + static_cast<int>(y0 * scale), x + static_cast<int>(x1 * scale),
                  y + static_cast<int>(y1 * scale), c);
  }
}

// Viridis, linearly interpolated between five anchors.
std::array<uint8_t, 3> viridis(float t) {
  static const float a[5][3] = {{68, 1, 84}, {59, 82, 139}, {33, 145, 140}, {94, 201, 98}, {253, 231, 37}};
  t = std::clamp(t, 0.0f, 1.0f) * 4.0f;
  int i = std::min(3, static_cast<int>(t));
  float f = t - static_cast<float>(i);
  std::array<uint8_t, 3> c{};
  for (int k = 0; k < 3; ++k) c[k] = static_cast<uint8_t>(std::lround(a[i][k] + f * (a[i + 1][k] - a[i][k])));
  return c;
}

// [C,H,W] float in [0,1] (C = 1 or 3) -> upscaled tile. `cmap`: map a 1-channel tensor through viridis.
Image tile(const at::Tensor& chw, bool cmap) {
  at::Tensor t = chw.detach().to(at::kCPU).to(at::kFloat).clamp(0, 1).contiguous();
  const int c = static_cast<int>(t.size(0)), h = static_cast<int>(t.size(1)), w = static_cast<int>(t.size(2));
  auto a = t.accessor<float, 3>();
  Image out(w * kScale, h * kScale);
  for (int y = 0; y < h; ++y)
    for (int x = 0; x < w; ++x) {
      std::array<uint8_t, 3> col{};
      if (cmap) {
        col = viridis(a[0][y][x]);
      } else {
        for (int k = 0; k < 3; ++k) col[k] = static_cast<uint8_t>(std::lround(255.0f * a[c == 3 ? k : 0][y][x]));
      }
      out.fill_rect(x * kScale, y * kScale, (x + 1) * kScale, (y + 1) * kScale, col);
    }
  return out;
}

// A red cross at the RBF centre and a circle of radius sigma (grid pixel units) on a tile.
void mark_rbf(Image& img, int ox, int oy, int tile_px, double c_row, double c_col, double sigma) {
  const std::array<uint8_t, 3> red{230, 30, 30};
  auto dot = [&](int x, int y) {  // clipped to the tile
    if (x >= ox && y >= oy && x < ox + tile_px && y < oy + tile_px) img.set(x, y, red);
  };
  const int cx = ox + static_cast<int>(std::lround((c_col + 0.5) * kScale));
  const int cy = oy + static_cast<int>(std::lround((c_row + 0.5) * kScale));
  for (int d = -6; d <= 6; ++d)
    for (int t = -1; t <= 0; ++t) dot(cx + d, cy + t), dot(cx + t, cy + d);
  const double r = sigma * kScale;
  const int steps = std::max(32, static_cast<int>(2 * M_PI * r));
  for (int i = 0; i < steps; ++i) {
    double a = 2 * M_PI * i / steps;
    dot(cx + static_cast<int>(std::lround(r * std::cos(a))), cy + static_cast<int>(std::lround(r * std::sin(a))));
  }
}

void draw_line(Image& img, int x0, int y0, int x1, int y1, const std::array<uint8_t, 3>& c, int thickness = 1) {
  const int steps = std::max({std::abs(x1 - x0), std::abs(y1 - y0), 1});
  for (int k = 0; k <= steps; ++k) {
    const int x = x0 + (x1 - x0) * k / steps, y = y0 + (y1 - y0) * k / steps;
    img.fill_rect(x - thickness / 2, y - thickness / 2, x - thickness / 2 + thickness, y - thickness / 2 + thickness, c);
  }
}

// Deletion and insertion curves (docs/method.md §9) of the map next to a random and a centred-Gaussian ordering:
// two panels, probability of the predicted class (0..1) against the fraction of pixels removed / revealed.
Image curves_figure(const isp::SaliencyReport& r) {
  constexpr int kPanelW = 300, kPanelH = 210, kLeft = 34, kTop = 30, kPlotW = 250, kPlotH = 150;
  Image img(2 * kPanelW, kPanelH + 34);
  const std::array<uint8_t, 3> black{0, 0, 0}, grey{170, 170, 170}, colours[3] = {{31, 90, 200}, {140, 140, 140}, {230, 130, 20}};
  const isp::CurvePair* pairs[3] = {&r.map, &r.random, &r.centred};
  for (int panel = 0; panel < 2; ++panel) {
    const int ox = panel * kPanelW + kLeft, oy = kTop;
    char title[160];
    std::snprintf(title, sizeof title, "%s AUC: map %.3f, random %.3f, centred %.3f", panel == 0 ? "deletion" : "insertion",
                  panel == 0 ? r.map.deletion_auc : r.map.insertion_auc,
                  panel == 0 ? r.random.deletion_auc : r.random.insertion_auc,
                  panel == 0 ? r.centred.deletion_auc : r.centred.insertion_auc);
    draw_text(img, panel * kPanelW + 6, 8, title, 1, black);
    for (int t = 0; t <= 4; ++t) {  // grid every 0.25
      const int gy = oy + kPlotH - t * kPlotH / 4, gx = ox + t * kPlotW / 4;
      draw_line(img, ox, gy, ox + kPlotW, gy, grey);
      draw_line(img, gx, oy, gx, oy + kPlotH, grey);
      char lab[8];
      std::snprintf(lab, sizeof lab, "%.2g", t / 4.0);
      draw_text(img, ox - 24, gy - 4, lab, 1, black);
      draw_text(img, gx - 6, oy + kPlotH + 6, lab, 1, black);
    }
    draw_line(img, ox, oy, ox, oy + kPlotH, black);
    draw_line(img, ox, oy + kPlotH, ox + kPlotW, oy + kPlotH, black);
    draw_text(img, ox + 40, oy + kPlotH + 20, panel == 0 ? "fraction of pixels removed" : "fraction of pixels revealed", 1, black);
    for (int o = 2; o >= 0; --o) {
      const std::vector<double>& c = panel == 0 ? pairs[o]->deletion : pairs[o]->insertion;
      for (std::size_t k = 1; k < c.size(); ++k) {
        auto px = [&](std::size_t i) { return ox + static_cast<int>(std::lround(kPlotW * double(i) / double(c.size() - 1))); };
        auto py = [&](double v) { return oy + kPlotH - static_cast<int>(std::lround(kPlotH * std::clamp(v, 0.0, 1.0))); };
        draw_line(img, px(k - 1), py(c[k - 1]), px(k), py(c[k]), colours[o], o == 0 ? 2 : 1);
      }
    }
  }
  const char* names[3] = {"saliency map", "random order", "centred Gaussian"};
  for (int o = 0; o < 3; ++o) {
    const int lx = 40 + o * 170, ly = kPanelH + 18;
    img.fill_rect(lx, ly, lx + 20, ly + 3, colours[o]);
    draw_text(img, lx + 26, ly - 3, names[o], 1, black);
  }
  return img;
}

std::string safe_name(const std::string& s) {
  std::string out;
  for (char ch : s) out += (std::isalnum(static_cast<unsigned char>(ch)) || ch == '-' || ch == '_') ? ch : '_';
  return out.empty() ? "class" : out;
}

std::string find_dataset_node(isp::RestoredRun& run, const std::string& stage_name) {
  const json nodes = run.recipe.doc.value("nodes", json::object());
  if (nodes.contains(stage_name) && nodes[stage_name].contains("data")) {
    std::string ref = isp::BuildContext::ref_name(nodes[stage_name]["data"]);
    if (!ref.empty()) return ref;
  }
  for (auto it = nodes.begin(); it != nodes.end(); ++it)
    if (run.ctx->kind_of_node(it.key()) == "dataset") return it.key();
  throw isp::Error(run.work_dir + ": the recipe has no dataset node");
}

}  // namespace

int explain(isp::Registry& reg, const ExplainOptions& o) {
  std::string work = o.run_dir;
  if (work.empty()) {
    if (o.checkpoint.empty()) throw isp::Error("explain: give --run WORK_DIR or --checkpoint FILE");
    // A checkpoint lives in <run>/<stage>/<file>.pt: explain the run folder that holds it.
    fs::path p = fs::absolute(o.checkpoint);
    if (!fs::exists(p)) throw isp::Error(o.checkpoint + ": checkpoint not found");
    work = p.parent_path().parent_path().string();
    if (!fs::exists(fs::path(work) / "recipe.resolved.json"))
      throw isp::Error(o.checkpoint + ": not inside a run folder (expected " + work + "/recipe.resolved.json)");
  }
  if (o.label != "ground_truth" && o.label != "predicted")
    throw isp::Error("explain: --label must be ground_truth or predicted, got " + o.label);
  isp::RestoredRun run = isp::restore_run(reg, work);

  std::string stage_name;
  const auto aem = run.latest<isp::ExplanationModel>(&stage_name);
  if (!aem) throw isp::Error(work + ": no finished stage of this run produced an explanation model (TrainSelector)");
  std::shared_ptr<isp::SelectorNet> sel = aem->selector;
  if (o.network == "pruned") {
    // The pruned network's own maps: the same filter, decoder and head on its encoder (as the export stage
    // measures them), from the run's last pruning or finetuning stage.
    const auto pruned = run.latest<isp::PrunedNetwork>();
    if (!pruned) throw isp::Error(work + ": --network pruned: no finished stage of this run produced a pruned network");
    sel = std::make_shared<isp::SelectorNet>(pruned->network, sel->filter, sel->decoder, sel->head, sel->sampler);
  } else if (o.network != "original") {
    throw isp::Error("explain: --network must be original or pruned, got " + o.network);
  }
  const std::string data_node = find_dataset_node(run, stage_name);
  const isp::DataBundle& data = run.ctx->node<isp::Dataset>(data_node)->data();
  if (data.test.size() == 0) throw isp::Error("explain: the dataset '" + data_node + "' has no test images");
  const int64_t n = std::min<int64_t>(o.images, data.test.size());
  if (n < 1) throw isp::Error("explain: --images must be at least 1");

  const c10::Device dev = run.runtime.device;
  torch::NoGradGuard ng;
  sel->to(dev);
  sel->eval();
  sel->encoder->to(dev);
  sel->encoder->eval();
  at::Tensor x = data.test.images.slice(0, 0, n).to(dev);
  at::Tensor y = data.test.labels.slice(0, 0, n).to(dev);
  at::Tensor logits = sel->encoder->forward(x);
  at::Tensor pred = logits.argmax(1);
  isp::MaskDistribution dist = sel->forward(x, o.label == "predicted" ? pred : y, false);
  at::Tensor P = dist.probs;
  torch::manual_seed(o.seed);
  at::Tensor s = sel->sampler->sample(P);

  // Back to pixels: x * std + mean per channel.
  const int64_t C = x.size(1);
  std::vector<double> mean = data.mean, stdv = data.std;
  if (mean.empty()) mean = {0.0};
  if (stdv.empty()) stdv = {1.0};
  if (mean.size() == 1) mean.resize(C, mean[0]);
  if (stdv.size() == 1) stdv.resize(C, stdv[0]);
  auto opt = torch::TensorOptions().dtype(x.scalar_type()).device(dev);
  at::Tensor m = torch::tensor(std::vector<float>(mean.begin(), mean.end()), opt).view({1, C, 1, 1});
  at::Tensor sd = torch::tensor(std::vector<float>(stdv.begin(), stdv.end()), opt).view({1, C, 1, 1});
  auto to_pixels = [&](const at::Tensor& t) { return (t * sd + m).clamp(0, 1).cpu(); };
  at::Tensor img = to_pixels(x), img_p = to_pixels(x * P), img_s = to_pixels(x * s);
  at::Tensor Pc = P.cpu(), sc = s.cpu();
  at::Tensor readable = dist.readable.defined() ? dist.readable.to(at::kCPU).to(at::kDouble) : at::Tensor();
  // How well these maps explain (docs/method.md §9), per image and over the images shown.
  isp::SaliencyMetricOptions metric_opt;
  metric_opt.seed = o.seed;
  const isp::SaliencyReport metrics =
      isp::measure_selector_saliency(*sel, x, dist, data, metric_opt);
  at::Tensor params = dist.params.defined() ? dist.params.to(at::kCPU).to(at::kDouble).flatten(1) : at::Tensor();

  const int side = static_cast<int>(x.size(2));
  const int tile_px = kScale * side;
  Image fig(figure_width(side), figure_height(side, static_cast<int>(n)));
  const char* titles[5] = {"input", "mask distribution P", "input * P", "sampled mask s", "input * s"};
  for (int c = 0; c < 5; ++c) draw_text(fig, kGap + c * (tile_px + kGap), 4, titles[c], 1, {0, 0, 0});

  fs::create_directories(o.out_dir);
  json out = json::array();
  for (int64_t i = 0; i < n; ++i) {
    const int64_t label = y[i].item<int64_t>(), predicted = pred[i].item<int64_t>();
    auto name_of = [&](int64_t k) {
      return k >= 0 && k < static_cast<int64_t>(data.class_names.size()) ? data.class_names[k] : std::to_string(k);
    };
    const int row_y = kHeader + static_cast<int>(i) * (kStrip + tile_px + kGap);
    std::string caption = "#" + std::to_string(i) + "  " + name_of(label) +
                          (predicted != label ? "  (predicted " + name_of(predicted) + ")" : "");
    draw_text(fig, kGap, row_y + 3, caption, 2, {0, 0, 0});
    {
      char right[96];
      if (metrics.mass_on_object)
        std::snprintf(right, sizeof right, "mass on object %.2f  deletion AUC %.2f", metrics.mass_on_object_per_image[i],
                      metrics.deletion_auc_per_image[i]);
      else
        std::snprintf(right, sizeof right, "deletion AUC %.2f", metrics.deletion_auc_per_image[i]);
      const int width = stb_easy_font_width(right);
      draw_text(fig, fig.w - kGap - width, row_y + 7, right, 1, {60, 60, 60});
    }
    const int ty = row_y + kStrip;
    Image tiles[5] = {tile(img[i], false), tile(Pc[i], true), tile(img_p[i], false), tile(sc[i], false),
                      tile(img_s[i], false)};
    for (int c = 0; c < 5; ++c) fig.blit(tiles[c], kGap + c * (tile_px + kGap), ty);
    json e = {{"index", i}, {"label", label}, {"class_name", name_of(label)}, {"predicted", predicted},
              {"predicted_name", name_of(predicted)}, {"conditioned_on", o.label},
              {"mask_area", Pc[i].mean().item<double>()},
              {"deletion_auc", metrics.deletion_auc_per_image[i]},
              {"insertion_auc", metrics.insertion_auc_per_image[i]},
              {"mass_on_object", metrics.mass_on_object ? json(metrics.mass_on_object_per_image[i]) : json(nullptr)}};
    if (readable.defined() && readable.size(1) >= 3 && sel->head->predicts_rbf_parameters()) {
      const double cr = readable[i][0].item<double>(), cc = readable[i][1].item<double>(), sg = readable[i][2].item<double>();
      e["c_row"] = cr, e["c_col"] = cc, e["sigma"] = sg;
      for (int c = 1; c <= 2; ++c) mark_rbf(fig, kGap + c * (tile_px + kGap), ty, tile_px, cr, cc, sg);
    } else {
      e["c_row"] = e["c_col"] = e["sigma"] = nullptr;
    }
    json u = json::array();
    if (params.defined())
      for (int64_t k = 0; k < params.size(1); ++k) u.push_back(params[i][k].item<double>());
    e["u"] = u;
    out.push_back(e);
    const std::string row_file = "row_" + std::to_string(i) + "_" + safe_name(name_of(label)) + ".png";
    fig.crop(0, row_y, fig.w, kStrip + tile_px + kGap).save((fs::path(o.out_dir) / row_file).string());
    out.back()["file"] = row_file;
  }
  fig.save((fs::path(o.out_dir) / "saliency.png").string());
  curves_figure(metrics).save((fs::path(o.out_dir) / "curves.png").string());
  isp::write_file_atomic((fs::path(o.out_dir) / "params.json").string(), out.dump(2) + "\n");
  const json summary = metrics.to_json();
  isp::write_file_atomic((fs::path(o.out_dir) / "saliency_metrics.json").string(), summary.dump(2) + "\n");
  // "n/a" where a figure is undefined: the object figures when the dataset defines no foreground.
  const auto show = [](const std::optional<double>& v, int digits) { return isp::fixed_or_na(v, digits); };
  std::printf("saliency of these %lld images: deletion AUC %.3f (random %.3f, centred %.3f), insertion AUC %.3f (random "
              "%.3f, centred %.3f), mass on object %s (foreground share %s), centre spread row %s px, col %s px "
              "(the objects' own: %s / %s px), centre to object %s px (image centre %s px)\n",
              static_cast<long long>(n), metrics.map.deletion_auc, metrics.random.deletion_auc,
              metrics.centred.deletion_auc, metrics.map.insertion_auc, metrics.random.insertion_auc,
              metrics.centred.insertion_auc, show(metrics.mass_on_object, 3).c_str(),
              show(metrics.foreground_share, 3).c_str(), show(metrics.centre_std_row, 2).c_str(),
              show(metrics.centre_std_col, 2).c_str(), show(metrics.object_centroid_std_row, 2).c_str(),
              show(metrics.object_centroid_std_col, 2).c_str(), show(metrics.centre_to_object, 2).c_str(),
              show(metrics.image_centre_to_object, 2).c_str());
  std::printf("%s: %lld images from stage '%s' (data '%s'); figure %dx%d\n", o.out_dir.c_str(),
              static_cast<long long>(n), stage_name.c_str(), data_node.c_str(), fig.w, fig.h);
  return 0;
}

}  // namespace isp_app
