// Checkpoints (atomic, named modules/optimizers/tensors + JSON meta), Python-readable state dicts and
// reloading an export folder.
#include <torch/torch.h>

#include <unistd.h>

#include <chrono>
#include <cmath>
#include <cstdio>
#include <cstdlib>
#include <filesystem>
#include <limits>
#include <sstream>

#include "isp/checkpoint.h"
#include "isp/optim.h"
#include "isp/interfaces/backbone.h"
#include "isp/registry/build_context.h"
#include "isp/registry/recipe.h"

namespace fs = std::filesystem;

namespace isp {

// ------------------------------------------------------------------------------------------- checkpoints

struct CheckpointWriter::Impl {
  torch::serialize::OutputArchive archive;
  json meta = json::object();
  std::vector<std::string> entries;
};
CheckpointWriter::CheckpointWriter() : impl_(std::make_unique<Impl>()) {}
CheckpointWriter::~CheckpointWriter() = default;

void CheckpointWriter::module(const std::string& name, const torch::nn::Module& m) {
  torch::serialize::OutputArchive sub;
  m.save(sub);
  impl_->archive.write(name, sub);
  impl_->entries.push_back(name);
}
void CheckpointWriter::optimizer(const std::string& name, const torch::optim::Optimizer& o) {
  torch::serialize::OutputArchive sub;
  o.save(sub);
  impl_->archive.write(name, sub);
  impl_->entries.push_back(name);
}
void CheckpointWriter::optimizer(const std::string& name, const FlatOptimizer& o) {
  for (const auto& [key, t] : o.state()) tensor(name + "." + key, t);
}
void CheckpointWriter::tensor(const std::string& name, const at::Tensor& t) {
  impl_->archive.write(name, t.detach().cpu());
  impl_->entries.push_back(name);
}
void CheckpointWriter::meta(const json& j) { impl_->meta = j; }
void CheckpointWriter::save_atomic(const std::string& path) {
  json m = impl_->meta;
  m["_entries"] = impl_->entries;
  impl_->archive.write("meta", c10::IValue(m.dump()));
  std::ostringstream os;
  impl_->archive.save_to(os);
  write_file_atomic(path, os.str());
}

struct CheckpointReader::Impl {
  std::string path;
  torch::serialize::InputArchive archive;
  json meta;
  std::vector<std::string> entries;
};
CheckpointReader::CheckpointReader(const std::string& path) : impl_(std::make_unique<Impl>()) {
  impl_->path = path;
  if (!fs::exists(path)) throw Error(path + ": checkpoint not found");
  try {
    impl_->archive.load_from(path);
    c10::IValue v;
    impl_->archive.read("meta", v);
    impl_->meta = json::parse(v.toStringRef());
  } catch (const std::exception& e) {
    const std::string why = e.what();
    throw Error(path + ": not a readable isp checkpoint (" + why.substr(0, std::min<std::size_t>(why.find('\n'), 200)) + ")");
  }
  impl_->entries = impl_->meta.value("_entries", std::vector<std::string>{});
}
CheckpointReader::~CheckpointReader() = default;
const std::string& CheckpointReader::path() const { return impl_->path; }
bool CheckpointReader::has(const std::string& name) const {
  return std::find(impl_->entries.begin(), impl_->entries.end(), name) != impl_->entries.end();
}
void CheckpointReader::module(const std::string& name, torch::nn::Module& m) {
  if (!has(name)) throw Error(impl_->path + ": checkpoint has no module '" + name + "'");
  torch::serialize::InputArchive sub;
  impl_->archive.read(name, sub);
  try {
    m.load(sub);
  } catch (const std::exception& e) {
    throw Error(impl_->path + ": module '" + name + "' does not match the recipe's architecture (" +
                std::string(e.what()).substr(0, 300) + ")");
  }
}
void CheckpointReader::optimizer(const std::string& name, torch::optim::Optimizer& o) {
  if (!has(name)) throw Error(impl_->path + ": checkpoint has no optimizer '" + name + "'");
  torch::serialize::InputArchive sub;
  impl_->archive.read(name, sub);
  o.load(sub);
}
void CheckpointReader::optimizer(const std::string& name, FlatOptimizer& o) {
  std::vector<std::pair<std::string, at::Tensor>> saved;
  for (const auto& [key, t] : o.state()) {
    if (!has(name + "." + key))
      throw Error(impl_->path + ": checkpoint has no optimizer state '" + name + "." + key +
                  "' (written by another optimizer type?)");
    saved.emplace_back(key, tensor(name + "." + key));
  }
  try {
    o.load_state(saved);
  } catch (const Error& e) {
    throw Error(impl_->path + ": " + e.what());
  }
}
at::Tensor CheckpointReader::tensor(const std::string& name) {
  if (!has(name)) throw Error(impl_->path + ": checkpoint has no tensor '" + name + "'");
  at::Tensor t;
  impl_->archive.read(name, t);
  return t;
}
namespace {
void collect_tensors(torch::serialize::InputArchive& a, const std::string& prefix, std::map<std::string, at::Tensor>& out) {
  for (const auto& key : a.keys()) {
    at::Tensor t;
    if (a.try_read(key, t)) {
      out[prefix + key] = t;
      continue;
    }
    torch::serialize::InputArchive sub;
    if (a.try_read(key, sub)) collect_tensors(sub, prefix + key + ".", out);
  }
}
}  // namespace

std::map<std::string, at::Tensor> CheckpointReader::all_tensors() {
  std::map<std::string, at::Tensor> out;
  collect_tensors(impl_->archive, "", out);
  return out;
}

const json& CheckpointReader::meta() const { return impl_->meta; }

void save_state_dict_for_python(const torch::nn::Module& m, const std::string& path) {
  c10::Dict<std::string, at::Tensor> dict;
  for (const auto& p : m.named_parameters()) dict.insert(p.key(), p.value().detach().cpu());
  for (const auto& b : m.named_buffers()) dict.insert(b.key(), b.value().detach().cpu());
  std::vector<char> bytes = torch::pickle_save(c10::IValue(dict));
  write_file_atomic(path, std::string(bytes.begin(), bytes.end()));
}

LoadedExport load_export(Registry& reg, const std::string& dir) {
  const std::string sp = dir + "/structure.json", wp = dir + "/weights.pt";
  if (!fs::exists(sp)) throw Error(dir + ": not an isp export (no structure.json)");
  LoadedExport out;
  out.structure = json::parse(read_text_file(sp));
  if (out.structure.value("format", std::string()) != "isp-export-1")
    throw Error(sp + ": /format: expected \"isp-export-1\"");
  for (const auto& p : out.structure.value("plugins", json::array())) {
    std::string path = p.get<std::string>();
    if (fs::is_directory(path)) reg.scan_directory(path);
    else if (fs::exists(path)) reg.load_library(path);
  }
  json recipe = {{"nodes", {{"model", out.structure.at("spec")}}}};
  BuildContext ctx(reg, recipe, [&sp](const std::string& p) { return Where{sp, p == "/nodes/model" ? "/spec" : p}; });
  out.model = ctx.node<Backbone>("model");
  std::string bytes = read_text_file(wp);
  c10::IValue v = torch::pickle_load(std::vector<char>(bytes.begin(), bytes.end()));
  if (!v.isGenericDict()) throw Error(wp + ": expected a {name: tensor} dict");
  auto dict = v.toGenericDict();
  torch::NoGradGuard ng;
  std::size_t matched = 0;
  auto assign = [&](const std::string& name, at::Tensor& t) {
    c10::IValue key(name);
    if (!dict.contains(key)) throw Error(wp + ": missing tensor '" + name + "'");
    at::Tensor src = dict.at(key).toTensor();
    if (src.sizes() != t.sizes()) throw Error(wp + ": tensor '" + name + "' has shape " + c10::str(src.sizes()) + ", the structure expects " + c10::str(t.sizes()));
    t.copy_(src);
    ++matched;
  };
  for (auto& p : out.model->named_parameters()) assign(p.key(), p.value());
  for (auto& b : out.model->named_buffers()) assign(b.key(), b.value());
  if (matched != dict.size()) throw Error(wp + ": holds " + std::to_string(dict.size()) + " tensors, the structure uses " + std::to_string(matched));
  out.model->eval();
  return out;
}

}  // namespace isp
