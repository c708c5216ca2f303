#pragma once
// A backbone's forward pass in eval mode as a small graph of inference operators, declared by the backbone
// itself (Backbone::inference_graph) and written out by the host in every export format: TorchScript now
// (isp::save_torchscript). Convolutions name a conv of the layer table; a BN that follows it there is folded
// into it by the exporter, so the graph has no BatchNorm. Values are named by the builder; "x" is the input.
#include <cstdint>
#include <string>
#include <vector>

#include "isp/registry/options.h"

namespace isp {

class ISP_API InferenceGraph {
 public:
  enum class Kind { Conv, Relu, Add, AvgPool, PadChannels, GlobalMean, Linear, MaxPool, Relu6 };
  struct Op {
    Kind kind = Kind::Relu;
    std::string out, a, b;  // result, operands
    std::string layer;      // Conv / Linear: the layer-table name whose weights it uses
    int64_t stride = 1, padding = 0, groups = 1;  // Conv; AvgPool: kernel = stride; MaxPool: stride, padding
    int64_t kernel = 1;                           // MaxPool
    int64_t amount = 0;                           // PadChannels: zero channels appended
  };

  static std::string input() { return "x"; }
  std::string conv(const std::string& layer, const std::string& in, int64_t stride, int64_t padding, int64_t groups = 1);
  std::string relu(const std::string& in);
  std::string relu6(const std::string& in);  // min(max(x, 0), 6)
  std::string add(const std::string& a, const std::string& b);
  std::string avg_pool(const std::string& in, int64_t kernel);  // stride = kernel
  std::string max_pool(const std::string& in, int64_t kernel, int64_t stride, int64_t padding);  // -inf padding
  std::string pad_channels(const std::string& in, int64_t amount);
  std::string global_mean(const std::string& in);  // [N, C, H, W] -> [N, C]
  std::string linear(const std::string& layer, const std::string& in);
  void set_output(const std::string& v) { output_ = v; }

  bool empty() const { return ops_.empty(); }
  const std::vector<Op>& ops() const { return ops_; }
  const std::string& output() const { return output_; }
  // The body of `def forward(self, x)` in TorchScript; weights are self.<attribute_of(tensor name)>.
  std::string torchscript() const;
  // "layer1.0.conv1.weight" -> "layer1_0_conv1_weight".
  static std::string attribute_of(const std::string& tensor);

 private:
  std::string push(Op op);
  std::vector<Op> ops_;
  std::string output_;
};

}  // namespace isp
