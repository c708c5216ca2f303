#!/usr/bin/env bash
# Set-up plus the main job on the embedded default (Fashion-MNIST from Debian's dataset-fashion-mnist):
# classifier -> predictor -> selector -> prune -> finetune -> export, saliency PNGs and a report.
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh
export OMP_NUM_THREADS="${OMP_NUM_THREADS:-$(nproc)}" OPENBLAS_NUM_THREADS=1
RUN=${RUN:-work_dirs/quick_fmnist}
# --resume: a second invocation continues (or just re-reports) the same run instead of refusing.
./build/bin/isp run configs/isp/quick_fmnist.json --work-dir "$RUN" --resume
./build/bin/isp explain --run "$RUN" --images 8 --out "$RUN/explain"
cat "$RUN/report.md"
echo "saliency figure: $RUN/explain/saliency.png   export: $RUN/export/"
