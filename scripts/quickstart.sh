#!/usr/bin/env bash
# Set-up plus the main job on the embedded default (Fashion-MNIST from Debian's dataset-fashion-mnist):
# classifier -> predictor -> selector -> prune -> finetune -> export, saliency PNGs and a report.
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh
export OMP_NUM_THREADS="${OMP_NUM_THREADS:-$(nproc)}" OPENBLAS_NUM_THREADS=1
# RECIPE=configs/isp/quick_fmnist_fast.json: bf16 + NHWC where the CPU has AVX512-BF16 or AMX (about half the time).
RECIPE=${RECIPE:-configs/isp/quick_fmnist.json}
RUN=${RUN:-work_dirs/$(basename "$RECIPE" .json)}
# --resume: a second invocation continues (or just re-reports) the same run instead of refusing.
./build/bin/isp run "$RECIPE" --work-dir "$RUN" --resume
./build/bin/isp explain --run "$RUN" --images 8 --out "$RUN/explain"
./build/bin/isp explain --run "$RUN" --images 8 --network pruned --out "$RUN/explain_pruned"
./build/bin/isp report "$RUN"   # report.html: tables, training curves, kept widths, the saliency figure
# The exported networks (pruned, and the original in export/original/), checked by runtimes independent of isp:
# Debian's PyTorch (weights.pt into plain torch.nn modules, model.ts.pt with torch.jit.load, the ONNX checker)
# and onnxruntime, each against the logits isp wrote to sample.json. Exit status 77: that runtime is missing.
PY=/usr/bin/python3; [ -x "$PY" ] || PY=python3
dirs=()
for dir in "$RUN/export" "$RUN/export/original"; do [ -d "$dir" ] && dirs+=("$dir"); done
# One start of each checker for both folders (importing torch takes seconds); each line names its folder.
rc=0; "$PY" scripts/check_export_torch.py "${dirs[@]}" || rc=$?
if [ "$rc" = 77 ]; then echo "note: PyTorch check of ${dirs[*]} skipped (no python3-torch)"; elif [ "$rc" != 0 ]; then exit "$rc"; fi
rc=77; ! command -v node >/dev/null || { rc=0; NODE_PATH=.node/node_modules node scripts/check_export_onnxruntime.js "${dirs[@]}" || rc=$?; }
if [ "$rc" = 77 ]; then echo "note: onnxruntime check of ${dirs[*]} skipped"; elif [ "$rc" != 0 ]; then exit "$rc"; fi
cat "$RUN/report.md"
echo "report: $RUN/report.html   saliency figure: $RUN/explain/saliency.png   export: $RUN/export/"
