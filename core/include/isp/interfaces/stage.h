#pragma once
// kind "stage": one step of a pipeline (train classifier, train predictor, prune, finetune, export ...).
//
// A stage hands its result on as one typed artifact (isp/artifacts.h): a trained classifier, an explanation
// model, a pruned network, an export. Later stages name it in their options ({"$ref": "<stage node>"}) and
// receive it through a StageInput<A>, whose type is checked when the recipe is built, before anything runs. A
// stage reads no other stage's files and changes no network it did not create.
#include <atomic>
#include <functional>
#include <memory>
#include <string>
#include <vector>

#include <c10/core/Device.h>

#include "isp/registry/build_context.h"
#include "isp/registry/options.h"

namespace isp {

// What the runner knows of a finished stage: the wall-time table of reports is made of these.
struct StageRecord {
  std::string name;
  double wall_seconds = 0;
  std::string reused_from;  // another run's folder when --reuse took the stage over
  json summary = json::object();
};

// The recipe's runtime speed settings (docs/performance.md), resolved for the run's device.
struct SpeedSettings {
  bool bf16 = false;           // runtime.precision "bf16": bfloat16 autocast in training steps (CUDA)
  bool channels_last = false;  // runtime.channels_last: NHWC weights and inputs
  // runtime.channels_last "auto" on the CPU: NHWC weights for networks with grouped (depthwise) convolutions
  // only, whose NCHW kernels are several times slower in LibTorch 1.13 (docs/performance.md).
  bool channels_last_if_grouped = false;
  bool cuda_graphs = false;    // runtime.cuda_graphs: each training step captured once, then replayed (CUDA)
  bool fold_batchnorm = true;  // runtime.fold_batchnorm: frozen conv + BN pairs run as one convolution
};

struct RunContext {
  std::string run_dir;     // the work dir of the whole run
  std::string stage_dir;   // run_dir/<stage name>
  std::string stage_name;
  std::string stage_type;  // the registered type of the stage ("isp::PruneChannels")
  c10::Device device = c10::Device(c10::kCPU);
  SpeedSettings speed;
  uint64_t seed = 1;       // this stage's seed: the runner seeds torch with it before run()
  bool resume = false;
  json resolved_recipe;
  json summary = json::object();  // what the stage reports; merged into run_dir/summary.json
  std::atomic<bool>* interrupted = nullptr;
  bool stop_requested() const { return interrupted && interrupted->load(); }
  // Appends one JSON object (plus "stage") to run_dir/metrics.jsonl.
  std::function<void(json)> log_metrics;
  // The stages of this run that finished before this one, in recipe order.
  std::vector<StageRecord> finished;
};

// The result of a stage. Concrete artifacts (isp/artifacts.h) name their type in kType.
class ISP_API Artifact {
 public:
  virtual ~Artifact();
  virtual const char* type() const = 0;
};

class ISP_API Stage {
 public:
  static constexpr const char* kKind = "stage";
  virtual ~Stage();
  // The artifact type this stage produces (an Artifact kType), known as soon as the stage is built.
  virtual const char* produces() const = 0;
  virtual void run(RunContext& ctx) = 0;
  // Called instead of run() when --resume finds the stage finished: rebuild the artifact from the stage's
  // own folder.
  virtual void restore(RunContext& ctx) = 0;
  // The artifact, once run() or restore() has published it; nullptr before.
  std::shared_ptr<const Artifact> result() const { return result_; }
  // The artifact as far as it is known when the recipe is built: the same types and architectures, untrained.
  // Later stages check their recipe against it before anything runs (nullptr: nothing planned).
  virtual std::shared_ptr<const Artifact> planned() const { return nullptr; }

 protected:
  // Throws if `a` is not of the type produces() promised.
  void publish(std::shared_ptr<const Artifact> a);

 private:
  std::shared_ptr<const Artifact> result_;
};

// A typed link to the artifact of an earlier stage: an option {"$ref": "<stage node>"} read with
// isp::stage_input<A>(ctx, ref) in the stage's constructor.
template <class A>
class StageInput {
 public:
  StageInput() = default;
  StageInput(std::shared_ptr<Stage> producer, Where where) : producer_(std::move(producer)), where_(std::move(where)) {}
  bool empty() const { return !producer_; }
  explicit operator bool() const { return !empty(); }
  // The artifact; throws when the producing stage has not run (or been restored) yet.
  std::shared_ptr<const A> get() const {
    if (!producer_) throw Error(where_.str() + ": no stage linked");
    std::shared_ptr<const Artifact> r = producer_->result();
    if (!r) throw Error(where_.str() + ": the stage it names has produced nothing yet (it must be listed before this one)");
    // The type was checked when the link was made (stage_input) and publish() checks the producer keeps it.
    return std::static_pointer_cast<const A>(r);
  }
  // The producer's planned artifact (see Stage::planned), nullptr when it plans none.
  std::shared_ptr<const A> planned() const {
    std::shared_ptr<const Artifact> p = producer_ ? producer_->planned() : nullptr;
    if (!p || std::string(p->type()) != A::kType) return nullptr;
    return std::static_pointer_cast<const A>(p);
  }
  const A& operator*() const { return *get(); }
  const A* operator->() const { return get().get(); }
  const Where& where() const { return where_; }

 private:
  std::shared_ptr<Stage> producer_;
  Where where_;
};

// Builds (or finds) the stage that `ref` names and links to its artifact; an empty ref gives an empty input.
// A RecipeError at the option when the node is not a stage or produces another type of artifact.
ISP_API std::shared_ptr<Stage> linked_stage(BuildContext& ctx, const NodeRef& ref, const char* expected_type);
template <class A>
StageInput<A> stage_input(BuildContext& ctx, const NodeRef& ref) {
  if (ref.empty()) return {};
  return StageInput<A>(linked_stage(ctx, ref, A::kType), ref.where);
}

// Thrown by a stage that stopped on Ctrl-C after writing its checkpoint.
class ISP_API Interrupted : public Error { public: using Error::Error; ~Interrupted() override; };

}  // namespace isp
