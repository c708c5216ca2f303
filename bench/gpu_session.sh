#!/usr/bin/env bash
# The whole GPU check in one go, for a machine lent for a few minutes: environment, CUDA build, the phase
# benchmark (bench/gpu_phases.sh), the plugin-descriptor refusal, an accuracy check of the speed settings, and
# the test suite if time is left. Works in $WORK (default /tmp/isp-gpu-work) and copies the session log, the
# phase table and one archive of every run's metrics and logs to $OUT (default $WORK/out), after each part too.
#   bench/gpu_session.sh [DEADLINE_SECONDS]     (default 540: later parts are skipped past it)
# Expects the packed headers in .deps/include (scripts/pack_cuda_deps.sh) and, for the accuracy check, the
# Fashion-MNIST IDX files in .gpudata/fashion-mnist.
set -uo pipefail
cd "$(dirname "$0")/.."
DEADLINE=${1:-540}
WORK=${WORK:-/tmp/isp-gpu-work}
OUT=${OUT:-$WORK/out}
mkdir -p "$WORK" "$OUT"
exec > >(tee -a "$WORK/session.log") 2>&1
save() {  # what comes back: at most a few files
  cp "$WORK/session.log" "$OUT/" 2>/dev/null
  cp "$WORK/phases_table.md" "$OUT/" 2>/dev/null
  (cd "$WORK" && tar czf "$OUT/results.tgz" --exclude='*.pt' --exclude='*.png' --exclude='weights*' \
     build.log build_tests.log ctest.log fixture.log phases acc refuse 2>/dev/null)
  return 0
}
trap save EXIT
left() { echo $((DEADLINE - SECONDS)); }
echo "== environment ($(date -u +%FT%TZ))"
nvidia-smi --query-gpu=name,driver_version,memory.total,clocks.max.sm --format=csv,noheader || true
python3 -c 'import torch; print("torch", torch.__version__, "cuda", torch.version.cuda, "available", torch.cuda.is_available())' || true
g++ --version | head -n1; cmake --version | head -n1; nproc

export LD_LIBRARY_PATH="$(python3 -c 'import torch,os;print(os.path.join(os.path.dirname(torch.__file__),"lib"))'):${LD_LIBRARY_PATH:-}"
export ISP_FMNIST_ROOT="$PWD/.gpudata/fashion-mnist"
echo "== build (left $(left) s)"
t=$SECONDS
if ! ISP_BUILD_TESTS=ON ISP_BUILD_TARGETS=isp_all bash scripts/build_cuda.sh build-cuda > "$WORK/build.log" 2>&1; then
  tail -n 80 "$WORK/build.log"; echo "BUILD FAILED after $((SECONDS - t)) s"; exit 1
fi
tail -n 5 "$WORK/build.log"; echo "build: $((SECONDS - t)) s"
ISP=build-cuda/bin/isp

echo "== phases, ResNet-56 (left $(left) s)"
ISP_BIN=$ISP OUT_DIR="$WORK/phases" ARCHS=resnet56 bash bench/gpu_phases.sh || echo "phases resnet56: some runs failed"
save
if [ "$(left)" -gt 150 ]; then
  echo "== phases, MobileNetV2 (left $(left) s)"
  ISP_BIN=$ISP OUT_DIR="$WORK/phases" ARCHS=mobilenetv2 CONFIGS="eager_fp32 graphs_fp32 graphs_cl_fp32 graphs_cl_bf16" \
    bash bench/gpu_phases.sh || echo "phases mobilenetv2: some runs failed"
fi
python3 bench/phase_table.py "$WORK/phases" --archs resnet56 mobilenetv2 \
  --configs eager_fp32 eager_cl_bf16 graphs_fp32 graphs_cl_fp32 graphs_cl_bf16 > "$WORK/phases_table.md" || true

save
echo "== plugin built for the other CUDA setting (left $(left) s)"
if cmake --build build-cuda --target isp_fixture_other_cuda > "$WORK/fixture.log" 2>&1; then
  mkdir -p "$WORK/refuse"
  printf '{"plugins": ["%s"], "nodes": {}, "stages": []}\n' "$PWD/build-cuda/test_plugins/libisp_fixture_other_cuda.so" > "$WORK/refuse/recipe.json"
  $ISP validate "$WORK/refuse/recipe.json"; echo "exit status $? (2 expected: refused)"
else
  tail -n 20 "$WORK/fixture.log"
fi

if [ "$(left)" -gt 120 ] && [ -d .gpudata/fashion-mnist ]; then
  echo "== accuracy of the speed settings: quick Fashion-MNIST classifier, 2 seeds (left $(left) s)"
  mkdir -p "$WORK/acc"
  for cfg in eager_fp32 graphs_cl_fp32 graphs_cl_bf16; do
    case $cfg in
      eager_fp32) s=(--set runtime.cuda_graphs=false --set runtime.channels_last=false --set 'runtime.precision="fp32"') ;;
      graphs_cl_fp32) s=(--set runtime.cuda_graphs=true --set runtime.channels_last=true --set 'runtime.precision="fp32"') ;;
      graphs_cl_bf16) s=(--set runtime.cuda_graphs=true --set runtime.channels_last=true --set 'runtime.precision="bf16"') ;;
    esac
    for seed in 1 2; do
      $ISP run configs/classifier/quick_fmnist.json --work-dir "$WORK/acc/$cfg-$seed" \
        --set 'runtime.device="cuda"' --set seed=$seed --set nodes.data.train_subset=12000 "${s[@]}" > "$WORK/acc/$cfg-$seed.log" 2>&1 \
        || { echo "$cfg seed $seed FAILED"; tail -n 5 "$WORK/acc/$cfg-$seed.log"; }
      python3 - "$WORK/acc/$cfg-$seed" "$cfg" "$seed" <<'PY'
import json, sys
try:
    s = json.load(open(sys.argv[1] + "/summary.json"))
    print(f"{sys.argv[2]:16s} seed {sys.argv[3]}: val {100*s['val_top1']:.2f}%  test {100*s['test_top1']:.2f}%  "
          f"{s.get('train_images_per_s', 0):,.0f} img/s")
except Exception as e:
    print(sys.argv[2], "seed", sys.argv[3], "no summary:", e)
PY
    done
  done
fi

if [ "$(left)" -gt 100 ]; then
  echo "== test suite on the CUDA build (left $(left) s)"
  if cmake --build build-cuda -j"$(nproc)" > "$WORK/build_tests.log" 2>&1; then
    (cd build-cuda && timeout $(( $(left) - 10 )) ctest -j"$(nproc)" --timeout 300 -E 'installed_mask_head|out_of_tree_plugin' > "$WORK/ctest.log" 2>&1)
    tail -n 25 "$WORK/ctest.log"
  else
    tail -n 40 "$WORK/build_tests.log"
  fi
fi
echo "== tables"
cat "$WORK/phases_table.md"
echo "session: $SECONDS s"
