// The torchrun-like launcher behind `isp run --nproc-per-node N` (isp/distributed.h: launch), and the workers'
// own logs (WorkerLog).
#include "isp/distributed.h"

#include <fcntl.h>
#include <signal.h>
#include <spawn.h>
#include <sys/wait.h>
#include <unistd.h>

#include <atomic>
#include <csignal>
#include <chrono>
#include <cstdio>
#include <cstring>
#include <filesystem>
#include <string>
#include <thread>
#include <vector>

#include "isp/registry/error.h"

extern char** environ;

namespace isp {
namespace dist {

namespace {
std::atomic<int> g_forward_signal{0};
extern "C" void on_launcher_signal(int sig) { g_forward_signal.store(sig); }

double seconds_now() {
  return std::chrono::duration<double>(std::chrono::steady_clock::now().time_since_epoch()).count();
}

std::string describe_status(int status) {
  if (WIFEXITED(status)) return "exited with status " + std::to_string(WEXITSTATUS(status));
  if (WIFSIGNALED(status)) return std::string("was killed by signal ") + std::to_string(WTERMSIG(status)) + " (" +
                                  strsignal(WTERMSIG(status)) + ")";
  return "stopped";
}
}  // namespace

WorkerLog::WorkerLog(int rank, const std::string& log_path) : path_(log_path) {
  if (rank == 0) return;
  std::filesystem::create_directories(std::filesystem::path(log_path).parent_path());
  const int fd = ::open(log_path.c_str(), O_WRONLY | O_CREAT | O_APPEND | O_CLOEXEC, 0644);
  if (fd < 0) return;  // then the console it stays
  std::fflush(stderr);
  console_ = ::dup(STDERR_FILENO);
  ::dup2(fd, STDERR_FILENO);
  ::close(fd);
}

WorkerLog::~WorkerLog() {
  if (console_ < 0) return;
  std::fflush(stderr);
  ::dup2(console_, STDERR_FILENO);
  ::close(console_);
}

int launch(const std::vector<std::string>& args, const LaunchOptions& o) {
  if (o.nproc_per_node < 1) throw Error("--nproc-per-node: expected at least 1");
  if (o.nnodes < 1 || o.node_rank < 0 || o.node_rank >= o.nnodes)
    throw Error("--node-rank " + std::to_string(o.node_rank) + " must lie in [0, --nnodes " + std::to_string(o.nnodes) + ")");
  char self[4096];
  const ssize_t len = ::readlink("/proc/self/exe", self, sizeof self - 1);
  if (len <= 0) throw Error("launcher: cannot find this executable (/proc/self/exe)");
  self[len] = '\0';
  const int world = o.nnodes * o.nproc_per_node;

  // The environment of every worker: ours, minus any torchrun variables, plus its own.
  std::vector<std::string> base_env;
  static const char* kOwn[] = {"RANK=", "WORLD_SIZE=", "LOCAL_RANK=", "LOCAL_WORLD_SIZE=", "MASTER_ADDR=", "MASTER_PORT=",
                               "GROUP_RANK="};
  for (char** e = environ; *e; ++e) {
    bool own = false;
    for (const char* k : kOwn) own = own || std::strncmp(*e, k, std::strlen(k)) == 0;
    if (!own) base_env.emplace_back(*e);
  }
  std::vector<pid_t> pids(static_cast<std::size_t>(o.nproc_per_node), -1);
  auto previous_int = std::signal(SIGINT, on_launcher_signal);
  auto previous_term = std::signal(SIGTERM, on_launcher_signal);
  g_forward_signal.store(0);
  auto kill_all = [&](int sig) {
    for (pid_t p : pids)
      if (p > 0) ::kill(p, sig);
  };
  for (int local = 0; local < o.nproc_per_node; ++local) {
    const int rank = o.node_rank * o.nproc_per_node + local;
    std::vector<std::string> env = base_env;
    env.push_back("RANK=" + std::to_string(rank));
    env.push_back("WORLD_SIZE=" + std::to_string(world));
    env.push_back("LOCAL_RANK=" + std::to_string(local));
    env.push_back("LOCAL_WORLD_SIZE=" + std::to_string(o.nproc_per_node));
    env.push_back("GROUP_RANK=" + std::to_string(o.node_rank));
    env.push_back("MASTER_ADDR=" + o.master_addr);
    env.push_back("MASTER_PORT=" + std::to_string(o.master_port));
    std::vector<char*> envp, argv;
    for (auto& s : env) envp.push_back(s.data());
    envp.push_back(nullptr);
    argv.push_back(self);
    std::vector<std::string> a = args;
    for (auto& s : a) argv.push_back(s.data());
    argv.push_back(nullptr);
    pid_t pid = -1;
    const int rc = ::posix_spawn(&pid, self, nullptr, nullptr, argv.data(), envp.data());
    if (rc != 0) {
      kill_all(SIGTERM);
      throw Error(std::string("launcher: cannot start rank ") + std::to_string(rank) + ": " + std::strerror(rc));
    }
    pids[static_cast<std::size_t>(local)] = pid;
  }
  std::fprintf(stderr, "[launcher] node %d of %d: started ranks %d..%d of %d (master %s:%d)\n", o.node_rank, o.nnodes,
               o.node_rank * o.nproc_per_node, o.node_rank * o.nproc_per_node + o.nproc_per_node - 1, world,
               o.master_addr.c_str(), o.master_port);

  int result = 0, running = o.nproc_per_node;
  double failed_at = -1;
  bool terminated = false;
  while (running > 0) {
    if (int sig = g_forward_signal.exchange(0)) kill_all(sig);  // Ctrl-C: every rank checkpoints and stops
    int status = 0;
    const pid_t done = ::waitpid(-1, &status, WNOHANG);
    if (done > 0) {
      for (int local = 0; local < o.nproc_per_node; ++local) {
        if (pids[static_cast<std::size_t>(local)] != done) continue;
        pids[static_cast<std::size_t>(local)] = -1;
        --running;
        const bool ok = WIFEXITED(status) && WEXITSTATUS(status) == 0;
        if (!ok) {
          const int rank = o.node_rank * o.nproc_per_node + local;
          const int code = WIFEXITED(status) ? WEXITSTATUS(status) : 128 + WTERMSIG(status);
          if (result == 0) result = code;
          if (failed_at < 0 && running > 0) {
            failed_at = seconds_now();
            std::fprintf(stderr, "[launcher] rank %d (pid %d) %s; the other ranks stop on their own (their next "
                         "collective fails) or are terminated in %.0f s\n", rank, static_cast<int>(done),
                         describe_status(status).c_str(), o.grace_s);
          } else {
            std::fprintf(stderr, "[launcher] rank %d (pid %d) %s\n", rank, static_cast<int>(done), describe_status(status).c_str());
          }
        }
      }
      continue;
    }
    if (failed_at >= 0 && !terminated && seconds_now() - failed_at > o.grace_s) {
      std::fprintf(stderr, "[launcher] terminating the remaining ranks\n");
      kill_all(SIGTERM);
      terminated = true;
    }
    if (terminated && seconds_now() - failed_at > o.grace_s + 10) kill_all(SIGKILL);
    std::this_thread::sleep_for(std::chrono::milliseconds(50));
  }
  std::signal(SIGINT, previous_int);
  std::signal(SIGTERM, previous_term);
  return result;
}

}  // namespace dist
}  // namespace isp
