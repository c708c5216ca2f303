// doctest main. Torch headers are not included here; see test_support.h for the glog CHECK clash.
#define DOCTEST_CONFIG_IMPLEMENT
#include <doctest/doctest.h>

#include <ATen/Parallel.h>

namespace isp { bool keep_freed_memory_in_process(); }  // isp/accel.h, without its torch headers

int main(int argc, char** argv) {
  isp::keep_freed_memory_in_process();
  at::set_num_threads(2);  // LibTorch starts with 1 thread on small VMs
  doctest::Context ctx(argc, argv);
  return ctx.run();
}
