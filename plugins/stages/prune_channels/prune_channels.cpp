// Stage "PruneChannels": the stage class is in prune_channels.h, gate learning in gate_learning.cpp and the
// FLOPs budget in budget.cpp.
#include "prune_channels.h"

namespace {

std::shared_ptr<isp::Stage> make(const isp_prune::PruneOptions& o, isp::BuildContext& ctx) {
  return std::make_shared<isp_prune::PruneChannels>(o, ctx);
}

}  // namespace

ISP_PLUGIN("0.2.0");
ISP_REGISTER(isp::Stage, "PruneChannels", 1, isp_prune::PruneOptions, make,
             "learn channel gates steered by the selector's RBF parameters and a FLOPs budget, then cut channels");
