#!/usr/bin/env python3
"""CPU latency of the original vs the pruned network, per runtime (issue 13): PyTorch eager, TorchScript and
onnxruntime, at batch 1 and 64, median of N runs after warm-up. Called by bench/export_latency.sh, which
writes the pruned export first (isp export --run) and times onnxruntime with Node.js.

    python3 bench/export_latency.py PRUNED_EXPORT_DIR OUT_DIR [--runs 100] [--threads 1]

The original network is the same backbone at full widths (structure.json's per-layer widths), freshly
initialised: latency does not depend on the weights' values. Both networks go through the same exporters
(torch.jit.trace, torch.onnx.export) so the rows compare like with like; the pruned network's own isp files
(model.ts.pt, model.onnx: BN folded) are timed as well. Writes OUT_DIR/latency_torch.json and the ONNX files
the Node.js timer reads.
"""
import argparse
import json
import os
import statistics
import sys
import time

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), "..", "scripts"))
import check_export_torch as ref  # noqa: E402  (the plain PyTorch models)
import torch  # noqa: E402


def median_ms(fn, x, runs):
    with torch.no_grad():
        for _ in range(10):
            fn(x)
        times = []
        for _ in range(runs):
            t0 = time.perf_counter()
            fn(x)
            times.append(1000.0 * (time.perf_counter() - t0))
    return statistics.median(times)


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("export_dir")
    ap.add_argument("out_dir")
    ap.add_argument("--runs", type=int, default=100)
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--rounds", type=int, default=3)
    a = ap.parse_args()
    torch.set_num_threads(a.threads)
    os.makedirs(a.out_dir, exist_ok=True)
    structure = json.load(open(os.path.join(a.export_dir, "structure.json")))
    spec = dict(structure["spec"])
    pruned = ref.build(spec)
    pruned.load_state_dict(torch.load(os.path.join(a.export_dir, "weights.pt")), strict=True)
    full = dict(spec)
    full.pop("widths", None)
    torch.manual_seed(0)
    original = ref.build(full)
    nets = {"original": original.eval(), "pruned": pruned.eval()}
    c, hw = spec.get("in_channels", 3), spec.get("input_size", 32)
    # Every (network, runtime, batch) is timed in ROUNDS interleaved rounds and the median of the round medians
    # reported: single back-to-back runs of this table moved one row by 2x between two runs on a quiet machine.
    cases = []
    isp_ts = torch.jit.load(os.path.join(a.export_dir, "model.ts.pt"))
    for batch in (1, 64):
        x = torch.randn(batch, c, hw, hw)
        for name, net in nets.items():
            cases.append((name, "PyTorch eager", batch, net, x))
            cases.append((name, "TorchScript (torch.jit.trace)", batch, torch.jit.freeze(torch.jit.trace(net, x)), x))
        cases.append(("pruned", "TorchScript (isp's model.ts.pt, BN folded)", batch, isp_ts, x))
    rounds = {i: [] for i in range(len(cases))}
    for _ in range(a.rounds):
        for i, (_, _, _, fn, x) in enumerate(cases):
            rounds[i].append(median_ms(fn, x, a.runs))
    rows = [{"network": name, "runtime": runtime, "batch": batch, "ms": statistics.median(rounds[i]),
             "round_medians_ms": rounds[i]} for i, (name, runtime, batch, _, _) in enumerate(cases)]
    x = torch.randn(1, c, hw, hw)
    for name, net in nets.items():  # the same exporter for both, with a symbolic batch
        torch.onnx.export(net, x, os.path.join(a.out_dir, f"{name}.torch.onnx"), input_names=["input"],
                          output_names=["logits"], dynamic_axes={"input": {0: "batch"}, "logits": {0: "batch"}},
                          opset_version=13)
    json.dump({"threads": a.threads, "runs": a.runs, "rounds": a.rounds, "torch": torch.__version__, "rows": rows},
              open(os.path.join(a.out_dir, "latency_torch.json"), "w"), indent=1)


if __name__ == "__main__":
    main()
