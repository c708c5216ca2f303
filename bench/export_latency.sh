#!/usr/bin/env bash
# Issue 13's latency table: the run's original vs its pruned network on the CPU, batch 1 and 64, median of RUNS
# runs (default 100), in LibTorch from C++ (isp's modules and model.ts.pt: `isp latency`), PyTorch eager,
# TorchScript and onnxruntime.
#
#   bench/export_latency.sh [RUN_DIR] [OUT_DIR]     # default: the README job's run, work_dirs/export_latency
#
# Needs Debian's python3-torch and the onnxruntime-node that scripts/setup.sh installs into .node/. THREADS
# (default 1) sets the intra-op threads of every runtime. Both networks are the run's own: `isp export --run`
# writes export/ (pruned) and export/original/ (the classifier it was pruned from) again.
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
[ -f "$OUT/pruned/original/structure.json" ] ||
  { echo "error: $RUN/export has no original/ (exported before isp wrote one): rerun its export stage" >&2; exit 2; }
ORIG="$OUT/pruned/original"
build/bin/isp latency "$ORIG" "$OUT/pruned" --threads "$THREADS" --runs "$RUNS" --json "$OUT/latency_cpp.json" >/dev/null
"$PY" bench/export_latency.py "$ORIG" "$OUT/pruned" "$OUT" --runs "$RUNS" --threads "$THREADS" 2>/dev/null
chw=$("$PY" -c "import json; s=json.load(open('$OUT/pruned/sample.json'))['input']['shape']; print(','.join(map(str, s[1:])))")
CHW=$chw THREADS=$THREADS RUNS=$RUNS NODE_PATH=.node/node_modules node bench/onnx_latency.js \
  "original:torch.onnx.export=$OUT/original.torch.onnx" "pruned:torch.onnx.export=$OUT/pruned.torch.onnx" \
  "original:isp's model.onnx, BN folded=$ORIG/model.onnx" "pruned:isp's model.onnx, BN folded=$OUT/pruned/model.onnx" \
  > "$OUT/latency_onnx.json"
"$PY" - "$OUT" "$ORIG" <<'PY'
import json, os, sys
out, orig_dir = sys.argv[1], sys.argv[2]
t = json.load(open(os.path.join(out, "latency_torch.json")))
cpp = json.load(open(os.path.join(out, "latency_cpp.json")))
for r in cpp["rows"]:
    r["network"] = "original" if os.path.normpath(r["folder"]) == os.path.normpath(orig_dir) else "pruned"
rows = cpp["rows"] + t["rows"] + json.load(open(os.path.join(out, "latency_onnx.json")))
print(f"CPU latency, {t['threads']} thread(s): LibTorch {cpp['libtorch']} (C++) and torch {t['torch']} (Python) rows the "
      f"median of {t['rounds']} interleaved rounds of {t['runs']} runs, onnxruntime rows the median of {t['runs']} runs\n")
print("| runtime | batch | original ms | pruned ms | speed-up |")
print("|---|---|---|---|---|")
orig = {(r["runtime"], r["batch"]): r["ms"] for r in rows if r["network"] == "original"}
for r in rows:
    if r["network"] != "pruned":
        continue
    o = orig.get((r["runtime"], r["batch"]))
    print(f"| {r['runtime']} | {r['batch']} | {o:.3f} | {r['ms']:.3f} | {o / r['ms']:.2f}× |" if o else
          f"| {r['runtime']} | {r['batch']} | — | {r['ms']:.3f} | — |")
PY
