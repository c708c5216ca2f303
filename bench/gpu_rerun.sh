#!/usr/bin/env bash
# A short follow-up to bench/gpu_session.sh on a fresh machine: rebuild, then only the named configurations.
#   CONFIGS="graphs_cl_fp32" ARCHS="resnet56 mobilenetv2" bench/gpu_rerun.sh
set -uo pipefail
cd "$(dirname "$0")/.."
WORK=${WORK:-/tmp/isp-gpu-work}; OUT=${OUT:-$WORK/out}; mkdir -p "$WORK" "$OUT"
exec > >(tee -a "$WORK/session.log") 2>&1
trap 'cp "$WORK/session.log" "$OUT/"; (cd "$WORK" && tar czf "$OUT/results.tgz" --exclude="*.pt" --exclude="*.png" phases build.log 2>/dev/null); true' EXIT
export LD_LIBRARY_PATH="$(python3 -c 'import torch,os;print(os.path.join(os.path.dirname(torch.__file__),"lib"))'):${LD_LIBRARY_PATH:-}"
t=$SECONDS
ISP_BUILD_TARGETS=isp_all bash scripts/build_cuda.sh build-cuda > "$WORK/build.log" 2>&1 || { tail -n 60 "$WORK/build.log"; exit 1; }
echo "build: $((SECONDS - t)) s"
for arch in ${ARCHS:-resnet56 mobilenetv2}; do
  ISP_BIN=build-cuda/bin/isp OUT_DIR="$WORK/phases" ARCHS=$arch CONFIGS="${CONFIGS:-graphs_cl_fp32}" bash bench/gpu_phases.sh || true
done
