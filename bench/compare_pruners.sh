#!/usr/bin/env bash
# Pruner comparison on ResNet-56 / Fashion-MNIST with one shared classifier and AEM:
#   isp         ISP (interpretation + FLOPs terms), configs/isp/resnet56_fmnist.json
#   flops_only  the same with the interpretation weight 0
#   l1norm      L1-norm filter pruning (Li et al. 2017) at the FLOPs ratio ISP reached
#   random      random channels at that ratio
# each followed by the same finetuning; prints `isp compare --markdown` and writes it to WORK/compare.md.
#
# Usage: bench/compare_pruners.sh [WORK_DIR] [SCHEDULE]
#   SCHEDULE  a recipe fragment layered over every recipe; default configs/_base_/schedules/isp_cpu_short.json
#             (about an hour on 2 CPU cores). Pass "" for the paper's schedules (a GPU job).
# Rerunning the script continues where it stopped (every run resumes from its checkpoints).
set -euo pipefail
repo=$(cd "$(dirname "$0")/.." && pwd)
isp=${ISP:-$repo/build/bin/isp}
work=${1:-work_dirs/compare_pruners}
schedule=${2-$repo/configs/_base_/schedules/isp_cpu_short.json}
mkdir -p "$work/recipes"

write_recipe() {  # NAME BASE_RECIPE
  local bases="\"$repo/configs/isp/$2.json\""
  [ -n "$schedule" ] && bases="$bases, \"$(realpath "$schedule")\""
  printf '{"_base_": [%s]}\n' "$bases" > "$work/recipes/$1.json"
}

run() {  # NAME [isp run options]: continue the run if it exists, else start it from isp's finished stages
  local name=$1; shift
  local from=()
  if [ -f "$work/$name/state.json" ]; then from=(--resume)
  elif [ "$name" != isp ]; then from=(--reuse "$work/isp"); fi
  echo "== $name" >&2
  "$isp" run "$work/recipes/$name.json" --work-dir "$work/$name" "${from[@]}" "$@"
}

write_recipe isp resnet56_fmnist
write_recipe flops_only resnet56_fmnist_flops_only
write_recipe l1norm resnet56_fmnist_l1norm
write_recipe random resnet56_fmnist_random

run isp
# The one-shot baselines get exactly the FLOPs ratio that ISP's learned architecture reached.
ratio=$(awk -F'[:,]' '/"flops_after"/ {a=$2} /"flops_before"/ {b=$2} END {printf "%.6f", a/b}' "$work/isp/report.json")
echo "ISP kept a FLOPs ratio of $ratio; the L1-norm and random baselines use it" >&2
run flops_only
run l1norm --set "nodes.gates.target_flops_ratio=$ratio"
run random --set "nodes.gates.target_flops_ratio=$ratio"
"$isp" compare --markdown "$work/isp" "$work/flops_only" "$work/l1norm" "$work/random" | tee "$work/compare.md"
