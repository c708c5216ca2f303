#!/usr/bin/env bash
# Coverage-guided fuzzing with libFuzzer (clang, Debian: clang + libclang-rt-14-dev), under ASan + UBSan.
#   bench/fuzz.sh [SECONDS] [TARGET...]   # each target for SECONDS (default 60); prints executions per target
# A crash, a sanitizer report, a hang (> 1 s per input), an allocation over 2 GiB or an exception other than
# isp::Error is a failure: libFuzzer writes the input to work_dirs/fuzz/<target>/crash-* (or timeout-*, oom-*)
# and the script exits non-zero. Targets run side by side, as many at once as there are cores.
# Targets (bench/fuzz/fuzz_<target>.cpp), each with a committed seed corpus bench/fuzz/corpus_<target>/:
#   recipe      recipe loading: JSON, _base_ merging, ${VAR}, --set, $ref checks, nesting limits
#   data        IDX (gzip or raw) and CIFAR-10/100 readers, image/label pairs
#   checkpoint  the checkpoint container: CRC, header, tensor records (raw, and re-sealed to get past the CRC)
#   plugin      the plugin descriptor check on arbitrary bytes
# Re-run one failure: work_dirs/fuzz/fuzz_<target> <crash file>
set -euo pipefail
cd "$(dirname "$0")/.."
SECONDS_PER_TARGET=${1:-60}
shift || true
targets=("$@")
[ ${#targets[@]} -gt 0 ] || targets=(recipe data checkpoint plugin)
CXX=${FUZZ_CXX:-clang++}
command -v "$CXX" >/dev/null || { echo "error: $CXX not found (apt-get install clang libclang-rt-14-dev)" >&2; exit 2; }
out=work_dirs/fuzz
mkdir -p "$out/obj"
repo=$PWD
flags=(-std=c++17 -g -O1 -fsanitize=fuzzer-no-link,address,undefined -fno-sanitize-recover=undefined
       -fno-omit-frame-pointer -Iregistry/include -Icore/src -Iplugins/datasets
       -isystem /usr/include/torch/csrc/api/include -DISP_TORCH_WITH_CUDA=0 -DBOOST_DLL_USE_STD_FS
       -DISP_INSTALL_PLUGIN_SUBDIR=\"lib/isp/plugins\" -DISP_INSTALL_CONFIG_SUBDIR=\"share/isp/configs\"
       -DISP_SOURCE_CONFIG_DIR=\"$repo/configs\")
link_flags=(-fsanitize=fuzzer,address,undefined)

# Objects are rebuilt when their source or any header under registry/ core/src/ plugins/datasets/ is newer.
newest_header=$(find registry core/src plugins/datasets -name '*.h' -printf '%T@\n' | sort -n | tail -1)
compile() {  # compile <source> -> prints the object path
  local src=$1 obj=$out/obj/$(echo "$1" | tr '/' '_').o
  if [ ! -f "$obj" ] || [ "$src" -nt "$obj" ] || \
     [ "$(printf '%.0f' "$newest_header")" -gt "$(stat -c %Y "$obj")" ]; then
    "$CXX" "${flags[@]}" -c "$src" -o "$obj" || { echo "error: compiling $src failed" >&2; exit 2; }
  fi
  echo "$obj"
}
sources_of() {
  case $1 in
    recipe|data|plugin) echo registry/src/*.cpp ;;
    checkpoint) echo registry/src/*.cpp core/src/checkpoint_format.cpp ;;
    *) echo "error: unknown fuzz target '$1' (recipe, data, checkpoint, plugin)" >&2; exit 2 ;;
  esac
}
t_build=$SECONDS
for target in "${targets[@]}"; do
  objs=()
  for src in bench/fuzz/fuzz_$target.cpp $(sources_of "$target"); do objs+=("$(compile "$src")"); done
  "$CXX" "${link_flags[@]}" "${objs[@]}" -lz -ldl -o "$out/fuzz_$target"
done
echo "built ${#targets[@]} fuzz targets in $((SECONDS - t_build)) s"

run_target() {
  local target=$1 dir=$out/$1
  mkdir -p "$dir/corpus"
  rm -f "$dir"/crash-* "$dir"/timeout-* "$dir"/oom-* "$dir"/leak-*
  (cd "$dir" && ISP_CONFIG_DIR="$repo/configs" "$repo/$out/fuzz_$target" -max_total_time="$SECONDS_PER_TARGET" \
     -timeout=1 -rss_limit_mb=2048 -malloc_limit_mb=2048 -print_final_stats=1 corpus "$repo/bench/fuzz/corpus_$target") \
     > "$dir/fuzz.log" 2>&1
  echo $? > "$dir/rc"
}
jobs_max=$(nproc)
for target in "${targets[@]}"; do
  while [ "$(jobs -rp | wc -l)" -ge "$jobs_max" ]; do sleep 1; done
  run_target "$target" &
done
wait

status=0
for target in "${targets[@]}"; do
  dir=$out/$target
  execs=$(grep -o 'stat::number_of_executed_units: *[0-9]*' "$dir/fuzz.log" | grep -o '[0-9]*$' || echo "?")
  cov=$(grep -o 'cov: [0-9]*' "$dir/fuzz.log" | tail -1 | grep -o '[0-9]*' || echo "?")
  if [ "$(cat "$dir/rc")" = 0 ]; then
    printf '%-11s ok      %12s executions in %s s (coverage: %s edges)\n' "$target" "$execs" "$SECONDS_PER_TARGET" "$cov"
  else
    status=1
    printf '%-11s FAILED  %12s executions (log: %s)\n' "$target" "$execs" "$dir/fuzz.log"
    grep -E 'ERROR|uncaught|invariant|threw|SUMMARY|crash-|timeout-|oom-|lies outside|does not match' "$dir/fuzz.log" |
      head -n 10 | sed 's/^/    /'
  fi
done
exit $status
