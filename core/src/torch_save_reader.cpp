// A state dict written by Python's torch.save, read by a small pickle machine of our own.
//
// Why not torch::pickle_load: LibTorch's unpickler is TorchScript's. It turns collections.OrderedDict into None
// (it expects OrderedDicts only as a tensor's empty backward hooks), and model.state_dict() *is* an OrderedDict,
// with a _metadata attribute. So `torch.save(model.state_dict(), f)`, the way everybody saves weights, came back
// as None. This reader runs the few opcodes torch.save emits (pickle protocols 2 to 5) and rebuilds only what a
// state dict holds: dicts, OrderedDicts, tuples, lists, strings, numbers and tensors on typed storages. Any other
// object is refused by its Python name; nothing from the file is ever executed.
#include "torch_save_reader.h"

#include <caffe2/serialize/inline_container.h>

#include <ATen/ATen.h>

#include <cstdio>
#include <cstring>
#include <map>
#include <memory>
#include <unordered_map>

#include "isp/registry/error.h"

namespace isp {
namespace {

struct Obj;
using Val = std::shared_ptr<Obj>;
struct Obj {
  enum Kind { None, Bool, Int, Float, Str, Tuple, List, Dict, Global, Storage, Tensor, Mark } kind = None;
  int64_t i = 0;
  double f = 0;
  std::string s;                           // Str; Global: "module.name"
  std::vector<Val> items;                  // Tuple, List
  std::vector<std::pair<Val, Val>> pairs;  // Dict
  at::Tensor t;                            // Storage (flat), Tensor
};
Val make(Obj::Kind k) {
  auto v = std::make_shared<Obj>();
  v->kind = k;
  return v;
}

at::ScalarType dtype_of_storage(const std::string& global) {
  static const std::map<std::string, at::ScalarType> types = {
      {"torch.FloatStorage", at::kFloat},   {"torch.DoubleStorage", at::kDouble}, {"torch.HalfStorage", at::kHalf},
      {"torch.BFloat16Storage", at::kBFloat16}, {"torch.LongStorage", at::kLong}, {"torch.IntStorage", at::kInt},
      {"torch.ShortStorage", at::kShort},   {"torch.CharStorage", at::kChar},     {"torch.ByteStorage", at::kByte},
      {"torch.BoolStorage", at::kBool}};
  auto it = types.find(global);
  if (it == types.end()) throw Error("unsupported storage type " + global);
  return it->second;
}

class Machine {
 public:
  Machine(caffe2::serialize::PyTorchStreamReader& zip, const std::string& pickle) : zip_(zip), p_(pickle) {}

  Val run() {
    for (;;) {
      const auto op = static_cast<unsigned char>(byte());
      switch (op) {
        case 0x80: byte(); break;                                // PROTO
        case 0x95: take(8); break;                               // FRAME
        case '}': push(make(Obj::Dict)); break;                  // EMPTY_DICT
        case ']': push(make(Obj::List)); break;                  // EMPTY_LIST
        case ')': push(make(Obj::Tuple)); break;                 // EMPTY_TUPLE
        case '(': push(make(Obj::Mark)); break;                  // MARK
        case 't': { auto v = make(Obj::Tuple); v->items = pop_mark(); push(v); break; }
        case 0x85: case 0x86: case 0x87: {                       // TUPLE1..3
          auto v = make(Obj::Tuple);
          v->items.resize(op - 0x84);
          for (auto it = v->items.rbegin(); it != v->items.rend(); ++it) *it = pop();
          push(v);
          break;
        }
        case 'X': push_str(take(le(4))); break;                  // BINUNICODE
        case 0x8c: push_str(take(le(1))); break;                 // SHORT_BINUNICODE
        case 0x8d: push_str(take(le(8))); break;                 // BINUNICODE8
        case 'J': push_int(static_cast<int32_t>(le(4))); break;  // BININT
        case 'K': push_int(le(1)); break;                        // BININT1
        case 'M': push_int(le(2)); break;                        // BININT2
        case 0x8a: {                                             // LONG1: little-endian two's complement
          const std::size_t n = le(1);
          if (n > 8) throw Error("integer too large");
          uint64_t u = n ? le(n) : 0;
          if (n > 0 && n < 8 && (u >> (8 * n - 1)) & 1) u |= ~uint64_t{0} << (8 * n);
          push_int(static_cast<int64_t>(u));
          break;
        }
        case 'G': {                                              // BINFLOAT: big-endian double
          uint64_t u = 0;
          for (char c : take(8)) u = (u << 8) | static_cast<unsigned char>(c);
          auto v = make(Obj::Float);
          std::memcpy(&v->f, &u, 8);
          push(v);
          break;
        }
        case 'N': push(make(Obj::None)); break;
        case 0x88: case 0x89: { auto v = make(Obj::Bool); v->i = op == 0x88; push(v); break; }
        case 'c': {                                              // GLOBAL module\nname\n
          const std::string module = line(), name = line();
          push_global(module + "." + name);
          break;
        }
        case 0x93: {                                             // STACK_GLOBAL
          const Val name = pop(), module = pop();
          push_global(module->s + "." + name->s);
          break;
        }
        case 'q': memo_[le(1)] = top(); break;                   // BINPUT
        case 'r': memo_[le(4)] = top(); break;                   // LONG_BINPUT
        case 0x94: memo_[memo_.size()] = top(); break;           // MEMOIZE
        case 'h': push(memo(le(1))); break;                      // BINGET
        case 'j': push(memo(le(4))); break;                      // LONG_BINGET
        case 'R': { const Val args = pop(), fn = pop(); push(call(fn, args)); break; }  // REDUCE
        case 0x81: { const Val args = pop(), cls = pop(); push(call(cls, args)); break; }  // NEWOBJ
        case 'b': pop(); break;  // BUILD: an OrderedDict's _metadata, a tensor's state: not needed for the values
        case 's': { const Val v = pop(), k = pop(); dict(top())->pairs.emplace_back(k, v); break; }  // SETITEM
        case 'u': {                                              // SETITEMS
          auto kv = pop_mark();
          Val d = dict(top());
          for (std::size_t i = 0; i + 1 < kv.size(); i += 2) d->pairs.emplace_back(kv[i], kv[i + 1]);
          break;
        }
        case 'a': { const Val v = pop(); list(top())->items.push_back(v); break; }  // APPEND
        case 'e': {                                              // APPENDS
          auto vs = pop_mark();
          Val l = list(top());
          l->items.insert(l->items.end(), vs.begin(), vs.end());
          break;
        }
        case 'Q': push(storage(pop())); break;                   // BINPERSID
        case '.': return pop();                                  // STOP
        default: {
          char hex[8];
          std::snprintf(hex, sizeof hex, "0x%02x", op);
          throw Error(std::string("unsupported pickle opcode ") + hex + " at byte " + std::to_string(pos_ - 1));
        }
      }
    }
  }

 private:
  char byte() {
    if (pos_ >= p_.size()) throw Error("the pickle ends early");
    return p_[pos_++];
  }
  std::string take(std::size_t n) {
    if (n > p_.size() - pos_) throw Error("the pickle ends early");
    std::string s = p_.substr(pos_, n);
    pos_ += n;
    return s;
  }
  uint64_t le(std::size_t n) {
    const std::string b = take(n);
    uint64_t u = 0;
    for (std::size_t i = n; i-- > 0;) u = (u << 8) | static_cast<unsigned char>(b[i]);
    return u;
  }
  std::string line() {
    const auto nl = p_.find('\n', pos_);
    if (nl == std::string::npos) throw Error("the pickle ends early");
    std::string s = p_.substr(pos_, nl - pos_);
    pos_ = nl + 1;
    return s;
  }
  void push(Val v) { stack_.push_back(std::move(v)); }
  void push_str(std::string s) { auto v = make(Obj::Str); v->s = std::move(s); push(v); }
  void push_int(int64_t i) { auto v = make(Obj::Int); v->i = i; push(v); }
  void push_global(std::string name) { auto v = make(Obj::Global); v->s = std::move(name); push(v); }
  Val pop() {
    if (stack_.empty()) throw Error("malformed pickle (stack underflow)");
    Val v = stack_.back();
    stack_.pop_back();
    return v;
  }
  const Val& top() const {
    if (stack_.empty()) throw Error("malformed pickle (empty stack)");
    return stack_.back();
  }
  std::vector<Val> pop_mark() {
    std::vector<Val> out;
    for (;;) {
      Val v = pop();
      if (v->kind == Obj::Mark) break;
      out.push_back(v);
    }
    return {out.rbegin(), out.rend()};
  }
  Val memo(uint64_t k) const {
    auto it = memo_.find(k);
    if (it == memo_.end()) throw Error("malformed pickle (memo " + std::to_string(k) + " unset)");
    return it->second;
  }
  static const Val& dict(const Val& v) {
    if (v->kind != Obj::Dict) throw Error("malformed pickle (SETITEM on a non-dict)");
    return v;
  }
  static const Val& list(const Val& v) {
    if (v->kind != Obj::List) throw Error("malformed pickle (APPEND on a non-list)");
    return v;
  }
  static std::vector<int64_t> ints(const Val& v) {
    std::vector<int64_t> out;
    for (const auto& x : v->items) out.push_back(x->i);
    return out;
  }

  // ('storage', torch.<Type>Storage, key, location, numel): the record data/<key>, loaded once per key.
  Val storage(const Val& pid) {
    if (pid->kind != Obj::Tuple || pid->items.size() < 5 || pid->items[0]->s != "storage")
      throw Error("unsupported persistent id in the pickle (expected a storage)");
    const at::ScalarType dtype = dtype_of_storage(pid->items[1]->s);
    const std::string key = pid->items[2]->s;
    auto it = storages_.find(key);
    if (it != storages_.end()) return it->second;
    const int64_t numel = pid->items[4]->i;
    auto record = zip_.getRecord("data/" + key);
    const std::size_t bytes = std::get<1>(record);
    if (bytes != static_cast<std::size_t>(numel) * at::elementSize(dtype))
      throw Error("storage " + key + " holds " + std::to_string(bytes) + " bytes, expected " + std::to_string(numel) +
                  " elements of " + c10::toString(dtype));
    at::Tensor flat = at::empty({numel}, at::TensorOptions().dtype(dtype));
    if (bytes) std::memcpy(flat.data_ptr(), std::get<0>(record).get(), bytes);
    Val v = make(Obj::Storage);
    v->t = flat;
    storages_[key] = v;
    return v;
  }

  Val call(const Val& fn, const Val& args) {
    if (fn->kind != Obj::Global) throw Error("malformed pickle (calling a non-global)");
    const std::string& name = fn->s;
    const auto& a = args->items;
    if (name == "collections.OrderedDict" || name == "builtins.dict") return make(Obj::Dict);
    if (name == "torch._utils._rebuild_tensor_v2" || name == "torch._utils._rebuild_tensor") {
      // (storage, storage_offset, size, stride, ...)
      if (a.size() < 4 || a[0]->kind != Obj::Storage) throw Error("malformed tensor in the pickle");
      Val v = make(Obj::Tensor);
      v->t = a[0]->t.as_strided(ints(a[2]), ints(a[3]), a[1]->i);
      return v;
    }
    if (name == "torch._utils._rebuild_parameter" || name == "torch._utils._rebuild_parameter_with_state") {
      if (a.empty() || a[0]->kind != Obj::Tensor) throw Error("malformed parameter in the pickle");
      return a[0];
    }
    throw Error("the pickle holds a " + name + " object, which a state dict of tensors does not need (not loaded)");
  }

  caffe2::serialize::PyTorchStreamReader& zip_;
  const std::string& p_;
  std::size_t pos_ = 0;
  std::vector<Val> stack_;
  std::unordered_map<uint64_t, Val> memo_;
  std::unordered_map<std::string, Val> storages_;
};

}  // namespace

std::vector<std::pair<std::string, at::Tensor>> read_torch_save_state_dict(const std::string& path) {
  Val top;
  try {
    caffe2::serialize::PyTorchStreamReader zip(path);
    auto record = zip.getRecord("data.pkl");
    const std::string pickle(static_cast<const char*>(std::get<0>(record).get()), std::get<1>(record));
    top = Machine(zip, pickle).run();
  } catch (const Error& e) {
    throw Error(path + ": " + e.what());
  } catch (const std::exception& e) {
    std::string why = e.what();
    if (auto nl = why.find('\n'); nl != std::string::npos) why = why.substr(0, nl);
    throw Error(path + ": not a file saved by torch.save (zip format): " + why);
  }
  if (top->kind != Obj::Dict)
    throw Error(path + ": expected a {name: tensor} dict (torch.save(model.state_dict())) at the top of the file");
  std::vector<std::pair<std::string, at::Tensor>> out;
  for (const auto& [k, v] : top->pairs) {
    if (k->kind != Obj::Str) throw Error(path + ": a key of the top-level dict is not a string");
    if (v->kind != Obj::Tensor)
      throw Error(path + ": '" + k->s + "' is not a tensor (expected a state dict: torch.save(model.state_dict()))");
    out.emplace_back(k->s, v->t);
  }
  return out;
}

}  // namespace isp
