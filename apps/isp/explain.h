#pragma once
// `isp explain`: saliency figures of a finished AEM run (the five columns of the paper's figure).
#include <cstdint>
#include <string>

namespace isp { class Registry; }

namespace isp_app {

struct ExplainOptions {
  std::string run_dir;     // a run folder (work dir of `isp run`)
  std::string checkpoint;  // alternative: a checkpoint file inside a run folder (<run>/<stage>/<file>.pt)
  std::string out_dir;     // required
  int64_t images = 8;      // first N test images
  std::string label = "ground_truth";  // class conditioning the feature filter: ground_truth | predicted
  uint64_t seed = 1;       // seed of the drawn masks s ~ sampler(P)
  std::string network = "original";  // original | pruned: the AEM's filter, decoder and head on the pruned encoder
};

// Figure geometry (pixels): tiles are the input upscaled kScale x (nearest); five columns separated by kGap;
// a kHeader-high title band on top; each row has a kStrip-high label strip above its tiles.
//   width  = kGap + 5 * (tile + kGap),   tile = kScale * image side
//   height = kHeader + N * (kStrip + tile + kGap)
constexpr int kScale = 4, kGap = 4, kHeader = 20, kStrip = 20;
inline int figure_width(int image_side) { return kGap + 5 * (kScale * image_side + kGap); }
inline int figure_height(int image_side, int rows) { return kHeader + rows * (kStrip + kScale * image_side + kGap); }

// Writes OUT/saliency.png, OUT/row_<i>_<class>.png, OUT/curves.png, OUT/params.json and OUT/saliency_metrics.json.
// Returns the exit code; throws isp::Error.
int explain(isp::Registry& reg, const ExplainOptions& o);

}  // namespace isp_app
