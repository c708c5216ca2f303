#pragma once
// kind "stage": one step of a pipeline (train classifier, train predictor, prune, finetune, export ...).
#include <atomic>
#include <functional>
#include <memory>
#include <string>

#include <c10/core/Device.h>

namespace torch { namespace nn { class Module; } }

#include "isp/options.h"

namespace isp {

class BuildContext;

struct RunContext {
  std::string run_dir;     // the work dir of the whole run
  std::string stage_dir;   // run_dir/<stage name>
  std::string stage_name;
  c10::Device device = c10::Device(c10::kCPU);
  uint64_t seed = 1;
  bool resume = false;
  json resolved_recipe;
  BuildContext* build = nullptr;
  json summary = json::object();  // what the stage reports; merged into run_dir/summary.json
  std::atomic<bool>* interrupted = nullptr;
  bool stop_requested() const { return interrupted && interrupted->load(); }
  // Appends one JSON object (plus "stage") to run_dir/metrics.jsonl.
  std::function<void(json)> log_metrics;
};

class ISP_API Stage {
 public:
  static constexpr const char* kKind = "stage";
  virtual ~Stage();
  virtual void run(RunContext& ctx) = 0;
  // Called instead of run() when --resume finds the stage finished: reload what it produced into the nodes.
  virtual void restore(RunContext& ctx) = 0;
  // The network this stage trains or produces (a predictor, a pruned network), if any. Trained networks exist
  // from construction on, so later stages can hold them; produced ones (pruning) exist after run()/restore().
  virtual std::shared_ptr<torch::nn::Module> model() { return nullptr; }
  // Results of this stage that later stages read (e.g. a pruned architecture), after run() or restore().
  virtual json outputs() const { return json::object(); }
};

// Thrown by a stage that stopped on Ctrl-C after writing its checkpoint.
class ISP_API Interrupted : public Error { public: using Error::Error; ~Interrupted() override; };

}  // namespace isp
