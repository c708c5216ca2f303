// Checkpoints (atomic, named modules/optimizers/tensors + JSON meta), Python-readable state dicts and
// reloading an export folder.
#include <torch/torch.h>
#include <caffe2/serialize/inline_container.h>
#include <torch/csrc/jit/serialization/pickler.h>

#include <unistd.h>

#include <chrono>
#include <cmath>
#include <cstdio>
#include <cstdlib>
#include <cstring>
#include <filesystem>
#include <fstream>
#include <set>
#include <limits>
#include <map>
#include <sstream>

#include "isp/checkpoint.h"
#include "checkpoint_format.h"
#include "torch_save_reader.h"
#include "isp/optim.h"
#include "isp/interfaces/backbone.h"
#include "isp/registry/build_context.h"
#include "isp/registry/recipe.h"

namespace fs = std::filesystem;

namespace isp {

// ------------------------------------------------------------------------------------------- checkpoints
// The file format is checkpoint_format.{h,cpp}; this part maps tensors and modules onto it.

namespace {
namespace cf = checkpoint_format;

const char* dtype_name(at::ScalarType t) {
  switch (t) {
    case at::kFloat: return "float32";
    case at::kDouble: return "float64";
    case at::kHalf: return "float16";
    case at::kBFloat16: return "bfloat16";
    case at::kLong: return "int64";
    case at::kInt: return "int32";
    case at::kShort: return "int16";
    case at::kChar: return "int8";
    case at::kByte: return "uint8";
    case at::kBool: return "bool";
    default: throw Error(std::string("checkpoint: cannot store tensors of type ") + c10::toString(t));
  }
}
at::ScalarType dtype_of(const std::string& name) {
  static const std::pair<const char*, at::ScalarType> kTypes[] = {
      {"float32", at::kFloat}, {"float64", at::kDouble}, {"float16", at::kHalf}, {"bfloat16", at::kBFloat16},
      {"int64", at::kLong},    {"int32", at::kInt},      {"int16", at::kShort},  {"int8", at::kChar},
      {"uint8", at::kByte},    {"bool", at::kBool}};
  for (const auto& [n, t] : kTypes)
    if (name == n) return t;
  throw Error("checkpoint: unknown dtype " + name);  // decode() already refused it
}
// A torch::optim::Optimizer serialises itself only into a LibTorch archive: its bytes are kept as a uint8 tensor
// (the CRC covers them, so LibTorch's parser sees only bytes isp wrote).
const char* const kTorchArchiveSuffix = ".torch_archive";
}  // namespace

struct CheckpointWriter::Impl {
  std::vector<std::pair<std::string, at::Tensor>> tensors;  // contiguous, on the CPU
  json meta = json::object();
  std::vector<std::string> entries;
  void add(const std::string& name, const at::Tensor& t) { tensors.emplace_back(name, t.detach().cpu().contiguous()); }
};
CheckpointWriter::CheckpointWriter() : impl_(std::make_unique<Impl>()) {}
CheckpointWriter::~CheckpointWriter() = default;

void CheckpointWriter::module(const std::string& name, const torch::nn::Module& m) {
  for (const auto& p : m.named_parameters(/*recurse=*/true)) impl_->add(name + "." + p.key(), p.value());
  for (const auto& b : m.named_buffers(/*recurse=*/true)) impl_->add(name + "." + b.key(), b.value());
  impl_->entries.push_back(name);
}
void CheckpointWriter::optimizer(const std::string& name, const torch::optim::Optimizer& o) {
  torch::serialize::OutputArchive archive;
  o.save(archive);
  std::ostringstream os;
  archive.save_to(os);
  const std::string bytes = os.str();
  at::Tensor blob = at::empty({static_cast<int64_t>(bytes.size())}, at::kByte);
  std::memcpy(blob.data_ptr<uint8_t>(), bytes.data(), bytes.size());
  impl_->add(name + kTorchArchiveSuffix, blob);
  impl_->entries.push_back(name);
}
void CheckpointWriter::optimizer(const std::string& name, const FlatOptimizer& o) {
  for (const auto& [key, t] : o.state()) tensor(name + "." + key, t);
}
void CheckpointWriter::tensor(const std::string& name, const at::Tensor& t) {
  impl_->add(name, t);
  impl_->entries.push_back(name);
}
void CheckpointWriter::meta(const json& j) { impl_->meta = j; }
void CheckpointWriter::save_atomic(const std::string& path) {
  std::vector<cf::TensorBytes> parts;
  parts.reserve(impl_->tensors.size());
  for (const auto& [name, t] : impl_->tensors)
    parts.push_back({name, dtype_name(t.scalar_type()), t.sizes().vec(), t.data_ptr(), t.nbytes()});
  try {
    write_file_atomic(path, cf::encode(impl_->meta, impl_->entries, parts));
  } catch (const Error& e) {
    const std::string what = e.what();
    throw Error(what.rfind(path, 0) == 0 ? what : path + ": " + what);
  }
}

struct CheckpointReader::Impl {
  std::string path;
  std::string bytes;  // the whole file; tensors are copied out of it on request
  cf::Contents contents;
  std::map<std::string, std::size_t> index;  // tensor name -> position in contents.tensors
  at::Tensor materialise(const cf::TensorRecord& r) const {
    at::Tensor t = at::empty(r.shape, at::TensorOptions().dtype(dtype_of(r.dtype)));
    if (r.nbytes) std::memcpy(t.data_ptr(), bytes.data() + r.offset, r.nbytes);
    return t;
  }
  const cf::TensorRecord* find(const std::string& name) const {
    auto it = index.find(name);
    return it == index.end() ? nullptr : &contents.tensors[it->second];
  }
};
CheckpointReader::CheckpointReader(const std::string& path) : impl_(std::make_unique<Impl>()) {
  impl_->path = path;
  if (!fs::exists(path)) throw Error(path + ": checkpoint not found");
  impl_->bytes = read_text_file(path);
  try {
    impl_->contents = cf::decode(impl_->bytes, path);
  } catch (const Error& e) {
    std::string why = e.what();
    if (why.rfind(path + ": ", 0) == 0) why.erase(0, path.size() + 2);
    throw Error(path + ": not a readable isp checkpoint (" + why + ")");
  }
  for (std::size_t i = 0; i < impl_->contents.tensors.size(); ++i) impl_->index[impl_->contents.tensors[i].name] = i;
}
CheckpointReader::~CheckpointReader() = default;
const std::string& CheckpointReader::path() const { return impl_->path; }
bool CheckpointReader::has(const std::string& name) const {
  const auto& e = impl_->contents.entries;
  return std::find(e.begin(), e.end(), name) != e.end();
}
void CheckpointReader::module(const std::string& name, torch::nn::Module& m) {
  if (!has(name)) throw Error(impl_->path + ": checkpoint has no module '" + name + "'");
  const std::string mismatch = impl_->path + ": module '" + name + "' does not match the recipe's architecture: ";
  std::vector<std::pair<at::Tensor, const cf::TensorRecord*>> targets;
  auto match = [&](const std::string& key, const at::Tensor& t) {
    const cf::TensorRecord* r = impl_->find(name + "." + key);
    if (!r) throw Error(mismatch + "the checkpoint has no tensor '" + key + "'");
    if (r->shape != t.sizes().vec())
      throw Error(mismatch + "'" + key + "' has shape " + c10::str(at::IntArrayRef(r->shape)) + " in the checkpoint, " +
                  c10::str(t.sizes()) + " in the model");
    if (dtype_of(r->dtype) != t.scalar_type())
      throw Error(mismatch + "'" + key + "' is " + r->dtype + " in the checkpoint, " + dtype_name(t.scalar_type()) +
                  " in the model");
    targets.emplace_back(t, r);
  };
  for (const auto& p : m.named_parameters(true)) match(p.key(), p.value());
  for (const auto& b : m.named_buffers(true)) match(b.key(), b.value());
  // Tensors under this module's name that the model lacks: a smaller architecture than the one saved.
  const std::string prefix = name + ".";
  std::size_t under = 0;
  for (const auto& t : impl_->contents.tensors)
    if (t.name.compare(0, prefix.size(), prefix) == 0 && !has(t.name)) ++under;
  if (under != targets.size())
    throw Error(mismatch + "the checkpoint holds " + std::to_string(under) + " tensors for it, the model has " +
                std::to_string(targets.size()));
  // Copying keeps the parameters' own storage (and memory layout, e.g. channels_last, and device).
  torch::NoGradGuard no_grad;
  for (auto& [t, r] : targets) t.copy_(impl_->materialise(*r));
}
void CheckpointReader::optimizer(const std::string& name, torch::optim::Optimizer& o) {
  const cf::TensorRecord* r = impl_->find(name + kTorchArchiveSuffix);
  if (!has(name) || !r) throw Error(impl_->path + ": checkpoint has no optimizer '" + name + "'");
  std::istringstream in(std::string(impl_->bytes.data() + r->offset, r->nbytes));
  try {
    torch::serialize::InputArchive archive;
    archive.load_from(in);
    o.load(archive);
  } catch (const std::exception& e) {
    throw Error(impl_->path + ": optimizer '" + name + "' cannot be restored (" + std::string(e.what()).substr(0, 300) +
                ")");
  }
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
  const cf::TensorRecord* r = impl_->find(name);
  if (!has(name) || !r) throw Error(impl_->path + ": checkpoint has no tensor '" + name + "'");
  return impl_->materialise(*r);
}

std::map<std::string, at::Tensor> CheckpointReader::all_tensors() {
  std::map<std::string, at::Tensor> out;
  for (const auto& r : impl_->contents.tensors) out[r.name] = impl_->materialise(r);
  return out;
}

const json& CheckpointReader::meta() const { return impl_->contents.meta; }

namespace {
// torch.save's zip format, pickled without type tags. torch::pickle_save tags typed dicts with the global
// torch.jit._pickle.restore_type_tag, which torch.load refuses under weights_only=True, its default since
// PyTorch 2.6; untagged, the file holds only a plain dict, tensors and storages, which it accepts.
std::string pickle_for_torch_load(const c10::IValue& value) {
  std::string pickle;
  torch::jit::Pickler pickler([&pickle](const char* bytes, size_t n) { pickle.append(bytes, n); },
                              /*tensor_table=*/nullptr, /*type_renamer=*/nullptr, /*memoized_class_types=*/nullptr,
                              /*get_tensor_id=*/nullptr, /*tag_aggregates=*/false);
  pickler.protocol();
  pickler.pushIValue(value);
  pickler.stop();
  std::string out;
  caffe2::serialize::PyTorchStreamWriter zip([&out](const void* bytes, size_t n) -> size_t {
    out.append(static_cast<const char*>(bytes), n);
    return n;
  });
  const auto& tensors = pickler.tensorData();  // the storages the pickle names by index
  for (std::size_t i = 0; i < tensors.size(); ++i) {
    const auto data = torch::jit::getWriteableTensorData(tensors[i]);
    zip.writeRecord("data/" + std::to_string(i), data.data(), data.sizeInBytes());
  }
  zip.writeRecord("data.pkl", pickle.data(), pickle.size());
  zip.writeRecord("byteorder", "little", 6);  // as torch.save writes it; x86 and ARM are little-endian
  zip.writeEndOfFile();
  return out;
}
}  // namespace

void save_state_dict_for_python(const torch::nn::Module& m, const std::string& path) {
  c10::Dict<std::string, at::Tensor> dict;
  for (const auto& p : m.named_parameters()) dict.insert(p.key(), p.value().detach().cpu().contiguous());
  for (const auto& b : m.named_buffers()) dict.insert(b.key(), b.value().detach().cpu().contiguous());
  write_file_atomic(path, pickle_for_torch_load(c10::IValue(dict)));
}

bool is_python_state_dict_file(const std::string& path) {
  std::ifstream in(path, std::ios::binary);
  char magic[4] = {0, 0, 0, 0};
  in.read(magic, 4);
  return in.gcount() == 4 && magic[0] == 'P' && magic[1] == 'K' && magic[2] == 3 && magic[3] == 4;
}

void load_state_dict_from_python(torch::nn::Module& m, const std::string& path) {
  if (!fs::exists(path)) throw Error(path + ": no such file (expected a state dict saved by torch.save)");
  if (!is_python_state_dict_file(path))
    throw Error(path + ": not a state dict saved by torch.save (zip format): it does not start as a zip file");
  std::map<std::string, at::Tensor> dict;
  for (auto& [name, t] : read_torch_save_state_dict(path)) dict[name] = std::move(t);
  torch::NoGradGuard ng;
  std::vector<std::string> missing, wrong;
  std::size_t matched = 0;
  auto assign = [&](const std::string& name, at::Tensor& t) {
    auto it = dict.find(name);
    if (it == dict.end()) return missing.push_back(name);
    const at::Tensor& src = it->second;
    if (src.sizes() != t.sizes())
      return wrong.push_back(name + " " + c10::str(src.sizes()) + " (the network has " + c10::str(t.sizes()) + ")");
    t.copy_(src);
    ++matched;
  };
  for (auto& p : m.named_parameters()) assign(p.key(), p.value());
  for (auto& b : m.named_buffers()) assign(b.key(), b.value());
  auto first = [](const std::vector<std::string>& v) {
    std::string s;
    for (std::size_t i = 0; i < v.size() && i < 3; ++i) s += (i ? ", " : "") + v[i];
    return s + (v.size() > 3 ? ", ... (" + std::to_string(v.size()) + " in all)" : "");
  };
  if (!wrong.empty()) throw Error(path + ": shapes differ from the network's: " + first(wrong));
  if (!missing.empty()) throw Error(path + ": missing " + first(missing));
  if (matched != dict.size()) {
    std::vector<std::string> extra;
    std::set<std::string> known;
    for (auto& p : m.named_parameters()) known.insert(p.key());
    for (auto& b : m.named_buffers()) known.insert(b.key());
    for (const auto& kv : dict)
      if (!known.count(kv.first)) extra.push_back(kv.first);
    throw Error(path + ": holds tensors the network does not have: " + first(extra));
  }
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
  load_state_dict_from_python(*out.model, wp);
  out.model->eval();
  return out;
}

}  // namespace isp
