// Self time per operator through RecordFunction callbacks (isp/op_profile.h).
#include "isp/op_profile.h"

#include <ATen/record_function.h>

#include <algorithm>
#include <chrono>
#include <cstdio>
#include <map>
#include <mutex>
#include <vector>

namespace isp {

struct OpProfile::State {
  struct Totals {
    int64_t calls = 0;
    double self_seconds = 0;
  };
  std::mutex mutex;
  std::map<std::string, Totals> by_name;
};

namespace {

// One profile at a time: the callbacks are plain function pointers and find their state here.
std::shared_ptr<OpProfile::State> g_state;
std::mutex g_state_mutex;

struct Frame {
  double start = 0, children = 0;
};
thread_local std::vector<Frame> t_stack;

double now() {
  return std::chrono::duration<double>(std::chrono::steady_clock::now().time_since_epoch()).count();
}

std::unique_ptr<at::ObserverContext> on_start(const at::RecordFunction&) {
  t_stack.push_back({now(), 0.0});
  return nullptr;
}

void on_end(const at::RecordFunction& fn, at::ObserverContext*) {
  if (t_stack.empty()) return;  // started before the profile
  const Frame f = t_stack.back();
  t_stack.pop_back();
  const double total = now() - f.start;
  if (!t_stack.empty()) t_stack.back().children += total;
  std::shared_ptr<OpProfile::State> s;
  {
    std::lock_guard<std::mutex> lock(g_state_mutex);
    s = g_state;
  }
  if (!s) return;
  std::lock_guard<std::mutex> lock(s->mutex);
  auto& t = s->by_name[fn.name()];
  ++t.calls;
  t.self_seconds += total - f.children;
}

}  // namespace

OpProfile::OpProfile() : state_(std::make_shared<State>()) {
  {
    std::lock_guard<std::mutex> lock(g_state_mutex);
    g_state = state_;
  }
  handle_ = at::addGlobalCallback(at::RecordFunctionCallback(on_start, on_end)
                                      .needsInputs(false)
                                      .scopes({at::RecordScope::FUNCTION, at::RecordScope::BACKWARD_FUNCTION}));
}

OpProfile::~OpProfile() {
  at::removeCallback(handle_);
  std::lock_guard<std::mutex> lock(g_state_mutex);
  if (g_state == state_) g_state.reset();
}

std::string OpProfile::table(int top, double per) const {
  std::vector<std::pair<std::string, State::Totals>> rows;
  double total = 0;
  {
    std::lock_guard<std::mutex> lock(state_->mutex);
    for (const auto& [name, t] : state_->by_name) {
      rows.emplace_back(name, t);
      total += t.self_seconds;
    }
  }
  std::sort(rows.begin(), rows.end(),
            [](const auto& a, const auto& b) { return a.second.self_seconds > b.second.self_seconds; });
  std::string out;
  char line[256];
  std::snprintf(line, sizeof line, "%-44s %10s %12s %7s\n", "operator (self time)", "calls", "ms", "share");
  out += line;
  for (int i = 0; i < top && i < static_cast<int>(rows.size()); ++i) {
    const auto& [name, t] = rows[static_cast<std::size_t>(i)];
    std::snprintf(line, sizeof line, "%-44s %10.1f %12.2f %6.1f%%\n", name.substr(0, 44).c_str(),
                  static_cast<double>(t.calls) / per, 1000.0 * t.self_seconds / per,
                  total > 0 ? 100.0 * t.self_seconds / total : 0.0);
    out += line;
  }
  std::snprintf(line, sizeof line, "%-44s %10s %12.2f\n", "all recorded operators", "", 1000.0 * total / per);
  out += line;
  return out;
}

}  // namespace isp
