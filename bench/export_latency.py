#!/usr/bin/env python3
"""CPU latency of the original vs the pruned network in PyTorch (issue 13): eager, torch.jit.trace + freeze, and
isp's own model.ts.pt, at batch 1 and 64, median of N runs after warm-up. Called by bench/export_latency.sh, which
re-exports the run first (isp export --run: export/ and export/original/), times onnxruntime with Node.js and
LibTorch from C++ with `isp latency`.

    python3 bench/export_latency.py ORIGINAL_EXPORT_DIR PRUNED_EXPORT_DIR OUT_DIR [--runs 100] [--threads 1]

Both networks are the run's own (weights.pt loaded into the plain torch.nn models of scripts/check_export_torch.py)
and go through the same exporters (torch.jit.trace, torch.onnx.export), so the rows compare like with like.
Writes OUT_DIR/latency_torch.json and the torch.onnx.export files the Node.js timer reads.
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
    ap.add_argument("original_dir")
    ap.add_argument("pruned_dir")
    ap.add_argument("out_dir")
    ap.add_argument("--runs", type=int, default=100)
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--rounds", type=int, default=3)
    a = ap.parse_args()
    torch.set_num_threads(a.threads)
    os.makedirs(a.out_dir, exist_ok=True)
    dirs = {"original": a.original_dir, "pruned": a.pruned_dir}
    nets = {}
    for name, d in dirs.items():
        spec = dict(json.load(open(os.path.join(d, "structure.json")))["spec"])
        net = ref.build(spec)
        net.load_state_dict(torch.load(os.path.join(d, "weights.pt"), weights_only=True), strict=True)
        nets[name] = net.eval()
    c, hw = spec.get("in_channels", 3), spec.get("input_size", 32)
    # Every (network, runtime, batch) is timed in ROUNDS interleaved rounds and the median of the round medians
    # reported: single back-to-back runs of this table moved one row by 2x between two runs on a quiet machine.
    cases = []
    scripts = {name: torch.jit.load(os.path.join(d, "model.ts.pt")) for name, d in dirs.items()}
    for batch in (1, 64):
        x = torch.randn(batch, c, hw, hw)
        for name, net in nets.items():
            cases.append((name, "PyTorch eager", batch, net, x))
            cases.append((name, "TorchScript (torch.jit.trace)", batch, torch.jit.freeze(torch.jit.trace(net, x)), x))
            cases.append((name, "TorchScript (isp's model.ts.pt, BN folded)", batch, scripts[name], x))
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
