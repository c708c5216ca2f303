#pragma once
// The typed results stages hand on (isp/interfaces/stage.h). An artifact is immutable once published: a
// stage that changes a network it received (finetuning a pruned one) works on its own copy.
#include <memory>
#include <string>
#include <vector>

#include "isp/interfaces/backbone.h"
#include "isp/interfaces/stage.h"
#include "isp/selector.h"

namespace isp {

// TrainClassifier: a trained backbone and how it scored.
struct ISP_API TrainedClassifier final : Artifact {
  static constexpr const char* kType = "trained_classifier";
  const char* type() const override { return kType; }
  std::shared_ptr<Backbone> network;
  std::string backbone_type;  // the registered type that built it ("isp::ResNetCifar"), for exports
  json metrics = json::object();  // test_top1, val_top1, ...
};

// TrainPredictor: the AEM predictor, trained against a classifier on masked inputs.
struct ISP_API TrainedPredictor final : Artifact {
  static constexpr const char* kType = "trained_predictor";
  const char* type() const override { return kType; }
  std::shared_ptr<const TrainedClassifier> classifier;
  std::shared_ptr<Backbone> predictor;
  json metrics = json::object();
};

// TrainSelector: the amortized explanation model (the selector, with the predictor it was trained against).
struct ISP_API ExplanationModel final : Artifact {
  static constexpr const char* kType = "explanation_model";
  const char* type() const override { return kType; }
  std::shared_ptr<const TrainedClassifier> classifier;
  std::shared_ptr<const TrainedPredictor> predictor;
  std::shared_ptr<SelectorNet> selector;  // its encoder is classifier->network
  json metrics = json::object();
  // The per-image deletion/insertion curves of the stage's saliency metrics (SaliencyReport::curves, on the first
  // test images) and what they depend on: Export's "original" row measures the same maps with the same classifier
  // and takes them instead of running them again (SaliencyInputs::known_curves). Undefined when none were measured.
  struct MeasuredCurves {
    at::Tensor curves;           // [k, 3, 2, steps+1]
    int64_t steps = 0;
    uint64_t seed = 0;
    std::string labels;          // what conditioned the maps: "ground_truth" or "predicted"
    double selector_fingerprint = 0;  // weights_fingerprint of the selector (encoder included) that drew the maps
  };
  MeasuredCurves saliency_curves;
};

// One stage's contribution to a pruned network: what it did and what it measured.
struct LineageEntry {
  std::string stage, type;  // stage name and its registered type ("isp::PruneChannels")
  json metrics = json::object();
};

// PruneChannels and Finetune: a physically smaller network, which channels of the original it kept, and the
// stages that made it.
struct ISP_API PrunedNetwork final : Artifact {
  static constexpr const char* kType = "pruned_network";
  const char* type() const override { return kType; }
  std::shared_ptr<Backbone> network;
  std::shared_ptr<const TrainedClassifier> original;
  std::vector<GatedLayer> original_layers;      // names and full widths
  std::vector<std::vector<int64_t>> kept;        // kept channel indices per gated layer of the original
  std::string pruner;                            // the registered type that chose the channels
  std::vector<LineageEntry> lineage;             // prune first, then finetuning stages
  std::vector<int64_t> widths() const;
  std::vector<int64_t> full_widths() const;
  // A figure reported by a stage of the lineage (the last one that reports it); null when none did.
  json metric(const std::string& key) const;
  // The architecture document: network spec with the kept widths, and the kept indices per layer.
  json architecture() const;
};

// A copy of a network with its own parameters and buffers (a stage that changes a network it received).
ISP_API std::shared_ptr<Backbone> clone_backbone(const Backbone& b);

// Export: the deliverable folder and the report it wrote.
struct ISP_API ExportedModel final : Artifact {
  static constexpr const char* kType = "exported_model";
  const char* type() const override { return kType; }
  std::string dir;
  json report = json::object();
};

}  // namespace isp
