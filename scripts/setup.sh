#!/usr/bin/env bash
# Installs everything isp needs from Debian 12's archive and builds it (idempotent).
set -euo pipefail
cd "$(dirname "$0")/.."
SUDO=""
if [ "$(id -u)" != 0 ]; then SUDO=sudo; fi
pkgs="cmake g++ make ccache libtorch-dev libboost-dev nlohmann-json3-dev libtbb-dev doctest-dev libcli11-dev libgloo-dev
      libstb-dev zlib1g-dev libopenblas0-pthread dataset-fashion-mnist python3 python3-torch python3-torchvision python3-onnx chromium"
# libgloo-dev: the headers of the Gloo library Debian's LibTorch is built with (data-parallel runs on c10d).
# python3-torch, python3-onnx: the tests load exports with Debian's PyTorch and check model.onnx with the ONNX
# checker (scripts/check_export_torch.py), runtimes independent of isp; python3-torchvision: a test loads
# torchvision's own ResNets into isp's ResNet by name and compares logits. chromium: a test renders report.html in
# headless Chromium (about 15 s to install from a Debian mirror).
missing=""
for p in $pkgs; do dpkg -s "$p" >/dev/null 2>&1 || missing="$missing $p"; done
if [ -n "$missing" ]; then
  $SUDO apt-get update -q
  DEBIAN_FRONTEND=noninteractive $SUDO apt-get install -y -q --no-install-recommends $missing
fi
# onnxruntime for the tests (scripts/check_export_onnxruntime.js): the npm package ships its CPU runtime; its
# install script only fetches optional GPU binaries, hence --ignore-scripts. Into .node/ (ignored by git).
if ! command -v npm >/dev/null 2>&1; then
  $SUDO apt-get update -q
  DEBIAN_FRONTEND=noninteractive $SUDO apt-get install -y -q --no-install-recommends nodejs npm
fi
if [ ! -d .node/node_modules/onnxruntime-node ]; then
  npm install --prefix .node --ignore-scripts --no-audit --no-fund onnxruntime-node@1.20.1 >/dev/null ||
    echo "warning: npm could not install onnxruntime-node; the ONNX runtime check will be skipped" >&2
fi
# Two threads for torch's pool, one for OpenBLAS (LibTorch starts with 1 on small VMs; OpenBLAS threads fight torch's pool).
export OMP_NUM_THREADS="${OMP_NUM_THREADS:-$(nproc)}" OPENBLAS_NUM_THREADS=1
cmake -S . -B build -DCMAKE_BUILD_TYPE=RelWithDebInfo
cmake --build build -j"$(nproc)"
