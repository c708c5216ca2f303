#!/usr/bin/env python3
"""Table of bench/gpu_phases.sh runs: median img/s per phase and configuration beside the official code's.

Reads <out>/<arch>-<config>/metrics.jsonl (the training loop's epoch lines: images_per_s_median, step_ms_median,
timed_steps) and prints Markdown. The full-pipeline estimate multiplies the paper's schedule (CIFAR-10: 50,000
training images; classifier 200 epochs, predictor 300, selector 20, gate learning 200 epochs over a 5 % subset,
finetuning 200) by the measured rates; evaluation time is not included.
"""
import argparse
import json
import os

# The official PyTorch code on an H100 (fp32, its defaults, synthetic CIFAR-sized data): issue 17.
PHASES = [  # (stage name in the recipe, phase, batch size, official img/s, images in a full-length run)
    ("classifier", "classifier", 128, 3008, 200 * 50000),
    ("predictor", "AEM predictor", 128, 1447, 300 * 50000),
    ("selector", "AEM selector", 16, 205, 20 * 50000),
    ("prune", "gate learning", 128, 750, 200 * 2500),
    ("finetune", "finetuning", 128, 3300, 200 * 50000),
]
TARGET = {"classifier": 4, "predictor": 4, "selector": 20, "prune": 4, "finetune": 4}
# The official code on a 2-core AMD EPYC (AVX-512 BF16), one thread, Debian's torch 1.13, ResNet-56: issue 12
# (run 1; its training loop keeps every step's graph alive, so it slows as it goes).
CPU_OFFICIAL = {"classifier": 102.8, "predictor": 97.1, "selector": 71.0, "prune": 194.5, "finetune": 236.7}
CPU_TARGET = {stage: 2 for stage in CPU_OFFICIAL}


def rates(run_dir):
    out = {}
    path = os.path.join(run_dir, "metrics.jsonl")
    if not os.path.exists(path):
        return out
    with open(path) as f:
        for line in f:
            try:
                j = json.loads(line)
            except ValueError:
                continue
            if "images_per_s_median" in j and "stage" in j:
                out[j["stage"]] = (j["images_per_s_median"], j.get("step_ms_median"), j.get("timed_steps"))
    return out


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("out")
    ap.add_argument("--archs", nargs="+", default=["resnet56", "mobilenetv2"])
    ap.add_argument("--configs", nargs="+", required=True)
    ap.add_argument("--reference", choices=["h100", "cpu"], default="h100",
                    help="official figures to compare with: the H100 (issue 17) or the 2-core CPU, 1 thread (issue 12)")
    ap.add_argument("--baseline", help="a configuration to state every other one's speed-up over (e.g. today's isp)")
    a = ap.parse_args()
    global PHASES, TARGET
    if a.reference == "cpu":
        PHASES = [(st, ph, bs, CPU_OFFICIAL[st], n) for st, ph, bs, _, n in PHASES]
        TARGET = CPU_TARGET
    for arch in a.archs:
        runs = {c: rates(os.path.join(a.out, f"{arch}-{c}")) for c in a.configs}
        print(f"\n### {arch}: median images/s per phase (step time in ms)\n")
        base = a.baseline if a.baseline in a.configs else None
        head = "| phase | batch | official |" + "".join(f" {c} |" for c in a.configs) + " best / official |"
        head += f" best / {base} |" if base else ""
        print(head)
        print("|" + "---|" * (4 + len(a.configs) + (1 if base else 0)))
        for stage, phase, bs, official, _ in PHASES:
            cells, best = [], None
            for c in a.configs:
                r = runs[c].get(stage)
                if r is None:
                    cells.append(" — |")
                    continue
                ips, ms, n = r
                cells.append(f" {ips:,.0f} ({ms:.2f} ms) |")
                best = ips if best is None else max(best, ips)
            ratio = f" {best / official:.1f}× (target {TARGET[stage]}×)" if best and arch == "resnet56" else (
                f" {best / official:.1f}×" if best else " —")
            row = f"| {phase} | {bs} | {official:,} |" + "".join(cells) + ratio + " |"
            if base:
                b = runs[base].get(stage)
                row += f" {best / b[0]:.2f}× |" if b and best else " — |"
            print(row)
        est = []
        for c in a.configs:
            secs, ok = 0.0, True
            for stage, _, _, _, images in PHASES:
                r = runs[c].get(stage)
                if r is None:
                    ok = False
                    break
                secs += images / r[0]
            est.append(f" {secs / 3600:.2f} h |" if ok else " — |")
        official_h = sum(images / official for _, _, _, official, images in PHASES) / 3600
        print(f"| full-length pipeline estimate | | {official_h:.1f} h |" + "".join(est) + " |" + (" |" if base else ""))


if __name__ == "__main__":
    main()
