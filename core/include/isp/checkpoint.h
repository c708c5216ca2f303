#pragma once
// Checkpoints: named modules, optimizers and tensors plus a JSON "meta" record (epoch, step, resolved recipe ...)
// in isp's own container (core/src/checkpoint_format.h: JSON header, raw tensor bytes, CRC-32). Written
// atomically: a temporary file in the same folder, then rename. A damaged file is refused before any of it is
// parsed further, with an error naming it.
#include <map>
#include <memory>
#include <string>
#include <vector>

#include <ATen/core/Tensor.h>

#include "isp/registry/options.h"

namespace torch { namespace nn { class Module; } namespace optim { class Optimizer; } }

namespace isp {

class FlatOptimizer;

class ISP_API CheckpointWriter {
 public:
  CheckpointWriter();
  ~CheckpointWriter();
  void module(const std::string& name, const torch::nn::Module& m);
  void optimizer(const std::string& name, const torch::optim::Optimizer& o);
  void optimizer(const std::string& name, const FlatOptimizer& o);  // its state as tensors "<name>.<entry>"
  void tensor(const std::string& name, const at::Tensor& t);
  void meta(const json& j);
  void save_atomic(const std::string& path);
 private:
  struct Impl;
  std::unique_ptr<Impl> impl_;
};

class ISP_API CheckpointReader {
 public:
  explicit CheckpointReader(const std::string& path);  // throws isp::Error naming the file when unreadable
  ~CheckpointReader();
  bool has(const std::string& name) const;
  const std::string& path() const;
  void module(const std::string& name, torch::nn::Module& m);
  void optimizer(const std::string& name, torch::optim::Optimizer& o);
  void optimizer(const std::string& name, FlatOptimizer& o);
  at::Tensor tensor(const std::string& name);
  // Every tensor in the file (modules, optimizers, named tensors), by dotted path: for comparing checkpoints.
  std::map<std::string, at::Tensor> all_tensors();
  const json& meta() const;
 private:
  struct Impl;
  std::unique_ptr<Impl> impl_;
};

class Registry;
class Backbone;

// Reloads an export folder (structure.json + weights.pt) as a ready network, without the run that made it.
struct LoadedExport {
  std::shared_ptr<Backbone> model;
  json structure;
};
ISP_API LoadedExport load_export(Registry& reg, const std::string& dir);

// State dict (name -> tensor) in the zip format Python's torch.load reads as a plain dict.
ISP_API void save_state_dict_for_python(const torch::nn::Module& m, const std::string& path);
// The reverse: a {name: tensor} dict saved by Python's torch.save (zip format; e.g. torch.save(model.state_dict()))
// copied into `m`'s parameters and buffers by name. Every name of `m` must be there with its shape and the file
// must hold nothing else; otherwise an isp::Error names the file and the first offending names.
ISP_API void load_state_dict_from_python(torch::nn::Module& m, const std::string& path);
// Whether `path` is a torch.save zip file (rather than an isp checkpoint).
ISP_API bool is_python_state_dict_file(const std::string& path);
// `net` as a self-contained TorchScript module (torch.jit.load in Python, torch::jit::load in C++, no isp
// needed): the backbone's torchscript_forward() over its weights with every conv + BN pair folded (eval-mode
// semantics). Written atomically. Throws where the backbone declares no TorchScript forward.
class Backbone;
ISP_API void save_torchscript(const Backbone& net, const std::string& path);
// `net` as an ONNX model (opset 13, input "input" [batch, C, H, W] with a symbolic batch, output "logits"), from
// the same inference graph and folded weights. Written atomically; throws where the backbone declares no graph.
ISP_API void save_onnx(const Backbone& net, const std::string& path);

// sample.json of an export folder: `input` (NCHW, fp32) and the logits `net` gives it in isp -- eval mode, fp32,
// every layer as exported (BN not folded) -- so any runtime that loads the export can be checked against it
// (scripts/check_export_torch.py, scripts/check_export_onnxruntime.js). Restores net's training mode.
ISP_API json export_sample(Backbone& net, const at::Tensor& input);
// structure.json of an export folder ("format": "isp-export-1"): `spec` the backbone's options with its registered
// "type" (what load_export rebuilds), `layers` one {name, width, kept} per gated layer (kept: the original channels
// it keeps), the pruner and the plugin libraries the spec needs.
ISP_API json export_structure(const json& spec, const json& layers, const json& pruner, const json& plugins);
// `layers` for an unpruned network: every channel of every gated layer kept.
ISP_API json unpruned_layers(const Backbone& net);
// Writes one export folder: structure.json, then for each of `formats` ("state_dict": weights.pt, "torchscript":
// model.ts.pt, "onnx": model.onnx -- the last two where the backbone declares an inference graph) and
// sample.json for `sample_input`. Every file atomically. Returns the names of the files written.
ISP_API std::vector<std::string> write_export(Backbone& net, const json& structure, const at::Tensor& sample_input,
                                              const std::string& dir,
                                              const std::vector<std::string>& formats = {"state_dict", "torchscript", "onnx"});

}  // namespace isp
