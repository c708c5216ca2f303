#!/usr/bin/env bash
# Ranks pruning methods on ResNet-56 / Fashion-MNIST with one shared classifier and AEM:
#   isp         ISP (interpretation + FLOPs terms), configs/isp/resnet56_fmnist.json
#   flops_only  the same with interpretation weight 0, budget pinned to the FLOPs ratio ISP reached
#   l1norm      L1-norm filter pruning (Li et al. 2017) at that ratio
#   random      random channels at that ratio
#   unpruned    the classifier itself, finetuned for the same extra epochs (finetuning alone adds accuracy
#               to an under-trained classifier; that gain is not a gain from pruning)
# Each method runs prune + finetune once per seed (SEEDS, default "1 2 3": the gate initialisation and noise
# via nodes.prune.seed, the pruning subset, and RandomPruner's scores; L1-norm is deterministic), all evaluated
# on the full 10,000-image test set. Prints, and writes to WORK/compare.md: one row per method with mean ± std
# over seeds, and the paired difference ISP − method per seed (mean ± std).
#
# Usage: bench/compare_pruners.sh [WORK_DIR] [SCHEDULE]
#   SCHEDULE  a recipe fragment layered over every recipe; default configs/_base_/schedules/isp_cpu_short.json
#             (2 CPU cores: about 90 minutes with 3 seeds). Pass "" for the paper's schedules (a GPU job).
# Rerunning the script continues where it stopped (every run resumes from its checkpoints).
set -euo pipefail
repo=$(cd "$(dirname "$0")/.." && pwd)
isp=${ISP:-$repo/build/bin/isp}
work=${1:-work_dirs/compare_pruners}
schedule=${2-$repo/configs/_base_/schedules/isp_cpu_short.json}
seeds=${SEEDS:-1 2 3}
mkdir -p "$work/recipes"
export OPENBLAS_NUM_THREADS=1

write_recipe() {  # NAME BASE_RECIPE: the method's recipe, the schedule, and the full test set
  local bases="\"$repo/configs/isp/$2.json\""
  [ -n "$schedule" ] && bases="$bases, \"$(realpath "$schedule")\""
  printf '{"_base_": [%s], "nodes": {"data": {"test_subset": 0}}}\n' "$bases" > "$work/recipes/$1.json"
}

run() {  # NAME RECIPE [isp run options]: continue the run if it exists, else start from the shared stages
  local name=$1 recipe=$2; shift 2
  local from=()
  if [ -f "$work/$name/state.json" ]; then from=(--resume)
  elif [ "$name" != shared ]; then from=(--reuse "$work/shared"); fi
  echo "== $name" >&2
  "$isp" run "$work/recipes/$recipe.json" --work-dir "$work/$name" "${from[@]}" "$@"
}
ratio_of() { python3 -c 'import json,sys; print("%.6f" % json.load(open(sys.argv[1]))["flops_ratio"])' "$1/report.json"; }

write_recipe isp resnet56_fmnist
write_recipe flops_only resnet56_fmnist_flops_only
write_recipe l1norm resnet56_fmnist_l1norm
write_recipe random resnet56_fmnist_random
# The shared classifier + AEM (the ISP recipe's first three stages).
run shared isp --set 'stages=[{"$ref":"classifier"},{"$ref":"predictor"},{"$ref":"selector"}]'

names=()
for s in $seeds; do
  run "isp_s$s" isp --set "nodes.prune.seed=$s" --set "nodes.prune.subset_seed=$s"
  ratio=$(ratio_of "$work/isp_s$s")
  echo "seed $s: ISP kept a FLOPs ratio of $ratio; the other methods are pinned to it" >&2
  run "flops_only_s$s" flops_only --set "nodes.prune.seed=$s" --set "nodes.prune.subset_seed=$s" \
    --set "nodes.flops_budget.target=$ratio"
  run "l1norm_s$s" l1norm --set "nodes.gates.target_flops_ratio=$ratio"
  run "random_s$s" random --set "nodes.gates.target_flops_ratio=$ratio" --set "nodes.gates.seed=$s"
  # Unpruned: a one-shot pruner that keeps every channel, no BN re-estimation: an exact copy, then the same finetuning.
  # (Finetuning shuffles with the run's seed, so the unpruned rows are identical across seeds.)
  run "unpruned_s$s" l1norm --set "nodes.gates.target_flops_ratio=1.0" --set "nodes.prune.bn_recalibration_images=0"
  names+=("isp_s$s" "flops_only_s$s" "l1norm_s$s" "random_s$s" "unpruned_s$s")
done
runs=(); for n in "${names[@]}"; do runs+=("$work/$n"); done
"$isp" compare --markdown "${runs[@]}" > "$work/runs.md"

python3 - "$work" $seeds <<'PY' | tee "$work/compare.md"
import json, os, statistics as st, sys
work, seeds = sys.argv[1], sys.argv[2:]
methods = ["isp", "flops_only", "l1norm", "random", "unpruned"]
def rep(m, s): return json.load(open(os.path.join(work, f"{m}_s{s}", "report.json")))
def ms(xs, scale=100.0, fmt="%.2f"):
    xs = [scale * x for x in xs]
    return (fmt % st.mean(xs)) + (" ± " + fmt.replace("+", "") % st.stdev(xs) if len(xs) > 1 else "")
print(f"ResNet-56 / Fashion-MNIST, full 10,000-image test set, {len(seeds)} seeds ({' '.join(seeds)}); mean ± std over seeds.\n")
print("| method | baseline % | pruned % (BN recal.) | finetuned % | FLOPs ratio | params ↓ % | mask IoU | centre shift px | ISP − method, finetuned (pts, paired) |")
print("|---|---|---|---|---|---|---|---|---|")
for m in methods:
    r = [rep(m, s) for s in seeds]
    isp = [rep("isp", s) for s in seeds]
    diff = [a["finetuned_top1"] - b["finetuned_top1"] for a, b in zip(isp, r)]
    sal = [x.get("saliency", {}) for x in r]
    print(f"| {m} | {ms([x['baseline_top1'] for x in r])} | {ms([x['pruned_top1'] for x in r])} | "
          f"{ms([x['finetuned_top1'] for x in r])} | {ms([x['flops_ratio'] for x in r], 1, '%.4f')} | "
          f"{ms([x['params_reduction'] for x in r])} | {ms([s_.get('mask_iou_at_0.5', float('nan')) for s_ in sal], 1, '%.3f')} | "
          f"{ms([s_.get('mean_center_shift_px', float('nan')) for s_ in sal], 1, '%.3f')} | "
          f"{'—' if m == 'isp' else ms(diff, 100, '%+.2f')} |")
PY
