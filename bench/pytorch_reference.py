#!/usr/bin/env python3
"""A plain PyTorch ResNet-56 classifier step on this machine: the yardstick for isp's CPU tables.

Issue 12's official figures were measured on one 2-core EPYC; CPUs of the same family differ by 2x between
VMs (docs/performance.md). The official code's classifier loop, its loss leak aside, is a standard PyTorch
training step, so this script times that step on the machine at hand: eager PyTorch, ResNet-56 with option-A
shortcuts (as isp's ResNetCifar and the official code), SGD with momentum, cross-entropy, synthetic CIFAR-sized
batches. Its img/s next to bench/cpu_phases.sh's `cpu_before` column says how this machine compares with the one
the official figures came from.

  /usr/bin/python3 bench/pytorch_reference.py [--threads 1] [--batch 128] [--steps 40] [--warmup 20] [--bf16]

Prints one JSON line: median img/s and ms per step over the steps after the warm-up. --bf16 runs the step under
CPU bfloat16 autocast with NHWC tensors, PyTorch's own fast path (needs AVX512-BF16 or AMX to be fast).
"""
import argparse
import importlib.util
import json
import os
import statistics
import time

import torch
import torch.nn.functional as F


def resnet_cifar():
    """isp's ResNetCifar as plain torch.nn modules: the one scripts/check_export_torch.py loads exports into."""
    path = os.path.join(os.path.dirname(os.path.abspath(__file__)), "..", "scripts", "check_export_torch.py")
    spec = importlib.util.spec_from_file_location("check_export_torch", path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module.ResNetCifar


def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--batch", type=int, default=128)
    ap.add_argument("--steps", type=int, default=40)
    ap.add_argument("--warmup", type=int, default=20)
    ap.add_argument("--depth", type=int, default=56)
    ap.add_argument("--bf16", action="store_true")
    a = ap.parse_args()
    torch.set_num_threads(a.threads)
    torch.manual_seed(0)
    model = resnet_cifar()(depth=a.depth)
    opt = torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9, weight_decay=5e-4)
    fmt = torch.channels_last if a.bf16 else torch.contiguous_format
    model = model.to(memory_format=fmt)
    x = torch.randn(a.batch, 3, 32, 32).to(memory_format=fmt)
    y = torch.randint(0, 10, (a.batch,))
    times = []
    for step in range(a.warmup + a.steps):
        t0 = time.perf_counter()
        with torch.autocast("cpu", dtype=torch.bfloat16, enabled=a.bf16):
            loss = F.cross_entropy(model(x), y)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        loss.item()  # the step is done when its loss is read, as a training loop that logs it would
        if step >= a.warmup:
            times.append(time.perf_counter() - t0)
    ms = 1000 * statistics.median(times)
    print(json.dumps({"torch": torch.__version__, "threads": a.threads, "batch": a.batch, "depth": a.depth,
                      "bf16_channels_last": a.bf16, "steps": len(times), "step_ms_median": round(ms, 2),
                      "images_per_s_median": round(1000 * a.batch / ms, 1)}))


if __name__ == "__main__":
    main()
