#!/usr/bin/env python3
"""Checks an isp export with PyTorch alone: builds the network as plain torch.nn modules from structure.json,
loads weights.pt with torch.load (strictly: every tensor named and shaped as the model expects), runs the
sample input of sample.json and compares with the logits isp computed in C++; then the same for model.ts.pt
(TorchScript, loaded with torch.jit.load) where the export has it, and model.onnx through the ONNX checker
where python3-onnx is installed (onnxruntime runs it: scripts/check_export_onnxruntime.js).

    python3 scripts/check_export_torch.py work_dirs/quick_fmnist/export [more export folders] [--tolerance 1e-5]

Each folder ends with a line {"export_dir": ..., "ok": true|false}. Exit status: 0 when every folder is within the
tolerance, 1 when one is beyond it or has any mismatch, 77 when PyTorch is not installed
(Debian: apt install python3-torch). The models below are also a starting point for using the pruned network
in Python: ResNetCifar, MobileNetV2Cifar, ResNet and MobileNetV2 (torchvision's layouts) with the kept widths of
structure.json.
"""
import argparse
import json
import os
import sys

try:
    import torch
    import torch.nn as nn
    import torch.nn.functional as F
except ImportError:
    print("skipped: PyTorch is not installed (Debian: apt install python3-torch)")
    sys.exit(77)


class BasicBlock(nn.Module):
    """isp's ResNetCifar block: conv-BN-ReLU (the pruned width), conv-BN, option-A shortcut, ReLU."""

    def __init__(self, in_planes, planes, mid, stride):
        super().__init__()
        self.conv1 = nn.Conv2d(in_planes, mid, 3, stride, 1, bias=False)
        self.bn1 = nn.BatchNorm2d(mid)
        self.conv2 = nn.Conv2d(mid, planes, 3, 1, 1, bias=False)
        self.bn2 = nn.BatchNorm2d(planes)
        self.in_planes, self.planes, self.stride = in_planes, planes, stride

    def shortcut(self, x):
        if self.stride == 1 and self.in_planes == self.planes:
            return x
        s = F.avg_pool2d(x, self.stride, self.stride) if self.stride != 1 else x
        if self.planes > self.in_planes:
            pad = s.new_zeros(s.size(0), self.planes - self.in_planes, s.size(2), s.size(3))
            s = torch.cat([s, pad], 1)
        return s

    def forward(self, x):
        out = F.relu(self.bn1(self.conv1(x)))
        out = self.bn2(self.conv2(out))
        return F.relu(out + self.shortcut(x))


class ResNetCifar(nn.Module):
    def __init__(self, depth=56, num_classes=10, in_channels=3, widths=(), **_):
        super().__init__()
        n = (depth - 2) // 6
        self.conv1 = nn.Conv2d(in_channels, 16, 3, 1, 1, bias=False)
        self.bn1 = nn.BatchNorm2d(16)
        in_planes, k = 16, 0
        for s, planes in enumerate((16, 32, 64)):
            blocks = []
            for b in range(n):
                stride = 2 if s > 0 and b == 0 else 1
                mid = widths[k] if widths else planes
                blocks.append(BasicBlock(in_planes, planes, mid, stride))
                in_planes, k = planes, k + 1
            setattr(self, f"layer{s + 1}", nn.ModuleList(blocks))
        self.fc = nn.Linear(64, num_classes)

    def forward(self, x):
        out = F.relu(self.bn1(self.conv1(x)))
        for layer in (self.layer1, self.layer2, self.layer3):
            for block in layer:
                out = block(out)
        return self.fc(out.mean((2, 3)))


class InvertedResidual(nn.Module):
    def __init__(self, in_planes, out_planes, hidden, stride):
        super().__init__()
        self.conv1 = nn.Conv2d(in_planes, hidden, 1, bias=False)
        self.bn1 = nn.BatchNorm2d(hidden)
        self.conv2 = nn.Conv2d(hidden, hidden, 3, stride, 1, groups=hidden, bias=False)
        self.bn2 = nn.BatchNorm2d(hidden)
        self.conv3 = nn.Conv2d(hidden, out_planes, 1, bias=False)
        self.bn3 = nn.BatchNorm2d(out_planes)
        self.stride = stride
        self.shortcut = None
        if stride == 1 and in_planes != out_planes:
            self.shortcut = nn.Sequential(nn.Conv2d(in_planes, out_planes, 1, bias=False), nn.BatchNorm2d(out_planes))

    def forward(self, x):
        out = F.relu(self.bn1(self.conv1(x)))
        out = F.relu(self.bn2(self.conv2(out)))
        out = self.bn3(self.conv3(out))
        if self.stride == 1:
            out = out + (x if self.shortcut is None else self.shortcut(x))
        return out


MOBILENETV2_STAGES = ((1, 16, 1, 1), (6, 24, 2, 1), (6, 32, 3, 1), (6, 64, 4, 2), (6, 96, 3, 1), (6, 160, 3, 2),
                      (6, 320, 1, 1))


class MobileNetV2Cifar(nn.Module):
    def __init__(self, num_classes=10, in_channels=3, widths=(), **_):
        super().__init__()
        self.conv1 = nn.Conv2d(in_channels, 32, 3, 1, 1, bias=False)
        self.bn1 = nn.BatchNorm2d(32)
        layers, in_planes, k = [], 32, 0
        for t, c, n, s in MOBILENETV2_STAGES:
            for b in range(n):
                hidden = widths[k] if widths else t * in_planes
                layers.append(InvertedResidual(in_planes, c, hidden, s if b == 0 else 1))
                in_planes, k = c, k + 1
        self.layers = nn.ModuleList(layers)
        self.conv2 = nn.Conv2d(320, 1280, 1, bias=False)
        self.bn2 = nn.BatchNorm2d(1280)
        self.linear = nn.Linear(1280, num_classes)

    def forward(self, x):
        out = F.relu(self.bn1(self.conv1(x)))
        for block in self.layers:
            out = block(out)
        out = F.relu(self.bn2(self.conv2(out)))
        return self.linear(out.mean((2, 3)))


class TvBlock(nn.Module):
    """isp's ResNet block in torchvision's names: BasicBlock (one gated width) or Bottleneck (two)."""

    def __init__(self, in_planes, out_planes, mid, stride, bottleneck):
        super().__init__()
        self.bottleneck = bottleneck
        if bottleneck:
            self.conv1 = nn.Conv2d(in_planes, mid[0], 1, bias=False)
            self.bn1 = nn.BatchNorm2d(mid[0])
            self.conv2 = nn.Conv2d(mid[0], mid[1], 3, stride, 1, bias=False)
            self.bn2 = nn.BatchNorm2d(mid[1])
            self.conv3 = nn.Conv2d(mid[1], out_planes, 1, bias=False)
            self.bn3 = nn.BatchNorm2d(out_planes)
        else:
            self.conv1 = nn.Conv2d(in_planes, mid[0], 3, stride, 1, bias=False)
            self.bn1 = nn.BatchNorm2d(mid[0])
            self.conv2 = nn.Conv2d(mid[0], out_planes, 3, 1, 1, bias=False)
            self.bn2 = nn.BatchNorm2d(out_planes)
        self.downsample = None
        if stride != 1 or in_planes != out_planes:
            self.downsample = nn.Sequential(nn.Conv2d(in_planes, out_planes, 1, stride, bias=False),
                                            nn.BatchNorm2d(out_planes))

    def forward(self, x):
        out = F.relu(self.bn1(self.conv1(x)))
        if self.bottleneck:
            out = self.bn3(self.conv3(F.relu(self.bn2(self.conv2(out)))))
        else:
            out = self.bn2(self.conv2(out))
        return F.relu(out + (self.downsample(x) if self.downsample is not None else x))


class ResNet(nn.Module):
    """isp's ImageNet ResNet (torchvision's layout and names) with the kept widths of structure.json; unpruned,
    its state dict is exactly torchvision.models.resnet<depth>()'s."""

    def __init__(self, depth=50, num_classes=1000, in_channels=3, widths=(), gate_residual=False, **_):
        super().__init__()
        bottleneck = depth >= 50
        blocks = {18: [2, 2, 2, 2], 34: [3, 4, 6, 3], 50: [3, 4, 6, 3], 101: [3, 4, 23, 3], 152: [3, 8, 36, 3]}[depth]
        per_block, expansion = (2, 4) if bottleneck else (1, 1)
        widths = list(widths)
        streams = [(64 << s) * expansion for s in range(4)]
        if gate_residual and widths:  # the four residual streams come first
            streams, widths = widths[:4], widths[4:]
        stem = 64 if bottleneck else streams[0]  # a BasicBlock ResNet's stage-1 stream starts at the stem
        self.conv1 = nn.Conv2d(in_channels, stem, 7, 2, 3, bias=False)
        self.bn1 = nn.BatchNorm2d(stem)
        in_planes, in_full, k = stem, 64, 0
        for stage, n in enumerate(blocks):
            planes = 64 << stage
            layer = []
            for b in range(n):
                mid = widths[k:k + per_block] if widths else [planes] * per_block
                k += per_block
                stride = 2 if stage > 0 and b == 0 else 1
                block = TvBlock(in_planes, streams[stage], mid, stride, bottleneck)
                if block.downsample is None and (stride != 1 or in_full != planes * expansion):
                    block.downsample = nn.Sequential(nn.Conv2d(in_planes, streams[stage], 1, stride, bias=False),
                                                     nn.BatchNorm2d(streams[stage]))
                layer.append(block)
                in_planes, in_full = streams[stage], planes * expansion
            setattr(self, f"layer{stage + 1}", nn.Sequential(*layer))
        self.fc = nn.Linear(in_planes, num_classes)

    def forward(self, x):
        out = F.max_pool2d(F.relu(self.bn1(self.conv1(x))), 3, 2, 1)
        for stage in range(1, 5):
            out = getattr(self, f"layer{stage}")(out)
        return self.fc(out.mean((2, 3)))


def divisible(v):
    """torchvision's _make_divisible(v, 8)."""
    n = max(8, int(v + 4) // 8 * 8)
    return n + 8 if n < 0.9 * v else n


def conv_bn(cin, cout, k, stride=1, groups=1):
    return nn.Sequential(nn.Conv2d(cin, cout, k, stride, k // 2, groups=groups, bias=False), nn.BatchNorm2d(cout))


class TvInvertedResidual(nn.Module):
    def __init__(self, cin, cout, hidden, stride, expand):
        super().__init__()
        layers = [conv_bn(cin, hidden, 1)] if expand else []
        layers += [conv_bn(hidden, hidden, 3, stride, hidden), nn.Conv2d(hidden, cout, 1, bias=False), nn.BatchNorm2d(cout)]
        self.conv = nn.Sequential(*layers)
        self.expand, self.residual = expand, stride == 1 and cin == cout

    def forward(self, x):
        h = x
        for i, layer in enumerate(self.conv):
            h = layer(h)
            if i < len(self.conv) - 2:  # after the expansion and depthwise conv + BN
                h = F.relu6(h)
        return h + x if self.residual else h


class MobileNetV2(nn.Module):
    """isp's ImageNet MobileNetV2 (torchvision's layout and names) with the kept hidden widths of structure.json."""

    def __init__(self, num_classes=1000, in_channels=3, width_mult=1.0, widths=(), **_):
        super().__init__()
        stages = [(1, 16, 1, 1), (6, 24, 2, 2), (6, 32, 3, 2), (6, 64, 4, 2), (6, 96, 3, 1), (6, 160, 3, 2), (6, 320, 1, 1)]
        cin = divisible(32 * width_mult)
        features, k = [conv_bn(in_channels, cin, 3, 2)], 0
        for t, c, n, s in stages:
            cout = divisible(c * width_mult)
            for b in range(n):
                hidden = cin if t == 1 else (widths[k] if widths else cin * t)
                k += t != 1
                features.append(TvInvertedResidual(cin, cout, hidden, s if b == 0 else 1, t != 1))
                cin = cout
        last = divisible(1280 * max(1.0, width_mult))
        features.append(conv_bn(cin, last, 1))
        self.features = nn.Sequential(*features)
        self.classifier = nn.Sequential(nn.Dropout(0.2), nn.Linear(last, num_classes))

    def forward(self, x):
        out = F.relu6(self.features[0](x))
        for block in self.features[1:-1]:
            out = block(out)
        out = F.relu6(self.features[-1](out))
        return self.classifier(out.mean((2, 3)))


MODELS = {"ResNetCifar": ResNetCifar, "MobileNetV2Cifar": MobileNetV2Cifar, "ResNet": ResNet,
          "MobileNetV2": MobileNetV2}


def build(spec):
    name = spec["type"].split("::")[-1].split("@")[0]
    if name not in MODELS:
        # An exception, not SystemExit: in a batch this folder fails and the later folders are still checked.
        raise ValueError(f"no PyTorch reference for backbone {spec['type']} (known: {', '.join(MODELS)})")
    return MODELS[name](**{k: v for k, v in spec.items() if k != "type"})


def tensor_of(entry):
    return torch.tensor(entry["values"], dtype=torch.float32).reshape(entry["shape"])


def check(export_dir, tolerance_per_unit):
    """Checks one export folder; prints one JSON line per format, each naming the folder. True if all agree."""
    with open(os.path.join(export_dir, "structure.json")) as f:
        spec = json.load(f)["spec"]
    with open(os.path.join(export_dir, "sample.json")) as f:
        sample = json.load(f)
    model = build(spec)
    # weights_only=True: the default of torch.load since PyTorch 2.6, and the safe way to read weights at all
    # (the file must hold only tensors and plain containers).
    state = torch.load(os.path.join(export_dir, "weights.pt"), map_location="cpu", weights_only=True)
    model.load_state_dict(state, strict=True)  # raises on any missing, unexpected or misshapen tensor
    model.eval()
    with torch.no_grad():
        logits = model(tensor_of(sample["input"]))
    expected = tensor_of(sample["logits"])
    # Float32 rounding grows with the logits' size (a trained net's reach 10 and more): 1e-5 per unit beyond 1.
    tolerance = tolerance_per_unit * max(1.0, expected.abs().max().item())
    results = [("state_dict", "weights.pt into torch.nn modules", logits)]
    script = os.path.join(export_dir, "model.ts.pt")
    if os.path.exists(script):  # TorchScript: no model code needed at all (BN folded into the convolutions)
        traced = torch.jit.load(script, map_location="cpu")
        traced.eval()
        with torch.no_grad():
            results.append(("torchscript", "model.ts.pt with torch.jit.load", traced(tensor_of(sample["input"]))))
    ok = True
    onnx_file = os.path.join(export_dir, "model.onnx")
    if os.path.exists(onnx_file):  # ONNX: the official checker, with shape inference (Debian's python3-onnx)
        try:
            import onnx
            onnx.checker.check_model(onnx_file, full_check=True)
            print(json.dumps({"export_dir": export_dir, "format": "onnx",
                              "how": "onnx.checker.check_model(full_check=True)",
                              "runtime": f"onnx {onnx.__version__} (Python)", "valid": True}))
        except ImportError:
            print(json.dumps({"export_dir": export_dir, "format": "onnx", "how": "onnx.checker",
                              "skipped": "python3-onnx is not installed"}))
        except Exception as e:  # the checker's own error names what is wrong
            print(json.dumps({"export_dir": export_dir, "format": "onnx",
                              "how": "onnx.checker.check_model(full_check=True)", "valid": False, "error": str(e)}))
            ok = False
    for fmt, how, out in results:
        delta = (out - expected).abs().max().item()
        same_class = bool((out.argmax(1) == expected.argmax(1)).all())
        ok = ok and delta <= tolerance and same_class
        print(json.dumps({"export_dir": export_dir, "format": fmt, "how": how,
                          "runtime": f"torch {torch.__version__} (Python)", "backbone": spec["type"],
                          "images": int(expected.shape[0]), "max_abs_logit_delta": delta, "tolerance": tolerance,
                          "same_predicted_class": same_class}))
    return ok


def main():
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("export_dirs", nargs="+", metavar="export_dir",
                    help="one or more export folders (one Python start for all: importing torch takes seconds)")
    ap.add_argument("--tolerance", type=float, default=1e-5,
                    help="largest |logit difference| accepted, per unit of the largest |logit| where that exceeds 1")
    a = ap.parse_args()
    torch.set_num_threads(1)
    all_ok = True
    for export_dir in a.export_dirs:
        try:
            ok = check(export_dir, a.tolerance)
            print(json.dumps({"export_dir": export_dir, "ok": ok}))
        except Exception as e:  # a missing file, a tensor that does not fit the model: this folder fails, not the rest
            ok = False
            print(json.dumps({"export_dir": export_dir, "ok": False, "error": f"{type(e).__name__}: {e}"}))
        all_ok = all_ok and ok
    return 0 if all_ok else 1


if __name__ == "__main__":
    sys.exit(main())
