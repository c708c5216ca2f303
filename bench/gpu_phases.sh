#!/usr/bin/env bash
# Times every training phase of the ISP pipeline (classifier, AEM predictor, AEM selector, gate learning,
# finetuning) for ResNet-56 and MobileNetV2 on CIFAR-sized synthetic data, under each speed setting, and prints
# one table beside the official PyTorch code's figures (docs/performance.md).
#
#   bench/gpu_phases.sh              # CUDA: builds with scripts/build_cuda.sh unless ISP_BIN is set
#   bench/gpu_phases.sh --cpu        # the same phases on the CPU, eager fp32 (uses build/bin/isp)
#
# Environment: ISP_BIN (the isp binary), OUT_DIR (default work_dirs/gpu_phases), STEPS (steps per phase;
# default 100 on CUDA, 50 on the CPU), ARCHS (default "resnet56 mobilenetv2"), CONFIGS (names below), THREADS
# (runtime.threads; default: all cores), EXTRA_SETS (more KEY=VALUE words for --set, e.g. smaller batches) and
# ISP_TIMING_WARMUP_STEPS (warm-up steps before the timed windows; default 20). On the CPU the table compares
# with the official code on 2 CPU cores.
# Each phase runs STEPS steps of one epoch; the training loop times windows of 10 steps between its
# progress reads (each a device synchronisation) after 20 warm-up steps, and reports the median
# (step_ms_median, images_per_s_median in <run>/metrics.jsonl).
set -euo pipefail
cd "$(dirname "$0")/.."
mode=cuda
[ "${1:-}" = "--cpu" ] && mode=cpu
OUT_DIR=${OUT_DIR:-work_dirs/gpu_phases}
ARCHS=${ARCHS:-resnet56 mobilenetv2}
if [ "$mode" = cuda ]; then
  STEPS=${STEPS:-100}
  CONFIGS=${CONFIGS:-eager_fp32 graphs_fp32 graphs_cl_fp32 graphs_cl_bf16 graphs_cl_bf16_unfolded eager_cl_bf16}
  if [ -z "${ISP_BIN:-}" ]; then
    bash scripts/build_cuda.sh build-cuda
    ISP_BIN=build-cuda/bin/isp
  fi
  command -v nvidia-smi >/dev/null && nvidia-smi --query-gpu=name,driver_version,memory.total --format=csv,noheader
else
  STEPS=${STEPS:-50}
  CONFIGS=${CONFIGS:-cpu_eager_fp32}
  ISP_BIN=${ISP_BIN:-build/bin/isp}
fi
[ -x "$ISP_BIN" ] || { echo "error: $ISP_BIN not found (build first)" >&2; exit 2; }

source "$(dirname "$0")/speed_settings.sh"

mkdir -p "$OUT_DIR"
failed=0
for arch in $ARCHS; do
  for cfg in $CONFIGS; do
    dir="$OUT_DIR/$arch-$cfg"
    rm -rf "$dir"
    sets=()
    for s in $(speed_settings "$cfg"); do sets+=(--set "$s"); done
    [ -n "${THREADS:-}" ] && sets+=(--set "runtime.threads=$THREADS")
    for s in ${EXTRA_SETS:-}; do sets+=(--set "$s"); done
    for stage in classifier predictor selector prune finetune; do
      sets+=(--set "nodes.$stage.max_steps_per_epoch=$STEPS")
    done
    # Gate learning computes the selector's reference maps for its whole subset before its first step: only the
    # images its STEPS batches use (plus one batch, which also covers the split's rounding), not the whole training
    # set (minutes on the CPU). The batch size comes from the resolved recipe, the training-set size from the
    # dataset itself (`isp validate --print-data-sizes`), so no rule of the dataset is repeated here.
    recipe="bench/recipes/gpu_phases_$arch.json"
    fraction=$(python3 -c '
import json, subprocess, sys
isp, recipe, steps, sets = sys.argv[1], sys.argv[2], int(sys.argv[3]), sys.argv[4:]
def validate(flag):
    out = subprocess.run([isp, "validate", recipe, *sets, flag], check=True, capture_output=True, text=True).stdout
    return json.loads(out)
prune = validate("--print-resolved")["nodes"]["prune"]
train = validate("--print-data-sizes")[prune["data"]["$ref"]]["train"]
print(min(1.0, (steps + 1) * prune["batch_size"] / train))' "$ISP_BIN" "$recipe" "$STEPS" "${sets[@]}") ||
      { echo "error: cannot read the prune batch and training-set size of $recipe" >&2; exit 2; }
    sets+=(--set "nodes.prune.subset_fraction=$fraction")
    envs=()
    [ "$cfg" = cpu_before ] && envs+=(ISP_GLIBC_MALLOC_DEFAULTS=1)
    t0=$SECONDS
    if env "${envs[@]}" "$ISP_BIN" run "bench/recipes/gpu_phases_$arch.json" --work-dir "$dir" "${sets[@]}" >"$OUT_DIR/$arch-$cfg.log" 2>&1; then
      printf '%-12s %-16s ok   %4d s\n' "$arch" "$cfg" "$((SECONDS - t0))"
    else
      failed=1
      printf '%-12s %-16s FAILED (log: %s)\n' "$arch" "$cfg" "$OUT_DIR/$arch-$cfg.log"
      tail -n 15 "$OUT_DIR/$arch-$cfg.log" | sed 's/^/    /'
    fi
  done
done
reference=h100
[ "$mode" = cpu ] && reference=cpu
python3 bench/phase_table.py "$OUT_DIR" --archs $ARCHS --configs $CONFIGS --reference $reference | tee "$OUT_DIR/table.md"
exit $failed
