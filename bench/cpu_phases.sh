#!/usr/bin/env bash
# Issue 12's CPU table: median img/s of every training phase (classifier, AEM predictor, AEM selector, gate
# learning, finetuning) for ResNet-56 and MobileNetV2 on CIFAR-sized synthetic data, at each thread count, for
# isp as it was (cpu_before: glibc's allocator defaults, no BN folding) and with each speed option, beside the
# official code's figures on a 2-core AMD EPYC, one thread (docs/performance.md).
#
#   bench/cpu_phases.sh                       # everything (about an hour on 2 cores)
#   ARCHS=resnet56 THREADS_LIST=1 CONFIGS="cpu_before cpu_eager_fp32 cpu_cl_bf16" bench/cpu_phases.sh
#
# Configurations (bench/speed_settings.sh): cpu_before, cpu_eager_fp32 (fp32, BN folded in frozen networks,
# allocator kept), cpu_cl_fp32 (+ channels_last), cpu_bf16 and cpu_cl_bf16 (+ bfloat16 autocast: only where the
# CPU has AVX512-BF16 or AMX; dropped otherwise). STEPS steps per phase (default 40: 20 warm-up steps, then two
# timed windows of 10). Tables go to OUT_ROOT/t<threads>/table.md (default OUT_ROOT work_dirs/cpu_phases).
set -euo pipefail
cd "$(dirname "$0")/.."
OUT_ROOT=${OUT_ROOT:-work_dirs/cpu_phases}
ARCHS=${ARCHS:-resnet56 mobilenetv2}
THREADS_LIST=${THREADS_LIST:-1 2}
STEPS=${STEPS:-40}
CONFIGS=${CONFIGS:-cpu_before cpu_eager_fp32 cpu_cl_fp32 cpu_bf16 cpu_cl_bf16}
if ! grep -qwE 'avx512_bf16|amx_bf16' /proc/cpuinfo 2>/dev/null; then
  echo "this CPU has neither AVX512-BF16 nor AMX: the bf16 configurations are left out"
  CONFIGS=$(echo "$CONFIGS" | tr ' ' '\n' | grep -v bf16 | tr '\n' ' ')
fi
grep -m1 'model name' /proc/cpuinfo || true
echo "cores: $(nproc)   configurations: $CONFIGS   threads: $THREADS_LIST   steps per phase: $STEPS"
status=0
for t in $THREADS_LIST; do
  echo "== $t thread(s)"
  OUT_DIR="$OUT_ROOT/t$t" THREADS=$t STEPS=$STEPS ARCHS="$ARCHS" CONFIGS="$CONFIGS" \
    bash bench/gpu_phases.sh --cpu | grep -E "ok|FAILED" || status=1
  python3 bench/phase_table.py "$OUT_ROOT/t$t" --archs $ARCHS --configs $CONFIGS --reference cpu \
    --baseline cpu_before | tee "$OUT_ROOT/t$t/table.md"
done
exit $status
