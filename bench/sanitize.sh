#!/usr/bin/env bash
# Builds everything with AddressSanitizer + UndefinedBehaviorSanitizer (build-asan/) and runs the whole test
# suite and the quick classifier recipe under them. Any report fails the run (halt_on_error). Suppressions, each
# explained in its file, cover only what lies inside LibTorch itself.
#   bench/sanitize.sh            # build + tests + quick classifier
set -euo pipefail
cd "$(dirname "$0")/.."
t0=$SECONDS
cmake -S . -B build-asan -DISP_SANITIZE=ON -DCMAKE_BUILD_TYPE=RelWithDebInfo > /dev/null
cmake --build build-asan -j"$(nproc)"
echo "build: $((SECONDS - t0)) s"
supp=$PWD/bench/sanitizers
export ASAN_OPTIONS="halt_on_error=1:detect_leaks=1:detect_odr_violation=0:detect_container_overflow=0:abort_on_error=0"
export LSAN_OPTIONS="suppressions=$supp/lsan.supp:print_suppressions=0"
export UBSAN_OPTIONS="halt_on_error=1:print_stacktrace=1:suppressions=$supp/ubsan.supp"
export OMP_NUM_THREADS=2 OPENBLAS_NUM_THREADS=1
t1=$SECONDS
(cd build-asan && ctest -j2 --timeout 1800 --output-on-failure)
echo "tests under the sanitizers: $((SECONDS - t1)) s"
t2=$SECONDS
rm -rf work_dirs/sanitize_quick_classifier
build-asan/bin/isp run configs/classifier/quick_fmnist.json --work-dir work_dirs/sanitize_quick_classifier
echo "quick classifier under the sanitizers: $((SECONDS - t2)) s; total $((SECONDS - t0)) s"
