#!/usr/bin/env bash
# The README's main job (configs/isp/quick_fmnist.json) over seeds x threads x LibTorch CPU kernels, to show
# that the FLOPs budget is met whatever the classifier, the thread count and the float rounding turn out to be.
# One table: seed, threads, kernels, baseline / pruned / finetuned top-1, achieved FLOPs ratio, budget met,
# the saliency metrics of the original and the pruned network (docs/method.md §9), wall time. "native" = the kernels LibTorch picks for this CPU; "default" = ATEN_CPU_CAPABILITY=default
# (portable kernels that round differently from AVX2/AVX-512).
#
# Usage: bench/robustness.sh [WORK_DIR] [SEEDS] [JOBS]
#   SEEDS  default "1 2 3 4";  JOBS  one-thread runs at a time (default 1; 2 on 2 cores); two-thread runs
#          always run one at a time
# Every run resumes if its folder exists, so a rerun only finishes what is missing. Prints the table and
# writes WORK_DIR/robustness.md; exits 1 if any row missed its budget.
set -euo pipefail
repo=$(cd "$(dirname "$0")/.." && pwd)
isp=${ISP:-$repo/build/bin/isp}
work=${1:-work_dirs/robustness}
seeds=${2:-1 2 3 4}
jobs=${3:-1}
recipe=${RECIPE:-$repo/configs/isp/quick_fmnist.json}
mkdir -p "$work"
export OPENBLAS_NUM_THREADS=1

one() {  # SEED THREADS KERNELS
  local seed=$1 threads=$2 kernels=$3 dir="$work/s$1_t$2_$3"
  local env=(OMP_NUM_THREADS="$threads")
  [ "$kernels" = default ] && env+=(ATEN_CPU_CAPABILITY=default)
  local resume=()
  [ -f "$dir/state.json" ] && resume=(--resume)
  env "${env[@]}" "$isp" run "$recipe" --work-dir "$dir" "${resume[@]}" --set "seed=$seed" \
    --set "runtime.threads=$threads" > "$dir.log" 2>&1 || echo "run $dir exited $? (see $dir.log)" >&2
}
export -f one
export isp recipe work

# One-thread rows JOBS at a time; two-thread rows alone (two LibTorch pools of 2 threads on 2 cores spin
# against each other and run many times slower, which would make the wall-time column meaningless).
for s in $seeds; do for k in native default; do echo "$s 1 $k"; done; done | xargs -P "$jobs" -L 1 bash -c 'one "$@"' _
for s in $seeds; do for k in native default; do echo "$s 2 $k"; done; done | xargs -P 1 -L 1 bash -c 'one "$@"' _

python3 - "$work" $seeds <<'PY'
import json, os, sys
work, seeds = sys.argv[1], sys.argv[2:]
rows, missed = [], 0
hdr = ("| seed | threads | kernels | baseline % | pruned % (BN recal.) | finetuned % | Δ pts | FLOPs ratio | target | budget met "
       "| deletion AUC orig→pruned (centred) | mass on object orig→pruned (fg) | centre spread row/col px (objects') "
       "| centre→object px (image centre) | wall s (stages) |")
print(hdr); print("|" + "---|" * (hdr.count("|") - 1))
out = [hdr, "|" + "---|" * (hdr.count("|") - 1)]
for s in seeds:
    for t in ("1", "2"):
        for k in ("native", "default"):
            d = os.path.join(work, f"s{s}_t{t}_{k}")
            try:
                r = json.load(open(os.path.join(d, "report.json")))
            except Exception:
                line = f"| {s} | {t} | {k} | (no report: see {d}.log) |"; missed += 1
                print(line); out.append(line); continue
            wall = f"{sum(r.get('wall_seconds', {}).values()):.0f}"
            sal = r.get("saliency", {})
            o, p = sal.get("original"), sal.get("pruned")
            f3 = lambda v: "-" if v is None else f"{v:.3f}"
            if o and p:
                dele = f"{f3(o['deletion_auc'])}→{f3(p['deletion_auc'])} ({f3(o['centred_gaussian']['deletion_auc'])})"
                mass = f"{f3(o['mass_on_object'])}→{f3(p['mass_on_object'])} ({f3(o['foreground_share'])})"
                spread = f"{o['centre_std_row_px']:.2f}/{o['centre_std_col_px']:.2f}"
                if o.get("object_centroid_std_row_px") is not None:
                    spread += f" ({o['object_centroid_std_row_px']:.2f}/{o['object_centroid_std_col_px']:.2f})"
                near = "-" if o.get("centre_to_object_px") is None else \
                    f"{o['centre_to_object_px']:.2f} ({o['image_centre_to_object_px']:.2f})"
            else:
                dele = mass = spread = near = "-"
            met = r.get("budget_met")
            missed += met is not True
            line = (f"| {s} | {t} | {k} | {100*r['baseline_top1']:.2f} | {100*r['pruned_top1']:.2f} | "
                    f"{100*r['finetuned_top1']:.2f} | {100*r['delta_top1']:+.2f} | {r['flops_ratio']:.4f} | "
                    f"{r.get('budget_target', '-')} | {'yes' if met else 'NO'} | {dele} | {mass} | {spread} | {near} | {wall} |")
            print(line); out.append(line)
open(os.path.join(work, "robustness.md"), "w").write("\n".join(out) + "\n")
sys.exit(1 if missed else 0)
PY
