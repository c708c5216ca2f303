// Data-parallel runs on c10d (isp/distributed.h): the process group and collectives with clear errors. The
// gradient buckets are in gradient_buckets.cpp, SyncBatchNorm in sync_batchnorm.cpp, the launcher in launch.cpp.
#include "isp/distributed.h"

#include <torch/nn/module.h>
#include <torch/csrc/distributed/c10d/TCPStore.hpp>
#if ISP_HAVE_GLOO
#include <torch/csrc/distributed/c10d/ProcessGroupGloo.hpp>
#endif
#if ISP_HAVE_NCCL
#include <torch/csrc/distributed/c10d/ProcessGroupNCCL.hpp>
#endif

#include <ATen/ATen.h>
#include <c10/core/GradMode.h>

#include <algorithm>
#include <chrono>
#include <cstdlib>
#include <map>
#include <mutex>

#include "isp/registry/error.h"
#include "isp/registry/recipe.h"
#include "distributed_internal.h"

namespace isp {
namespace dist {

namespace {

// The collectives isp uses, over ProcessGroupGloo / ProcessGroupNCCL. (LibTorch 1.13 derives them from
// c10d::ProcessGroup, 2.x from c10d::Backend; both have these methods, hence a template.)
struct Comm {
  virtual ~Comm() = default;
  virtual c10::intrusive_ptr<c10d::Work> allreduce(std::vector<at::Tensor>& t, c10d::ReduceOp op) = 0;
  virtual c10::intrusive_ptr<c10d::Work> broadcast(std::vector<at::Tensor>& t) = 0;
  virtual c10::intrusive_ptr<c10d::Work> allgather(std::vector<std::vector<at::Tensor>>& out, std::vector<at::Tensor>& in) = 0;
  virtual c10::intrusive_ptr<c10d::Work> barrier() = 0;
};
template <class PG>
struct CommOf : Comm {
  explicit CommOf(c10::intrusive_ptr<PG> p) : pg(std::move(p)) {}
  c10::intrusive_ptr<PG> pg;
  c10::intrusive_ptr<c10d::Work> allreduce(std::vector<at::Tensor>& t, c10d::ReduceOp op) override {
    c10d::AllreduceOptions o;
    o.reduceOp = op;
    return pg->allreduce(t, o);
  }
  c10::intrusive_ptr<c10d::Work> broadcast(std::vector<at::Tensor>& t) override { return pg->broadcast(t); }
  c10::intrusive_ptr<c10d::Work> allgather(std::vector<std::vector<at::Tensor>>& out, std::vector<at::Tensor>& in) override {
    return pg->allgather(out, in);
  }
  c10::intrusive_ptr<c10d::Work> barrier() override { return pg->barrier(); }
};

struct Group {
  WorldInfo world;
  Settings settings;
  c10::Device device = c10::Device(c10::kCPU);
  std::string backend = "none";
  c10::intrusive_ptr<c10d::Store> store;
  std::unique_ptr<Comm> comm;
};
std::unique_ptr<Group> g_group;
Settings g_settings;  // the run's settings, also in one process (dist_allow_reshard applies there too)

std::string where() {
  if (!g_group) return "distributed";
  return "distributed (rank " + std::to_string(g_group->world.rank) + " of " + std::to_string(g_group->world.world_size) +
         ", " + g_group->backend + ")";
}

// Runs a collective and waits; a failure (peer gone, timeout) becomes an isp::Error that says what to look at.
void wait_for(const c10::intrusive_ptr<c10d::Work>& work, const std::string& what) {
  try {
    work->wait();
  } catch (const std::exception& e) {
    std::string msg = e.what();
    if (auto nl = msg.find('\n'); nl != std::string::npos) msg = msg.substr(0, nl);
    throw Error(where() + ": " + what + " failed: " + msg + ". Another rank has probably stopped (see its log) or " +
                "did not answer within runtime.dist_timeout_s = " + std::to_string(static_cast<int>(g_group->settings.timeout_s)) +
                " s; the run folder stays resumable with --resume");
  }
}
template <class F>
void collective(const std::string& what, F&& launch) {
  c10::intrusive_ptr<c10d::Work> w;
  try {
    w = launch();
  } catch (const std::exception& e) {
    throw Error(where() + ": " + what + " could not start: " + e.what());
  }
  wait_for(w, what);
}

// Tensors travel on the CPU with Gloo, on the device with NCCL.
at::Tensor for_comm(const at::Tensor& t) {
  if (g_group->backend == "nccl") return t.to(g_group->device).contiguous();
  return t.cpu().contiguous();
}

int env_int(const char* name, int fallback, int min_value) {
  const char* v = std::getenv(name);
  if (!v || !*v) return fallback;
  char* end = nullptr;
  const long x = std::strtol(v, &end, 10);
  if (*end != '\0' || x < min_value || x > 1 << 20)
    throw Error(std::string("environment variable ") + name + "=\"" + v + "\": expected an integer >= " +
                std::to_string(min_value));
  return static_cast<int>(x);
}

}  // namespace

WorldInfo world_from_env() {
  WorldInfo w;
  w.world_size = env_int("WORLD_SIZE", 1, 1);
  w.rank = env_int("RANK", 0, 0);
  w.local_rank = env_int("LOCAL_RANK", w.rank, 0);
  if (w.rank >= w.world_size)
    throw Error("environment: RANK=" + std::to_string(w.rank) + " is not below WORLD_SIZE=" + std::to_string(w.world_size));
  if (const char* a = std::getenv("MASTER_ADDR"); a && *a) w.master_addr = a;
  w.master_port = env_int("MASTER_PORT", 29500, 1);
  if (w.master_port > 65535) throw Error("environment: MASTER_PORT=" + std::to_string(w.master_port) + " is not a port");
  return w;
}

bool gloo_available() { return ISP_HAVE_GLOO != 0; }
bool nccl_available() { return ISP_HAVE_NCCL != 0; }

void init(const WorldInfo& w, const Settings& s, c10::Device device) {
  g_settings = s;
  if (w.world_size <= 1) return;
  if (g_group) throw Error("distributed: init called twice");
  std::string backend = s.backend;
  if (backend == "auto") backend = device.is_cuda() ? "nccl" : "gloo";
  if (backend == "nccl" && !device.is_cuda())
    throw Error("runtime.dist_backend: nccl needs runtime.device cuda; the device is " + device.str() + " (use gloo)");
  if (backend == "gloo" && !gloo_available())
    throw Error("runtime.dist_backend: this build of isp has no Gloo backend (its LibTorch's gloo headers were not "
                "found at build time; on Debian install libgloo-dev and rebuild)");
  if (backend == "nccl" && !nccl_available())
    throw Error("runtime.dist_backend: this build of isp has no NCCL backend (a CUDA LibTorch with c10d NCCL is needed)");
  auto group = std::make_unique<Group>();
  group->world = w;
  group->settings = s;
  group->device = device;
  group->backend = backend;
  const auto timeout = std::chrono::milliseconds(static_cast<int64_t>(s.timeout_s * 1000));
  const std::string ep = w.master_addr + ":" + std::to_string(w.master_port);
  try {
    c10d::TCPStoreOptions o;
    o.port = static_cast<std::uint16_t>(w.master_port);
    o.isServer = w.rank == 0;
    o.numWorkers = static_cast<std::size_t>(w.world_size);
    o.waitWorkers = true;
    o.timeout = timeout;
    group->store = c10::make_intrusive<c10d::TCPStore>(w.master_addr, o);
  } catch (const std::exception& e) {
    std::string msg = e.what();
    if (auto nl = msg.find('\n'); nl != std::string::npos) msg = msg.substr(0, nl);
    throw Error("distributed (rank " + std::to_string(w.rank) + " of " + std::to_string(w.world_size) +
                "): rendezvous at " + ep + " failed: " + msg + " (is MASTER_PORT free, and did every rank start " +
                "within runtime.dist_timeout_s = " + std::to_string(static_cast<int>(s.timeout_s)) + " s?)");
  }
  try {
#if ISP_HAVE_GLOO
    if (backend == "gloo") {
      auto opts = c10d::ProcessGroupGloo::Options::create(timeout);
      // Loopback rendezvous (one machine): bind Gloo to loopback too; otherwise the address this host's name
      // resolves to, as torch.distributed does.
      const bool loopback = w.master_addr.rfind("127.", 0) == 0 || w.master_addr == "localhost";
      opts->devices.push_back(loopback ? c10d::ProcessGroupGloo::createDeviceForHostname("127.0.0.1")
                                       : c10d::ProcessGroupGloo::createDefaultDevice());
      group->comm = std::make_unique<CommOf<c10d::ProcessGroupGloo>>(
          c10::make_intrusive<c10d::ProcessGroupGloo>(group->store, w.rank, w.world_size, opts));
    }
#endif
#if ISP_HAVE_NCCL
    if (backend == "nccl") {
      auto opts = c10d::ProcessGroupNCCL::Options::create();
      opts->timeout = timeout;
      group->comm = std::make_unique<CommOf<c10d::ProcessGroupNCCL>>(
          c10::make_intrusive<c10d::ProcessGroupNCCL>(group->store, w.rank, w.world_size, opts));
    }
#endif
  } catch (const std::exception& e) {
    throw Error("distributed (rank " + std::to_string(w.rank) + " of " + std::to_string(w.world_size) + "): creating the " +
                backend + " process group failed: " + e.what());
  }
  if (!group->comm) throw Error("distributed: backend " + backend + " is not in this build");
  g_group = std::move(group);
  set_writes_files(w.rank == 0);
  barrier("joining the process group");
}

void shutdown() {
  g_group.reset();
  g_settings = Settings();
  set_writes_files(true);
}
bool active() { return g_group != nullptr; }
const Settings& settings() { return g_settings; }
int rank() { return g_group ? g_group->world.rank : 0; }
int world_size() { return g_group ? g_group->world.world_size : 1; }
std::string backend() { return g_group ? g_group->backend : "none"; }

void barrier(const std::string& what) {
  if (!g_group) return;
  collective("barrier (" + what + ")", [&] { return g_group->comm->barrier(); });
}

namespace {
// Tensors of one dtype as one flat buffer (Gloo's broadcast/allreduce take one tensor per device, not a list).
void over_flat_buffers(std::vector<at::Tensor>& tensors, const std::function<void(at::Tensor&)>& op) {
  std::map<c10::ScalarType, std::vector<at::Tensor*>> by_type;
  for (auto& t : tensors)
    if (t.defined() && t.numel() > 0) by_type[t.scalar_type()].push_back(&t);
  c10::NoGradGuard ng;
  for (auto& [type, list] : by_type) {
    std::vector<at::Tensor> flat;
    for (auto* t : list) flat.push_back(t->detach().reshape({-1}));
    at::Tensor buf = for_comm(at::cat(flat));
    op(buf);
    int64_t off = 0;
    for (auto* t : list) {
      const int64_t n = t->numel();
      t->detach().copy_(buf.narrow(0, off, n).view(t->sizes()));
      off += n;
    }
  }
}
}  // namespace

void broadcast(std::vector<at::Tensor> tensors, const std::string& what) {
  if (!g_group) return;
  over_flat_buffers(tensors, [&](at::Tensor& buf) {
    std::vector<at::Tensor> v{buf};
    collective("broadcast (" + what + ")", [&] { return g_group->comm->broadcast(v); });
  });
}

void allreduce_sum(at::Tensor t, const std::string& what) {
  if (!g_group) return;
  std::vector<at::Tensor> v{t};
  over_flat_buffers(v, [&](at::Tensor& buf) {
    std::vector<at::Tensor> b{buf};
    collective("allreduce (" + what + ")", [&] { return g_group->comm->allreduce(b, c10d::ReduceOp::SUM); });
  });
}

double allreduce_max(double v, const std::string& what) {
  if (!g_group) return v;
  std::vector<at::Tensor> b{for_comm(at::full({1}, v, at::kDouble))};
  collective("allreduce (" + what + ")", [&] { return g_group->comm->allreduce(b, c10d::ReduceOp::MAX); });
  return b[0].cpu().item<double>();
}

std::vector<at::Tensor> allgather(const at::Tensor& t, const std::string& what) {
  if (!g_group) return {t};
  std::vector<at::Tensor> in{for_comm(t)};
  std::vector<std::vector<at::Tensor>> out(1);
  for (int r = 0; r < g_group->world.world_size; ++r) out[0].push_back(at::empty_like(in[0]));
  collective("allgather (" + what + ")", [&] { return g_group->comm->allgather(out, in); });
  std::vector<at::Tensor> res;
  for (auto& x : out[0]) res.push_back(x.to(t.device()));
  return res;
}

at::Tensor allgather_rows(const at::Tensor& local, int64_t n_total, const std::string& what) {
  if (!g_group) return local;
  const int world = g_group->world.world_size;
  const int64_t most = (n_total + world - 1) / world;  // equal shapes for allgather: pad every share to the largest
  std::vector<int64_t> shape = local.sizes().vec();
  shape[0] = most;
  at::Tensor padded = at::zeros(shape, local.options());
  if (local.size(0) > 0) padded.narrow(0, 0, local.size(0)).copy_(local);
  std::vector<at::Tensor> all = allgather(padded, what);
  std::vector<at::Tensor> parts;
  for (int r = 0; r < world; ++r) {
    const auto [begin, end] = shard_range(n_total, r, world);
    parts.push_back(all[static_cast<std::size_t>(r)].narrow(0, 0, end - begin));
  }
  return at::cat(parts, 0);
}

std::string broadcast_string(const std::string& s, const std::string& what) {
  if (!g_group) return s;
  std::vector<at::Tensor> len{for_comm(at::full({1}, static_cast<int64_t>(s.size()), at::kLong))};
  collective("broadcast (" + what + ")", [&] { return g_group->comm->broadcast(len); });
  const int64_t n = len[0].cpu().item<int64_t>();
  if (n == 0) return std::string();
  at::Tensor bytes = at::empty({n}, at::kByte);
  if (rank() == 0) std::memcpy(bytes.data_ptr(), s.data(), s.size());
  std::vector<at::Tensor> b{for_comm(bytes)};
  collective("broadcast (" + what + ")", [&] { return g_group->comm->broadcast(b); });
  at::Tensor host = b[0].cpu();
  return std::string(static_cast<const char*>(host.data_ptr()), static_cast<std::size_t>(n));
}

void broadcast_module(torch::nn::Module& m, bool parameters, bool buffers, const std::string& what) {
  if (!g_group) return;
  std::vector<at::Tensor> ts;
  if (parameters)
    for (auto& p : m.parameters()) ts.push_back(p);
  if (buffers)
    for (auto& b : m.buffers()) ts.push_back(b);
  broadcast(ts, what);
}

std::pair<int64_t, int64_t> shard_range(int64_t n, int r, int world) {
  const int64_t base = n / world, extra = n % world;
  const int64_t begin = r * base + std::min<int64_t>(r, extra);
  return {begin, begin + base + (r < extra ? 1 : 0)};
}

// What gradient_buckets.cpp needs of the group (distributed_internal.h).
namespace detail {
c10::intrusive_ptr<c10d::Work> start_allreduce_sum(at::Tensor t) {
  std::vector<at::Tensor> v{std::move(t)};
  return g_group->comm->allreduce(v, c10d::ReduceOp::SUM);
}
void wait(const c10::intrusive_ptr<c10d::Work>& work, const std::string& what) { wait_for(work, what); }
std::string where() { return dist::where(); }
}  // namespace detail

}  // namespace dist
}  // namespace isp
