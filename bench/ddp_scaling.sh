#!/usr/bin/env bash
# Data-parallel scaling on one machine: the quick pipeline (configs/isp/quick_fmnist.json: classifier, predictor,
# selector, gate learning, finetune, export) as 1 process x N threads and as N processes x 1 thread (Gloo over
# loopback), side by side, ROUNDS times each in alternation. Prints per phase the median of the epochs' median
# img/s (global images: every rank's share counted once) and the wall time per run, with the ratio.
#
#   bash bench/ddp_scaling.sh [ROUNDS=2] [NPROC=$(nproc)]
# Where a CUDA GPU is present (and this isp was built against a CUDA LibTorch: scripts/build_cuda.sh), add
# NCCL=1 for a 1-GPU NCCL smoke run (world size 1 launched through --nproc-per-node, backend forced to nccl).
set -euo pipefail
cd "$(dirname "$0")/.."
ROUNDS=${1:-2}
NPROC=${2:-$(nproc)}
ISP=${ISP:-./build/bin/isp}
OUT=${OUT:-work_dirs/bench_ddp}
RECIPE=${RECIPE:-configs/isp/quick_fmnist.json}
export OPENBLAS_NUM_THREADS=1
rm -rf "$OUT"
mkdir -p "$OUT"
port=$((29600 + RANDOM % 300))
for r in $(seq 1 "$ROUNDS"); do
  for mode in single ddp; do
    dir="$OUT/$mode-$r"
    t0=$(date +%s.%N)
    if [ "$mode" = single ]; then
      "$ISP" run "$RECIPE" --work-dir "$dir" --set runtime.threads="$NPROC" >"$dir.log" 2>&1
    else
      port=$((port + 1))
      "$ISP" run "$RECIPE" --work-dir "$dir" --set runtime.threads=1 --nproc-per-node "$NPROC" --master-port "$port" \
        >"$dir.log" 2>&1
    fi
    t1=$(date +%s.%N)
    echo "$(echo "$t1 - $t0" | bc)" >"$dir.wall"
    echo "round $r $mode: $(cat "$dir.wall") s" >&2
  done
done
if [ "${NCCL:-0}" = 1 ]; then
  "$ISP" run configs/classifier/quick_fmnist.json --work-dir "$OUT/nccl" --nproc-per-node 1 \
    --set runtime.device='"cuda"' --set runtime.dist_backend='"nccl"' --set nodes.classifier.epochs=2 >"$OUT/nccl.log" 2>&1
  echo "NCCL smoke run (1 GPU, world size 1): exit 0; $(grep -o '"test_top1": [0-9.]*' "$OUT/nccl/summary.json")" >&2
fi
PY=/usr/bin/python3; [ -x "$PY" ] || PY=python3
"$PY" - "$OUT" "$ROUNDS" "$NPROC" <<'EOF'
import json, statistics, sys, os
out, rounds, nproc = sys.argv[1], int(sys.argv[2]), int(sys.argv[3])
stages = ["classifier", "predictor", "selector", "prune", "finetune"]
def rates(d):
    per = {}
    for line in open(os.path.join(d, "metrics.jsonl")):
        j = json.loads(line)
        v = j.get("images_per_s_median", j.get("images_per_s"))
        if j.get("stage") in stages and v is not None:
            per.setdefault(j["stage"], []).append(v)
    return {k: statistics.median(v) for k, v in per.items()}
res = {m: [rates(f"{out}/{m}-{r}") for r in range(1, rounds + 1)] for m in ("single", "ddp")}
wall = {m: [float(open(f"{out}/{m}-{r}.wall").read()) for r in range(1, rounds + 1)] for m in ("single", "ddp")}
acc = {m: [json.load(open(f"{out}/{m}-{r}/summary.json")).get("test_top1") for r in range(1, rounds + 1)] for m in ("single", "ddp")}
print(f"| phase | 1 process x {nproc} threads, img/s | {nproc} processes x 1 thread, img/s | ratio |")
print("|---|---:|---:|---:|")
for s in stages:
    a = statistics.median(x[s] for x in res["single"] if s in x)
    b = statistics.median(x[s] for x in res["ddp"] if s in x)
    print(f"| {s} | {a:.0f} | {b:.0f} | {b / a:.2f} |")
a, b = statistics.median(wall["single"]), statistics.median(wall["ddp"])
print(f"| whole quick pipeline, wall s (median of {rounds}) | {a:.1f} | {b:.1f} | {a / b:.2f} |")
print(f"\nfinetuned test top-1: single {acc['single']}, data-parallel {acc['ddp']}")
EOF
