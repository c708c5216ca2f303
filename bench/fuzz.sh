#!/usr/bin/env bash
# Coverage-guided fuzzing with libFuzzer (clang, Debian: clang + libclang-rt-14-dev), under ASan + UBSan.
#   bench/fuzz.sh [SECONDS]      # each target for SECONDS (default 60); prints executions per target
# A crash, a sanitizer report, a hang (> 1 s per input) or an exception other than isp::Error is a failure:
# libFuzzer writes the input to work_dirs/fuzz/<target>/crash-* and the script exits non-zero.
# Targets (bench/fuzz/*.cpp), each with a committed seed corpus bench/fuzz/corpus_<target>/:
#   recipe -- recipe loading: JSON, _base_ merging, ${VAR}, --set, $ref checks, nesting limits.
set -euo pipefail
cd "$(dirname "$0")/.."
SECONDS_PER_TARGET=${1:-60}
CXX=${FUZZ_CXX:-clang++}
command -v "$CXX" >/dev/null || { echo "error: $CXX not found (apt-get install clang libclang-rt-14-dev)" >&2; exit 2; }
out=work_dirs/fuzz
mkdir -p "$out"
repo=$PWD
flags=(-std=c++17 -g -O1 -fsanitize=fuzzer,address,undefined -fno-sanitize-recover=undefined -fno-omit-frame-pointer
       -Iregistry/include -isystem /usr/include/torch/csrc/api/include -DISP_TORCH_WITH_CUDA=0 -DBOOST_DLL_USE_STD_FS
       -DISP_INSTALL_PLUGIN_SUBDIR=\"lib/isp/plugins\" -DISP_INSTALL_CONFIG_SUBDIR=\"share/isp/configs\"
       -DISP_SOURCE_CONFIG_DIR=\"$repo/configs\")
status=0
for target in recipe; do
  bin=$out/fuzz_$target
  if [ ! -x "$bin" ] || [ -n "$(find bench/fuzz/fuzz_$target.cpp registry -newer "$bin" -name '*.[ch]*' | head -1)" ]; then
    echo "building $bin"
    "$CXX" "${flags[@]}" bench/fuzz/fuzz_$target.cpp registry/src/*.cpp -ldl -o "$bin"
  fi
  mkdir -p "$out/$target/corpus"
  log=$out/$target/fuzz.log
  set +e
  (cd "$out/$target" && ISP_CONFIG_DIR="$repo/configs" "$repo/$bin" -max_total_time="$SECONDS_PER_TARGET" -timeout=1 \
     -rss_limit_mb=2048 -print_final_stats=1 corpus "$repo/bench/fuzz/corpus_$target") > "$log" 2>&1
  rc=$?
  set -e
  execs=$(grep -o 'stat::number_of_executed_units: *[0-9]*' "$log" | grep -o '[0-9]*$' || echo "?")
  if [ $rc -eq 0 ]; then
    printf '%-10s ok      %12s executions in %s s\n' "$target" "$execs" "$SECONDS_PER_TARGET"
  else
    status=1
    printf '%-10s FAILED  %12s executions (log: %s)\n' "$target" "$execs" "$log"
    grep -E 'ERROR|uncaught|SUMMARY|crash-|timeout-' "$log" | head -n 10 | sed 's/^/    /'
  fi
done
exit $status
