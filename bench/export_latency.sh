#!/usr/bin/env bash
# Issue 13's latency table: the original vs the pruned network on the CPU, batch 1 and 64, median of RUNS runs
# (default 100), in PyTorch eager, TorchScript and onnxruntime.
#
#   bench/export_latency.sh [RUN_DIR] [OUT_DIR]     # default: the README job's run, work_dirs/export_latency
#
# Needs Debian's python3-torch and the onnxruntime-node that scripts/setup.sh installs into .node/. THREADS
# (default 1) sets the intra-op threads of every runtime. PyTorch eager runs the same ATen/oneDNN kernels as
# isp's LibTorch modules.
set -euo pipefail
cd "$(dirname "$0")/.."
RUN=${1:-work_dirs/quick_fmnist}
OUT=${2:-work_dirs/export_latency}
THREADS=${THREADS:-1}
RUNS=${RUNS:-100}
PY=/usr/bin/python3
[ -x "$PY" ] || PY=python3
mkdir -p "$OUT"
build/bin/isp export --run "$RUN" --out "$OUT/pruned" >/dev/null
"$PY" bench/export_latency.py "$OUT/pruned" "$OUT" --runs "$RUNS" --threads "$THREADS" 2>/dev/null
chw=$("$PY" -c "import json,sys; s=json.load(open('$OUT/pruned/structure.json'))['spec']; n=s.get('input_size',32); print(f\"{s.get('in_channels',3)},{n},{n}\")")
CHW=$chw THREADS=$THREADS RUNS=$RUNS NODE_PATH=.node/node_modules node bench/onnx_latency.js \
  "original:torch.onnx.export=$OUT/original.torch.onnx" "pruned:torch.onnx.export=$OUT/pruned.torch.onnx" \
  "pruned:isp's model.onnx, BN folded=$OUT/pruned/model.onnx" > "$OUT/latency_onnx.json"
"$PY" - "$OUT" <<'PY'
import json, os, sys
out = sys.argv[1]
t = json.load(open(os.path.join(out, "latency_torch.json")))
rows = t["rows"] + json.load(open(os.path.join(out, "latency_onnx.json")))
print(f"CPU latency: PyTorch rows the median of {t['rounds']} interleaved rounds of {t['runs']} runs, onnxruntime rows the median of {t['runs']} runs; {t['threads']} thread(s), torch {t['torch']}\n")
print("| runtime | batch | original ms | pruned ms | speed-up |")
print("|---|---|---|---|---|")
def runtime_key(r):
    return r["runtime"].replace("isp's model.ts.pt, BN folded", "torch.jit.trace").replace("isp's model.onnx, BN folded", "torch.onnx.export")
orig = {(runtime_key(r), r["batch"]): r["ms"] for r in rows if r["network"] == "original"}
for r in rows:
    if r["network"] != "pruned":
        continue
    o = orig.get((runtime_key(r), r["batch"]))
    print(f"| {r['runtime']} | {r['batch']} | {o:.3f} | {r['ms']:.3f} | {o / r['ms']:.2f}× |" if o else
          f"| {r['runtime']} | {r['batch']} | — | {r['ms']:.3f} | — |")
PY
