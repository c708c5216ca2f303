// `isp export --run DIR`: the pruned network of a finished run in every format again (isp/checkpoint.h), e.g.
// for runs exported before a format existed. Rebuilt with isp::load_export from structure.json + weights.pt.
#include "reexport.h"

#include <ATen/ATen.h>
#include <c10/core/GradMode.h>

#include <cstdio>
#include <filesystem>

#include "isp/checkpoint.h"
#include "isp/interfaces/backbone.h"
#include "isp/registry/error.h"
#include "isp/registry/recipe.h"

namespace fs = std::filesystem;

namespace isp_app {
namespace {

at::Tensor tensor_of(const isp::json& entry, const std::string& where) {
  if (!entry.is_object() || !entry.contains("shape") || !entry.contains("values"))
    throw isp::Error(where + ": expected {\"shape\": [...], \"values\": [...]}");
  const auto values = entry["values"].get<std::vector<float>>();
  return at::tensor(values).reshape(entry["shape"].get<std::vector<int64_t>>());
}

}  // namespace

int reexport(isp::Registry& reg, const ReexportOptions& o) {
  const fs::path src = fs::path(o.run_dir) / "export";
  if (!fs::exists(src / "structure.json") || !fs::exists(src / "weights.pt"))
    throw isp::Error(o.run_dir + ": no finished export stage (expected " + (src / "structure.json").string() + " and weights.pt)");
  const fs::path out = o.out_dir.empty() ? src : fs::path(o.out_dir);
  fs::create_directories(out);
  isp::LoadedExport e = isp::load_export(reg, src.string());
  e.model->eval();
  for (const auto& f : o.formats) {
    if (f == "state_dict") {
      isp::save_state_dict_for_python(*e.model, (out / "weights.pt").string());
      if (out != src) isp::write_file_atomic((out / "structure.json").string(), e.structure.dump(2) + "\n");
      std::printf("wrote %s (and structure.json)\n", (out / "weights.pt").c_str());
    } else if (f == "torchscript") {
      isp::save_torchscript(*e.model, (out / "model.ts.pt").string());
      std::printf("wrote %s\n", (out / "model.ts.pt").c_str());
    } else if (f == "onnx") {
      isp::save_onnx(*e.model, (out / "model.onnx").string());
      std::printf("wrote %s\n", (out / "model.onnx").c_str());
    } else {
      throw isp::Error("--format: unknown format \"" + f + "\" (known: state_dict, torchscript, onnx)");
    }
  }
  // The sample: the same input, the reloaded network's logits (eval mode, fp32, BN not folded).
  const fs::path sample_path = src / "sample.json";
  if (fs::exists(sample_path)) {
    isp::json sample = isp::json::parse(isp::read_text_file(sample_path.string()));
    const at::Tensor x = tensor_of(sample["input"], sample_path.string() + " /input");
    c10::NoGradGuard no_grad;
    const bool folding = isp::batchnorm_folding();
    isp::set_batchnorm_folding(false);
    const at::Tensor logits = e.model->forward(x).contiguous();
    isp::set_batchnorm_folding(folding);
    sample["logits"] = {{"shape", logits.sizes().vec()},
                        {"values", std::vector<float>(logits.data_ptr<float>(), logits.data_ptr<float>() + logits.numel())}};
    isp::write_file_atomic((out / "sample.json").string(), sample.dump() + "\n");
    std::printf("wrote %s\n", (out / "sample.json").c_str());
  } else {
    std::printf("note: %s has no sample.json (exported before isp wrote one); none written\n", src.c_str());
  }
  return 0;
}

}  // namespace isp_app
