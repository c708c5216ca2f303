#pragma once
// How well saliency maps explain (docs/method.md §9): faithfulness (deletion / insertion AUC, RISE-style) next to
// the same curves for trivial maps, localisation (mass on the object), and how image-specific the maps are (the
// spread of RBF centres). Used by TrainSelector (test split), Export (original vs pruned) and `isp explain`.
//
// Deletion: pixels are removed in order of the map, most salient first, in `steps` equal chunks; the curve is
// the classifier's probability of the class it predicts on the whole image, and its area (trapezoids over the
// fraction removed, 0..1) is the deletion AUC -- lower is better. Insertion reveals pixels in the same order
// from an empty image -- higher is better. A removed pixel takes the value 0 of the normalised input (the
// data set's mean colour), the same value the AEM's masks x * s give a hidden pixel.
// Baselines, same images and classifier: a random ordering (seeded, per image) and a centred Gaussian (pixels by
// distance from the image centre, ties by index).
#include <functional>
#include <optional>
#include <vector>

#include <ATen/core/Tensor.h>

#include "isp/registry/options.h"

namespace torch { namespace nn { class Module; } }

namespace isp {

struct SaliencyMetricOptions {
  int64_t steps = 16;       // chunks of H*W/steps pixels
  int64_t batch_size = 64;  // images per classifier call (each call evaluates 2*batch inputs)
  uint64_t seed = 0;        // the random orderings
};

struct SaliencyInputs {
  at::Tensor images;      // [n, C, H, W], normalised, on the classifier's device
  at::Tensor maps;        // [n, 1, H, W] or [n, H, W], >= 0, higher = more important
  at::Tensor foreground;  // optional bool [n, H, W] (or [n,1,H,W]): the object's pixels
  at::Tensor centres;     // optional [n, >=2]: (row, col) of each map's centre (RBF heads)
  // Optional [k, 3, 2, steps+1], k <= n: SaliencyReport::curves of an earlier measurement of the first k images
  // with the same classifier, orderings and options (Export's "original" row repeats TrainSelector's). Their
  // classifier passes -- nearly all of the cost -- are skipped; everything else is computed from these inputs.
  at::Tensor known_curves;
};

struct CurvePair {
  std::vector<double> deletion, insertion;  // mean probability at 0, 1/steps, ..., 1 of the pixels
  double deletion_auc = 0, insertion_auc = 0;
};

struct SaliencyReport {
  int64_t images = 0;
  int64_t steps = 0;
  CurvePair map, random, centred;
  // Per image (for figures): the map's own deletion and insertion AUC.
  std::vector<double> deletion_auc_per_image, insertion_auc_per_image;
  // Every curve of every image, [n, 3, 2, steps+1] double: the orderings (map, random, centred) x (deletion,
  // insertion), for SaliencyInputs::known_curves. Not part of to_json().
  at::Tensor curves;
  // Share of each map's mass on foreground pixels (mean over images), the foreground's share of the image, and
  // the same mass for a centred Gaussian of the same area (mean map value). Empty without a foreground.
  std::optional<double> mass_on_object, foreground_share, mass_on_object_centred;
  std::vector<double> mass_on_object_per_image;
  // Spread of the centres across images (population std, pixels). Empty without centres.
  std::optional<double> centre_std_row, centre_std_col;
  // Spread of the objects' foreground centroids across the same images: the centre spread of a map that follows
  // each object exactly (on Fashion-MNIST about 1 px: garments sit in the middle). Empty without a foreground.
  std::optional<double> object_centroid_std_row, object_centroid_std_col;
  // Mean distance (px) from each map's centre to its object's foreground centroid, and from the image's centre to
  // the same centroids: localisation that a constant map cannot fake. Empty without centres or a foreground.
  std::optional<double> centre_to_object, image_centre_to_object;
  double mean_map_area = 0;
  json to_json(bool with_curves = true) const;
};

// `logits(x)` runs the classifier on a batch (no gradient needed). All inputs on one device.
ISP_API SaliencyReport measure_saliency(const std::function<at::Tensor(const at::Tensor&)>& logits,
                                        const SaliencyInputs& in, const SaliencyMetricOptions& opt = {});

class SelectorNet;
struct DataBundle;

// docs/method.md §9 for a selector's own maps: `sel` explains `images` conditioned on `labels` (undefined = its
// encoder's prediction), in batches of `batch_size`, without sampling; its encoder is the classifier that scores
// the orderings. Foreground from `data` where the data set defines one, RBF centres where the head predicts them.
// `known_curves`: as SaliencyInputs::known_curves.
ISP_API SaliencyReport measure_selector_saliency(SelectorNet& sel, const at::Tensor& images, const at::Tensor& labels,
                                                 const DataBundle& data, const SaliencyMetricOptions& opt,
                                                 int64_t batch_size = 128, const at::Tensor& known_curves = {});
struct MaskDistribution;
// The same for maps the caller already has: `dist` is `sel`'s output for `images` (`isp explain` draws its figure
// from the same maps, so the selector runs once).
ISP_API SaliencyReport measure_selector_saliency(SelectorNet& sel, const at::Tensor& images,
                                                 const MaskDistribution& dist, const DataBundle& data,
                                                 const SaliencyMetricOptions& opt);

// A fingerprint of a module's parameters and buffers (their names, shapes and values): two measurements whose
// networks have the same fingerprint ran the same classifier, so one may take the other's curves. Not a
// cryptographic hash; it guards against reusing curves after the weights changed.
ISP_API double weights_fingerprint(const torch::nn::Module& m);

// The foreground of normalised images when the raw intensity (x * std + mean, in [0,1]) of any channel exceeds
// `above`: [n, H, W] bool. `mean`/`std` per channel (one value = all channels).
ISP_API at::Tensor foreground_of(const at::Tensor& images, const std::vector<double>& mean,
                                 const std::vector<double>& std, double above);

}  // namespace isp
