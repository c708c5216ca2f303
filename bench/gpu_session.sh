#!/usr/bin/env bash
# The whole GPU check in one go, for a machine lent for a few minutes (docs/performance.md):
#   bench/gpu_session.sh [DEADLINE_SECONDS] [PART...]
# PARTs, in this order (default: all of them; a rerun on a fresh machine names only what failed, "build" first):
#   build      CUDA build of isp and the plugins (scripts/build_cuda.sh)
#   phases     bench/gpu_phases.sh for ResNet-56 under every speed setting
#   accuracy   the speed settings' accuracy: ResNet-56 on all of Fashion-MNIST, 6 epochs, 2 seeds x 3 settings
#   pipeline   the README's main job (classifier -> AEM -> prune -> finetune -> export) on CUDA, fp32 and bf16
#   mobilenet  bench/gpu_phases.sh for MobileNetV2
#   refuse     a plugin built for the other CUDA setting must be refused
#   tests      the test suite on the CUDA build
# A part that would start past DEADLINE (default 540 s) is skipped. Works in $WORK (default /tmp/isp-gpu-work);
# copies the session log, the phase table and one archive of every run's metrics and logs to $OUT (default
# $WORK/out) after each part. Expects the packed headers in .deps/include (scripts/pack_cuda_deps.sh) and, for
# accuracy and pipeline, the Fashion-MNIST IDX files in .gpudata/fashion-mnist.
set -uo pipefail
cd "$(dirname "$0")/.."
DEADLINE=${1:-540}
[ $# -gt 0 ] && shift
PARTS=${*:-build phases accuracy pipeline mobilenet refuse tests}
WORK=${WORK:-/tmp/isp-gpu-work}
OUT=${OUT:-$WORK/out}
mkdir -p "$WORK" "$OUT"
exec > >(tee -a "$WORK/session.log") 2>&1
save() {  # what comes back: a few files
  cp "$WORK/session.log" "$OUT/" 2>/dev/null
  cp "$WORK/phases_table.md" "$OUT/" 2>/dev/null
  (cd "$WORK" && tar czf "$OUT/results.tgz" --exclude='*.pt' --exclude='*.png' --exclude='weights*' \
     build.log build_tests.log ctest.log fixture.log phases acc pipeline refuse 2>/dev/null)
  return 0
}
trap save EXIT
left() { echo $((DEADLINE - SECONDS)); }
want() { [[ " $PARTS " == *" $1 "* ]]; }
# want PART and at least NEED seconds left before the deadline
start_part() {
  want "$1" || return 1
  if [ "$(left)" -lt "$2" ]; then echo "== $1: skipped ($(left) s left, needs about $2 s)"; return 1; fi
  echo "== $1 (left $(left) s, $(date -u +%T))"
}
echo "== environment ($(date -u +%FT%TZ)); parts: $PARTS"
nvidia-smi --query-gpu=name,driver_version,memory.total,clocks.max.sm --format=csv,noheader || true
python3 -c 'import torch; print("torch", torch.__version__, "cuda", torch.version.cuda, "available", torch.cuda.is_available())' || true
g++ --version | head -n1; cmake --version | head -n1; echo "cores: $(nproc)"; git log -1 --format='commit %h %s' 2>/dev/null || true

export LD_LIBRARY_PATH="$(python3 -c 'import torch,os;print(os.path.join(os.path.dirname(torch.__file__),"lib"))'):${LD_LIBRARY_PATH:-}"
export ISP_FMNIST_ROOT="$PWD/.gpudata/fashion-mnist"
ISP=build-cuda/bin/isp

if want build; then
  echo "== build (left $(left) s)"
  t=$SECONDS
  if ! ISP_BUILD_TESTS=ON ISP_BUILD_TARGETS=isp_all bash scripts/build_cuda.sh build-cuda > "$WORK/build.log" 2>&1; then
    grep -E "error|Error" "$WORK/build.log" | head -n 40; tail -n 40 "$WORK/build.log"
    echo "BUILD FAILED after $((SECONDS - t)) s"; exit 1
  fi
  tail -n 3 "$WORK/build.log"; echo "build: $((SECONDS - t)) s"
fi
[ -x "$ISP" ] || { echo "no $ISP: run the build part"; exit 1; }

if start_part phases 100; then
  ISP_BIN=$ISP OUT_DIR="$WORK/phases" ARCHS=resnet56 CONFIGS="${PHASE_CONFIGS:-eager_fp32 graphs_fp32 graphs_cl_fp32 graphs_cl_bf16 graphs_cl_bf16_unfolded}" \
    bash bench/gpu_phases.sh || echo "phases resnet56: some runs failed"
  save
fi

summarise() {  # summarise RUN_DIR LABEL: the figures of a run's summary.json on one line
  python3 bench/run_summary.py line "$1" "$2"
}

source bench/speed_settings.sh
settings_of() {  # a configuration's runtime settings as --set arguments ("default": none)
  [ "$1" = default ] && return
  for s in $(speed_settings "$1"); do printf -- '--set %s ' "$s"; done
}

if start_part accuracy 150 && [ -d .gpudata/fashion-mnist ]; then
  mkdir -p "$WORK/acc"
  for seed in 1 2; do
    for cfg in graphs_cl_bf16 graphs_cl_fp32 eager_fp32; do
      [ "$(left)" -lt 40 ] && { echo "accuracy: out of time"; break 2; }
      t=$SECONDS
      # shellcheck disable=SC2046
      $ISP run configs/classifier/resnet56_fmnist.json --work-dir "$WORK/acc/$cfg-$seed" --set 'runtime.device="cuda"' \
        --set seed=$seed --set nodes.classifier.epochs=6 --set 'nodes.classifier.milestones=[3,5]' \
        --set nodes.classifier.eval_every=6 $(settings_of $cfg) > "$WORK/acc/$cfg-$seed.log" 2>&1 \
        || { echo "$cfg seed $seed FAILED"; tail -n 8 "$WORK/acc/$cfg-$seed.log"; }
      summarise "$WORK/acc/$cfg-$seed" "$cfg seed $seed ($((SECONDS - t)) s)"
    done
  done
  save
fi

if start_part pipeline 90 && [ -d .gpudata/fashion-mnist ]; then
  mkdir -p "$WORK/pipeline"
  for cfg in ${PIPELINE_CONFIGS:-default graphs_cl_fp32}; do
    t=$SECONDS
    # shellcheck disable=SC2046
    $ISP run configs/isp/quick_fmnist.json --work-dir "$WORK/pipeline/$cfg" --set 'runtime.device="cuda"' \
      $(settings_of $cfg) > "$WORK/pipeline/$cfg.log" 2>&1; rc=$?
    echo "main job, $cfg settings: exit $rc, $((SECONDS - t)) s"
    [ $rc -eq 0 ] || tail -n 12 "$WORK/pipeline/$cfg.log"
    grep -E "^\[(selector|export)\] saliency|WARNING" "$WORK/pipeline/$cfg.log" | head -n 4
    summarise "$WORK/pipeline/$cfg" "main job $cfg"
    ls "$WORK/pipeline/$cfg/export" 2>/dev/null | head -n 20 | tr '\n' ' '; echo
    if [ $cfg = default ] && [ $rc -eq 0 ]; then
      $ISP explain --run "$WORK/pipeline/$cfg" --images 8 --out "$WORK/pipeline/$cfg/explain" > "$WORK/pipeline/explain.log" 2>&1
      echo "isp explain on CUDA: exit $?"; tail -n 3 "$WORK/pipeline/explain.log"
      cp "$WORK/pipeline/$cfg/explain/saliency.png" "$OUT/explain_saliency.png" 2>/dev/null
      cp "$WORK/pipeline/$cfg/explain/curves.png" "$OUT/explain_curves.png" 2>/dev/null
    fi
    [ "$(left)" -lt 60 ] && break
  done
  save
fi

if start_part mobilenet 150; then
  ISP_BIN=$ISP OUT_DIR="$WORK/phases" ARCHS=mobilenetv2 CONFIGS="eager_fp32 graphs_fp32 graphs_cl_fp32 graphs_cl_bf16" \
    bash bench/gpu_phases.sh || echo "phases mobilenetv2: some runs failed"
  save
fi
if [ -d "$WORK/phases" ]; then
  python3 bench/phase_table.py "$WORK/phases" --archs resnet56 mobilenetv2 \
    --configs eager_fp32 eager_cl_bf16 graphs_fp32 graphs_cl_fp32 graphs_cl_bf16_unfolded graphs_cl_bf16 > "$WORK/phases_table.md" || true
fi

if start_part refuse 30; then
  if cmake --build build-cuda --target isp_fixture_other_cuda > "$WORK/fixture.log" 2>&1; then
    mkdir -p "$WORK/refuse"
    printf '{"plugins": ["%s"], "nodes": {}, "stages": []}\n' "$PWD/build-cuda/test_plugins/libisp_fixture_other_cuda.so" > "$WORK/refuse/recipe.json"
    $ISP validate "$WORK/refuse/recipe.json"; echo "exit status $? (2 expected: refused)"
  else
    tail -n 20 "$WORK/fixture.log"
  fi
fi

if start_part tests 100; then
  if cmake --build build-cuda -j"$(nproc)" > "$WORK/build_tests.log" 2>&1; then
    (cd build-cuda && timeout $(( $(left) - 10 )) ctest -j"$(nproc)" --timeout 300 -E 'installed_mask_head|out_of_tree_plugin' > "$WORK/ctest.log" 2>&1)
    tail -n 25 "$WORK/ctest.log"
  else
    tail -n 40 "$WORK/build_tests.log"
  fi
fi
echo "== tables"
cat "$WORK/phases_table.md" 2>/dev/null
echo "session: $SECONDS s"
