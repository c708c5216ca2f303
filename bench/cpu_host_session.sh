#!/usr/bin/env bash
# Issue 12's CPU measurements on a machine with many cores (for example a GPU machine's host CPU), in minutes
# instead of an hour: every run starts at once, each pinned with taskset to its own physical cores. So all runs
# share the machine's conditions (clock, caches, memory bandwidth) and the tables compare them side by side.
#
#   bench/cpu_host_session.sh [DEADLINE_SECONDS]          (default 480; runs still going then are stopped)
#
# The runs:
#   - bench/gpu_phases.sh --cpu, one run per (configuration, thread count): CONFIGS at 1 thread, CONFIGS2 at
#     2 threads (names from bench/speed_settings.sh);
#   - the README job (configs/isp/quick_fmnist.json), one run per JOB_CONFIGS entry at JOB_THREADS threads.
# Runs that do not fit the free physical cores wait for one to end (1-thread phase runs first, then the README
# jobs, then the 2-thread phase runs).
#
# Environment:
#   ISP_BIN (default build/bin/isp, else build-cuda/bin/isp, built with scripts/build_cuda.sh when missing)
#   WORK (default /tmp/isp-cpu-work), OUT (default $WORK/out: the log, the tables, an archive of metrics and logs)
#   ARCHS (default resnet56); STEPS (default 30) and ISP_TIMING_WARMUP_STEPS (default 10): 20 timed steps
#   FMNIST: the Fashion-MNIST IDX folder (default .gpudata/fashion-mnist, else Debian's)
#   JOB_SETS: more KEY=VALUE words for the README job's --set (e.g. shorter stages for a smoke test)
# An empty CONFIGS, CONFIGS2 or JOB_CONFIGS leaves those runs out.
set -uo pipefail
cd "$(dirname "$0")/.."
DEADLINE=${1:-480}
WORK=${WORK:-/tmp/isp-cpu-work}
OUT=${OUT:-$WORK/out}
ARCHS=${ARCHS:-resnet56}
CONFIGS=${CONFIGS-cpu_before cpu_eager_fp32 cpu_aligned8 cpu_cl_bf16 cpu_cl_bf16_aligned8}
CONFIGS2=${CONFIGS2-cpu_eager_fp32 cpu_aligned8 cpu_cl_bf16 cpu_cl_bf16_aligned8}
JOB_CONFIGS=${JOB_CONFIGS-cpu_auto_fp32 cpu_cl_bf16 cpu_cl_bf16_aligned8}
JOB_THREADS=${JOB_THREADS:-2}
export STEPS=${STEPS:-30} ISP_TIMING_WARMUP_STEPS=${ISP_TIMING_WARMUP_STEPS:-10}
mkdir -p "$WORK" "$OUT"
exec > >(tee -a "$WORK/session.log") 2>&1
left() { echo $((DEADLINE - SECONDS)); }
if ! grep -qwE 'avx512_bf16|amx_bf16' /proc/cpuinfo; then  # isp refuses bf16 here: the fp32 NHWC runs instead
  no_bf16() { echo "$1" | sed -e 's/cpu_cl_bf16_aligned8/cpu_cl_aligned8/g' -e 's/cpu_cl_bf16/cpu_cl_fp32/g' -e 's/cpu_bf16/cpu_eager_fp32/g' |
    tr ' ' '\n' | awk 'NF && !seen[$0]++' | tr '\n' ' '; }
  CONFIGS=$(no_bf16 "$CONFIGS"); CONFIGS2=$(no_bf16 "$CONFIGS2"); JOB_CONFIGS=$(no_bf16 "$JOB_CONFIGS")
  echo "no AVX512-BF16 or AMX: bf16 configurations replaced by fp32 ones"
fi

save() {
  cp "$WORK/session.log" "$OUT/" 2>/dev/null
  cp "$WORK"/table_*.md "$OUT/" 2>/dev/null
  (cd "$WORK" && find phases job runs -name metrics.jsonl -o -name summary.json -o -name '*.log' -o -name '*.status' -o -name report.md \
     2>/dev/null | tar czf "$OUT/results.tgz" -T - 2>/dev/null)
  return 0
}
trap save EXIT

echo "== machine ($(date -u +%FT%TZ))"
grep -m1 'model name' /proc/cpuinfo
echo "logical CPUs: $(nproc); flags: $(grep -m1 -o -w -E 'avx512f|avx512_bf16|amx_bf16|amx_tile|avx2' /proc/cpuinfo | sort -u | tr '\n' ' ')"
command -v lscpu >/dev/null && lscpu | grep -E 'Thread|Core|Socket|NUMA node\(s\)|L2|L3|MHz' || true
git log -1 --format='commit %h %s' 2>/dev/null || true

# --- the binary -----------------------------------------------------------------------------------------------
if [ -z "${ISP_BIN:-}" ]; then
  if [ -x build/bin/isp ]; then ISP_BIN=build/bin/isp; else ISP_BIN=build-cuda/bin/isp; fi
fi
if [ ! -x "$ISP_BIN" ]; then
  t=$SECONDS
  ISP_BUILD_TARGETS=isp_all bash scripts/build_cuda.sh build-cuda > "$WORK/build.log" 2>&1 ||
    { grep -E "error" "$WORK/build.log" | head -n 30; tail -n 30 "$WORK/build.log"; echo "BUILD FAILED"; exit 1; }
  echo "build: $((SECONDS - t)) s"
  ISP_BIN=build-cuda/bin/isp
fi
export ISP_BIN
if python3 -c 'import torch' 2>/dev/null; then  # a build against pip's LibTorch finds its libraries here
  export LD_LIBRARY_PATH="$(python3 -c 'import torch,os;print(os.path.join(os.path.dirname(torch.__file__),"lib"))'):${LD_LIBRARY_PATH:-}"
  python3 -c 'import torch; print("torch", torch.__version__, "oneDNN", torch.backends.mkldnn.is_available())'
fi
FMNIST=${FMNIST:-$PWD/.gpudata/fashion-mnist}
[ -d "$FMNIST" ] || FMNIST=/usr/share/datasets/fashion-mnist
export ISP_FMNIST_ROOT=$FMNIST

# --- physical cores: the first logical CPU of each core, in package order ---------------------------------------
free_cores=()
declare -A seen=()
for c in $(ls -d /sys/devices/system/cpu/cpu[0-9]* | sed 's/.*cpu//' | sort -n); do
  topo=/sys/devices/system/cpu/cpu$c/topology
  [ -r "$topo/core_id" ] || continue
  grep -qw "$c" <(taskset -pc $$ 2>/dev/null | sed 's/.*: //' | tr ',' '\n' |
    awk -F- '{ if (NF == 2) for (i = $1; i <= $2; i++) print i; else print $1 }') || continue
  key="$(cat "$topo/physical_package_id"):$(cat "$topo/core_id")"
  [ -n "${seen[$key]:-}" ] && continue
  seen[$key]=1
  free_cores+=("$c")
done
echo "physical cores usable: ${#free_cores[@]} (${free_cores[*]})"

# --- the runs -------------------------------------------------------------------------------------------------
source bench/speed_settings.sh
jobs_name=() jobs_threads=() jobs_cmd=()
for cfg in $CONFIGS; do
  jobs_name+=("phases-t1-$cfg"); jobs_threads+=(1)
  jobs_cmd+=("OUT_DIR=$WORK/phases/t1 THREADS=1 ARCHS='$ARCHS' CONFIGS=$cfg bash bench/gpu_phases.sh --cpu")
done
for cfg in $JOB_CONFIGS; do
  sets=""
  for s in $(speed_settings "$cfg") ${JOB_SETS:-}; do sets+=" --set '$s'"; done
  jobs_name+=("job-$cfg"); jobs_threads+=("$JOB_THREADS")
  jobs_cmd+=("rm -rf $WORK/job/$cfg; \"\$ISP_BIN\" run configs/isp/quick_fmnist.json --work-dir $WORK/job/$cfg$sets --set runtime.threads=$JOB_THREADS")
done
for cfg in $CONFIGS2; do
  jobs_name+=("phases-t2-$cfg"); jobs_threads+=(2)
  jobs_cmd+=("OUT_DIR=$WORK/phases/t2 THREADS=2 ARCHS='$ARCHS' CONFIGS=$cfg bash bench/gpu_phases.sh --cpu")
done
mkdir -p "$WORK/runs" "$WORK/job"

declare -A running_cores=() running_name=() started=()
reap() {  # frees the cores of every finished run
  local pid
  for pid in "${!running_cores[@]}"; do
    kill -0 "$pid" 2>/dev/null && continue
    wait "$pid"; local rc=$?
    echo "$(date -u +%T) done  ${running_name[$pid]}: exit $rc, $((SECONDS - started[$pid])) s"
    echo "$rc $((SECONDS - started[$pid]))" > "$WORK/runs/${running_name[$pid]}.status"
    read -r -a cs <<<"${running_cores[$pid]}"
    free_cores+=("${cs[@]}")
    unset "running_cores[$pid]" "running_name[$pid]" "started[$pid]"
  done
}
for i in "${!jobs_name[@]}"; do
  need=${jobs_threads[$i]}
  [ "$need" -le "${#free_cores[@]}" ] || [ ${#running_cores[@]} -gt 0 ] ||
    { echo "skip ${jobs_name[$i]}: needs $need cores, ${#free_cores[@]} exist"; continue; }
  while [ "${#free_cores[@]}" -lt "$need" ]; do sleep 1; reap; done
  if [ "$(left)" -lt 60 ]; then echo "skip ${jobs_name[$i]}: $(left) s left"; continue; fi
  cores=("${free_cores[@]:0:$need}")
  free_cores=("${free_cores[@]:$need}")
  list=$(IFS=,; echo "${cores[*]}")
  (exec timeout -s INT "$(left)" taskset -c "$list" bash -c "${jobs_cmd[$i]}") > "$WORK/runs/${jobs_name[$i]}.log" 2>&1 &
  pid=$!
  running_cores[$pid]="${cores[*]}"; running_name[$pid]=${jobs_name[$i]}; started[$pid]=$SECONDS
  echo "$(date -u +%T) start ${jobs_name[$i]} on CPUs $list"
done
while [ ${#running_cores[@]} -gt 0 ]; do sleep 1; reap; done

# --- tables ---------------------------------------------------------------------------------------------------
for t in 1 2; do
  [ -d "$WORK/phases/t$t" ] || continue
  cfgs=$CONFIGS; [ $t = 2 ] && cfgs=$CONFIGS2
  [ -n "${cfgs// /}" ] || continue
  base=cpu_before; [[ " $cfgs " == *" cpu_before "* ]] || base=cpu_eager_fp32
  echo "== phases, $t thread(s)"
  python3 bench/phase_table.py "$WORK/phases/t$t" --archs $ARCHS --configs $cfgs --reference cpu --baseline $base |
    tee "$WORK/table_phases_t$t.md"
done
echo "== README job, $JOB_THREADS threads each"
{
  python3 bench/run_summary.py header
  for cfg in $JOB_CONFIGS; do
    python3 bench/run_summary.py row "$WORK/job/$cfg" "$cfg" "$WORK/runs/job-$cfg.status"
  done
} | tee "$WORK/table_job.md"
echo "session: $SECONDS s"
