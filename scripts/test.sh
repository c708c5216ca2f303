#!/usr/bin/env bash
# Builds (installing what is missing) and runs the whole test suite through CTest.
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh
export OMP_NUM_THREADS="${OMP_NUM_THREADS:-$(nproc)}" OPENBLAS_NUM_THREADS=1
cd build && ctest --output-on-failure -j1 --timeout 900
