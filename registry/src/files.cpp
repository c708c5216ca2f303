// Whole-file reads and atomic writes (temporary file in the same folder, fsync, rename): every file a run
// writes goes through write_file_atomic, so a crash never leaves a half-written checkpoint or report.
#include <atomic>
#include <fcntl.h>
#include <unistd.h>

#include <cerrno>
#include <csignal>
#include <cstdio>
#include <cstdlib>
#include <cstring>

#include <filesystem>
#include <fstream>
#include <sstream>

#include "isp/registry/recipe.h"

namespace fs = std::filesystem;

namespace isp {

std::string read_text_file(const std::string& path) {
  std::ifstream in(path, std::ios::binary);
  if (!in) throw Error(path + ": cannot open file");
  std::ostringstream ss;
  ss << in.rdbuf();
  return ss.str();
}

namespace {
// Fault injection for the kill -9 test: ISP_KILL_DURING_WRITE=N makes the N-th atomic write of this process die
// by SIGKILL halfway through its temporary file, the worst moment for a crash.
bool kill_now() {
  static const long target = [] {
    const char* v = std::getenv("ISP_KILL_DURING_WRITE");
    return v ? std::atol(v) : 0L;
  }();
  static long count = 0;
  return target > 0 && ++count == target;
}
}  // namespace

namespace {
std::atomic<bool> g_writes_files{true};
}
void set_writes_files(bool enabled) { g_writes_files.store(enabled); }
bool writes_files() { return g_writes_files.load(); }

void write_file_atomic(const std::string& path, const std::string& content) {
  if (!writes_files()) return;
  const bool die_halfway = kill_now();
  fs::path p(path);
  if (p.has_parent_path()) fs::create_directories(p.parent_path());
  std::string tmp = path + ".tmp." + std::to_string(::getpid());
  {
    int fd = ::open(tmp.c_str(), O_WRONLY | O_CREAT | O_TRUNC, 0644);
    if (fd < 0) throw Error(tmp + ": cannot create file (" + std::strerror(errno) + ")");
    const char* data = content.data();
    std::size_t left = content.size();
    if (die_halfway) {
      if (::write(fd, data, left / 2) < 0) std::perror(tmp.c_str());
      ::raise(SIGKILL);
    }
    while (left > 0) {
      ssize_t n = ::write(fd, data, left);
      if (n < 0 && errno == EINTR) continue;
      if (n <= 0) {
        const std::string why = n < 0 ? std::strerror(errno) : "no progress";
        ::close(fd);
        ::unlink(tmp.c_str());
        throw Error(path + ": write failed (" + why + "); the previous version of the file is unchanged");
      }
      data += n;
      left -= static_cast<std::size_t>(n);
    }
    const int synced = ::fsync(fd) == 0 ? 0 : errno;
    const int closed = ::close(fd) == 0 ? 0 : errno;
    if (synced != 0 || closed != 0) {
      const std::string why = std::strerror(synced != 0 ? synced : closed);
      ::unlink(tmp.c_str());
      throw Error(path + ": write failed (" + why + "); the previous version of the file is unchanged");
    }
  }
  fs::rename(tmp, path);
}

}  // namespace isp
