// `isp export --run DIR`: the pruned network of a finished run (and the original, where export/original/ exists)
// in every format again (isp/checkpoint.h: write_export), e.g. for runs exported before a format existed. Rebuilt
// with isp::load_export from structure.json + weights.pt.
#include "reexport.h"

#include <ATen/ATen.h>

#include <cstdio>
#include <filesystem>

#include "isp/checkpoint.h"
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

// One export folder again: the network rebuilt from structure.json + weights.pt, sample.json's input kept.
void reexport_folder(isp::Registry& reg, const fs::path& src, const fs::path& out, const std::vector<std::string>& formats) {
  if (!fs::exists(src / "structure.json") || !fs::exists(src / "weights.pt"))
    throw isp::Error(src.string() + ": not an export folder (expected structure.json and weights.pt)");
  isp::LoadedExport e = isp::load_export(reg, src.string());
  at::Tensor sample_input;
  const fs::path sample_path = src / "sample.json";
  if (fs::exists(sample_path)) {
    const isp::json sample = isp::json::parse(isp::read_text_file(sample_path.string()));
    sample_input = tensor_of(sample.value("input", isp::json()), sample_path.string() + " /input");
  } else {
    std::printf("note: %s has no sample.json (exported before isp wrote one); none written\n", src.c_str());
  }
  for (const auto& f : isp::write_export(*e.model, e.structure, sample_input, out.string(), formats))
    std::printf("wrote %s\n", f.c_str());
}

}  // namespace

int reexport(isp::Registry& reg, const ReexportOptions& o) {
  const fs::path src = fs::path(o.run_dir) / "export";
  if (!fs::exists(src / "structure.json") || !fs::exists(src / "weights.pt"))
    throw isp::Error(o.run_dir + ": no finished export stage (expected " + (src / "structure.json").string() + " and weights.pt)");
  const fs::path out = o.out_dir.empty() ? src : fs::path(o.out_dir);
  reexport_folder(reg, src, out, o.formats);
  // The unpruned classifier, where the export stage wrote it (export/original/).
  if (fs::exists(src / "original" / "structure.json")) reexport_folder(reg, src / "original", out / "original", o.formats);
  return 0;
}

}  // namespace isp_app
