#!/usr/bin/env bash
# scripts/build_cuda.sh [BUILD_DIR] [extra cmake args...]     (default BUILD_DIR: build-cuda, in the repo root)
#
# Builds isp on a GPU machine against the LibTorch inside the pip PyTorch of `python3` (CUDA wheels), where the
# header-only dependencies are not installed and cannot be downloaded: they come from .deps/include, packed on a
# Debian machine by scripts/pack_cuda_deps.sh and carried here (see cmake/IspHeaderDeps.cmake).
#
# Environment: PYTHON (default python3), ISP_BUILD_TESTS (default OFF), TORCH_CUDA_ARCH_LIST (default 9.0),
# ISP_CUDA_ARCHITECTURES (default 90), ISP_HEADER_DEPS_DIR (default <repo>/.deps/include), ISP_BUILD_TYPE
# (default Release), JOBS (default: nproc), ISP_BUILD_TARGETS (default: everything; e.g. isp_all = the binary and
# the plugins without the tests).
set -euo pipefail

repo=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
build=${1:-build-cuda}
[[ $# -gt 0 ]] && shift
[[ $build = /* ]] || build=$repo/$build
py=${PYTHON:-python3}
deps=${ISP_HEADER_DEPS_DIR:-$repo/.deps/include}
tests=${ISP_BUILD_TESTS:-OFF}
jobs=${JOBS:-$(nproc 2>/dev/null || echo 2)}

say() { echo "build_cuda: $*"; }
die() { echo "build_cuda: error: $*" >&2; exit 1; }

# --- CUDA toolkit: torch's CMake config (Caffe2 public/cuda.cmake) needs nvcc --------------------------------
if [[ -d /usr/local/cuda/bin ]]; then export PATH=/usr/local/cuda/bin:$PATH; fi
if ! command -v nvcc >/dev/null; then
  for d in "${CUDA_HOME:-}" "${CUDA_PATH:-}" "${CUDAToolkit_ROOT:-}"; do
    if [[ -n $d && -x $d/bin/nvcc ]]; then export PATH=$d/bin:$PATH; break; fi
  done
fi

# --- torch --------------------------------------------------------------------------------------------------
command -v "$py" >/dev/null || die "'$py' not found (set PYTHON=/path/to/python with torch installed)"
command -v cmake >/dev/null || die "cmake not found (pip install cmake, or apt-get install cmake)"
torch_info=$("$py" - <<'EOF' 2>&1
import sys
try:
    import os, torch
    print("prefix=" + torch.utils.cmake_prefix_path)
    print("version=" + torch.__version__)
    print("cuda=" + str(torch.version.cuda))
    try:
        print("available=" + str(torch.cuda.is_available()))
    except Exception as e:  # a driver problem must not stop a build
        print("available=unknown (%s)" % e)
    print("abi=" + str(int(torch._C._GLIBCXX_USE_CXX11_ABI)))
    print("lib=" + os.path.join(os.path.dirname(torch.__file__), "lib"))
except Exception as e:
    print("error=%s: %s" % (type(e).__name__, e))
    sys.exit(2)
EOF
) || die "'$py' cannot import torch: $(grep '^error=' <<<"$torch_info" | sed 's/^error=//' | head -1)
  Install PyTorch (pip install torch) or point PYTHON at an interpreter that has it."
kv() { grep "^$1=" <<<"$torch_info" | head -1 | cut -d= -f2-; }
torch_prefix=$(kv prefix)
torch_version=$(kv version)
torch_cuda=$(kv cuda)
torch_lib=$(kv lib)
[[ -d $torch_prefix/Torch ]] || die "no TorchConfig.cmake under $torch_prefix (this torch has no CMake files?)"
say "torch ${torch_version}, CUDA ${torch_cuda}, CUDA available: $(kv available), C++11 ABI: $(kv abi)"
say "torch CMake prefix: $torch_prefix"

if [[ $torch_cuda == None ]]; then
  say "warning: this is a CPU-only torch wheel; isp will build without CUDA"
elif command -v nvcc >/dev/null; then
  nvcc_version=$(nvcc --version | sed -n 's/.*release \([0-9][0-9.]*\).*/\1/p' | head -1)
  say "nvcc $(command -v nvcc): CUDA ${nvcc_version:-?}"
  if [[ -n $nvcc_version && ${nvcc_version%%.*} != "${torch_cuda%%.*}" ]]; then
    say "warning: nvcc is CUDA $nvcc_version but torch was built for CUDA $torch_cuda (major versions differ)"
  fi
else
  die "torch was built with CUDA $torch_cuda, and its CMake config needs the CUDA toolkit (nvcc), but nvcc is not on
  PATH, nor in /usr/local/cuda/bin, \$CUDA_HOME/bin or \$CUDAToolkit_ROOT/bin. Install the CUDA toolkit or set CUDA_HOME."
fi

# --- header-only dependencies -----------------------------------------------------------------------------
if [[ -d $deps ]]; then
  say "header-only dependencies: find_package first, else $deps"
else
  missing=()
  need=(nlohmann/json.hpp boost/dll/shared_library.hpp CLI/CLI.hpp stb/stb_image_write.h zlib.h)
  [[ $tests == ON ]] && need+=(doctest/doctest.h)
  for h in "${need[@]}"; do
    [[ -e /usr/include/$h || -e /usr/local/include/$h ]] || missing+=("$h")
  done
  if [[ ${#missing[@]} -gt 0 ]]; then
    die "$deps does not exist and this system lacks ${missing[*]}.
  Run scripts/pack_cuda_deps.sh on a Debian machine with the -dev packages (see scripts/setup.sh), copy the
  resulting .deps/ folder into $repo here, and run this script again."
  fi
  say "$deps does not exist; using the system's headers"
fi

# --- configure --------------------------------------------------------------------------------------------
args=(-S "$repo" -B "$build"
  -DCMAKE_BUILD_TYPE="${ISP_BUILD_TYPE:-Release}"
  -DCMAKE_PREFIX_PATH="$torch_prefix"
  -DISP_HEADER_DEPS_DIR="$deps"
  -DISP_BUILD_TESTS="$tests")
if [[ -d $deps ]]; then
  # One version of each header-only library in every translation unit: when the packed folder is there, it is
  # used for all of them (a system nlohmann_json 3.11.3 beside the packed 3.11.2 gives two inline ABI
  # namespaces and undefined symbols at link time).
  args+=(-DCMAKE_DISABLE_FIND_PACKAGE_nlohmann_json=ON -DCMAKE_DISABLE_FIND_PACKAGE_CLI11=ON
         -DCMAKE_DISABLE_FIND_PACKAGE_Boost=ON -DCMAKE_DISABLE_FIND_PACKAGE_doctest=ON)
fi
if [[ $torch_cuda != None ]]; then
  # isp compiles no .cu files. A fixed arch list skips torch's GPU arch auto-detection; CMAKE_CUDA_ARCHITECTURES
  # fixes enable_language(CUDA)'s test compile (torch then warns that it ignores it: expected).
  args+=(-DTORCH_CUDA_ARCH_LIST="${TORCH_CUDA_ARCH_LIST:-9.0}" -DCMAKE_CUDA_ARCHITECTURES="${ISP_CUDA_ARCHITECTURES:-90}")
fi
if [[ ! -f $build/CMakeCache.txt ]] && command -v ninja >/dev/null; then
  args+=(-G Ninja)  # an existing build dir keeps its generator
fi
cmake_major=$(cmake --version | sed -n 's/^cmake version \([0-9]*\).*/\1/p')
if [[ ${cmake_major:-0} -ge 4 ]]; then
  args+=(-DCMAKE_POLICY_VERSION_MINIMUM=3.5)  # CMake 4 rejects package configs written for CMake < 3.5
fi
say "cmake $(cmake --version | head -1 | sed 's/cmake version //'), ${CXX:-$(command -v c++ || echo 'default compiler')}"
say "cmake ${args[*]} $*"
if ! cmake "${args[@]}" "$@"; then
  echo "build_cuda: configure failed; the end of the CMake log:" >&2
  shown=0
  for log in "$build/CMakeFiles/CMakeConfigureLog.yaml" "$build/CMakeFiles/CMakeError.log" \
             "$build/CMakeFiles/CMakeOutput.log"; do
    if [[ -f $log && $shown == 0 ]]; then
      echo "----- $log (last 60 lines)" >&2; tail -n 60 "$log" >&2; shown=1
    fi
  done
  cat >&2 <<EOF
build_cuda: hints: "Found two conflicting CUDA versions" / "CUDA cannot be found": put the right nvcc first on PATH
  (export PATH=/usr/local/cuda/bin:\$PATH) or set CUDA_HOME; "... not found ... pack_cuda_deps.sh": carry .deps/;
  a stale cache: rm -rf $build; extra CMake options can follow the build dir on this script's command line.
EOF
  exit 1
fi

# --- build ------------------------------------------------------------------------------------------------
targets=${ISP_BUILD_TARGETS:-}
say "building with $jobs jobs${targets:+ (targets: $targets)}"
build_all() {
  if [[ -n $targets ]]; then
    cmake --build "$build" -j "$jobs" --target $targets
  else
    cmake --build "$build" -j "$jobs"
  fi
}
if ! build_all; then
  # The one part of isp that uses LibTorch's internal headers is c10d (data-parallel runs): where they do not
  # compile against this LibTorch, build without it rather than not at all, and say so (ISP_NO_C10D_FALLBACK=1
  # turns this off).
  if [[ ${ISP_NO_C10D_FALLBACK:-0} == 1 ]] || grep -q 'ISP_WITH_C10D:BOOL=OFF' "$build/CMakeCache.txt"; then exit 1; fi
  say "warning: the build failed (errors above); building again with -DISP_WITH_C10D=OFF: no data-parallel runs"
  cmake "$build" -DISP_WITH_C10D=OFF > /dev/null
  build_all
  say "warning: BUILT WITHOUT c10d (ISP_WITH_C10D=OFF): the errors above are what to fix"
fi

# --- where things are -------------------------------------------------------------------------------------
isp_bin=$build/bin/isp
say "done."
say "  isp binary: $isp_bin"
say "  plugins:    $build/plugins/"
say "  libraries:  $build/lib/"
say "  torch libs: $torch_lib"
say "  if isp cannot find libtorch*.so or libc10*.so: export LD_LIBRARY_PATH=$torch_lib:\${LD_LIBRARY_PATH:-}"
if [[ -x $isp_bin ]]; then
  if "$isp_bin" plugins > "$build/isp_plugins.txt" 2>&1; then
    say "smoke test: '$isp_bin plugins' ok ($(wc -l < "$build/isp_plugins.txt") lines in $build/isp_plugins.txt)"
  else
    say "warning: '$isp_bin plugins' failed; see $build/isp_plugins.txt (try the LD_LIBRARY_PATH line above)"
    exit 3
  fi
fi
