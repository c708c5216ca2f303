#!/usr/bin/env bash
# Builds (installing what is missing) and runs the whole test suite through CTest twice: once with the
# kernels LibTorch picks for this CPU (AVX2/AVX-512), once with its portable kernels
# (ATEN_CPU_CAPABILITY=default), which round differently. A test that holds on one CPU only fails here. The
# second pass leaves out the tests labelled kernel_independent.
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh
export OMP_NUM_THREADS="${OMP_NUM_THREADS:-$(nproc)}" OPENBLAS_NUM_THREADS=1
cd build
rc=0
echo "== ctest pass 1/2: native kernels (ATEN_CPU_CAPABILITY=${ATEN_CPU_CAPABILITY:-<unset>})"
# -j2: tests that train or time something declare PROCESSORS 2 and run alone; the one-core ones (building the
# example plugin projects, validating recipes) run two at a time (tests/CMakeLists.txt).
ctest --output-on-failure -j2 --timeout 900 || rc=1
# Tests labelled kernel_independent (packaging, plugin SDK, recipe validation, how a run ends when a rank dies,
# runs compared only with runs under the same kernels; tests/CMakeLists.txt) ran above.
echo "== ctest pass 2/2: portable kernels (ATEN_CPU_CAPABILITY=default), tests that compute"
ATEN_CPU_CAPABILITY=default ctest --output-on-failure -j2 --timeout 900 -LE kernel_independent || rc=1
if [ "$rc" != 0 ]; then echo "== test.sh: at least one ctest pass failed" >&2; fi
exit "$rc"
