#pragma once
// Include torch before doctest and drop glog's CHECK macros, which would silently replace doctest's (a CHECK
// that can never fail).
#include <torch/torch.h>
#undef CHECK
#undef CHECK_EQ
#undef CHECK_NE
#undef CHECK_LT
#undef CHECK_LE
#undef CHECK_GT
#undef CHECK_GE
#include <doctest/doctest.h>

#include <fcntl.h>
#include <spawn.h>
#include <sys/wait.h>
#include <unistd.h>

#include <cstdlib>
#include <filesystem>
#include <functional>
#include <string>
#include <vector>

#include "temp_dirs.h"

#include "isp/registry/build_context.h"
#include "isp/registry/registry.h"

extern char** environ;

namespace isp_test {
inline std::string plugin(const std::string& name) { return std::string(ISP_TEST_PLUGIN_DIR) + "/lib" + name + ".so"; }
inline std::string fixture(const std::string& name) { return std::string(ISP_TEST_FIXTURE_DIR) + "/lib" + name + ".so"; }
inline isp::Where where(const std::string& p) { return {"test.json", p}; }
// One registry with every plugin of the build, shared by the tests of a process (never unloaded).
inline isp::Registry& shared_registry() {
  static isp::Registry* reg = [] {
    auto* r = new isp::Registry();
    r->scan_directory(ISP_TEST_PLUGIN_DIR);
    return r;
  }();
  return *reg;
}
// Starts `exe args...` (argv[0] = exe) with extra environment entries before the inherited ones, stdout and stderr
// appended to `log`.
inline pid_t spawn_logged(const std::string& exe, const std::vector<std::string>& args,
                          const std::vector<std::string>& env, const std::filesystem::path& log) {
  std::vector<std::string> a{exe};
  a.insert(a.end(), args.begin(), args.end());
  std::vector<char*> argv;
  for (auto& x : a) argv.push_back(x.data());
  argv.push_back(nullptr);
  std::vector<std::string> envs = env;
  for (char** e = environ; *e; ++e) envs.emplace_back(*e);
  std::vector<char*> envp;
  for (auto& e : envs) envp.push_back(e.data());
  envp.push_back(nullptr);
  posix_spawn_file_actions_t fa;
  posix_spawn_file_actions_init(&fa);
  posix_spawn_file_actions_addopen(&fa, 1, log.c_str(), O_WRONLY | O_CREAT | O_APPEND, 0644);
  posix_spawn_file_actions_adddup2(&fa, 1, 2);
  pid_t pid = -1;
  const int rc = posix_spawn(&pid, exe.c_str(), &fa, nullptr, argv.data(), envp.data());
  posix_spawn_file_actions_destroy(&fa);
  REQUIRE(rc == 0);
  return pid;
}
// Waits for `pid`: its exit code, or -signal.
inline int exit_status(pid_t pid) {
  int status = 0;
  REQUIRE(::waitpid(pid, &status, 0) == pid);
  return WIFEXITED(status) ? WEXITSTATUS(status) : -WTERMSIG(status);
}
// The python3 that has torch: Debian's python3-torch belongs to /usr/bin/python3, which another python3 on PATH
// (pyenv, a venv) may hide. "" when none has it.
inline std::string python_with_torch() {
  for (const char* py : {"/usr/bin/python3", "python3"})
    if (std::system((std::string(py) + " -c 'import torch' >/dev/null 2>&1").c_str()) == 0) return py;
  return "";
}
// The message of the exception `f` throws, or "" when it does not throw.
inline std::string error_of(const std::function<void()>& f) {
  try {
    f();
  } catch (const std::exception& e) {
    return e.what();
  }
  return "";
}
}  // namespace isp_test
