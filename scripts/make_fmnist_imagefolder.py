#!/usr/bin/env python3
"""Writes a small image folder made from Debian's Fashion-MNIST, for the ImageFolder dataset plugin:
OUT/train/<class>/<n>.png and OUT/test/<class>/<n>.png, grey PNGs upsampled (bilinear) to --size pixels.

    python3 scripts/make_fmnist_imagefolder.py OUT [--size 64] [--train-per-class 200] [--test-per-class 50]

Standard library only (gzip, struct, zlib): no numpy or imaging library needed.
"""
import argparse
import gzip
import os
import struct
import zlib

CLASSES = ["T-shirt_top", "Trouser", "Pullover", "Dress", "Coat", "Sandal", "Shirt", "Sneaker", "Bag", "Ankle_boot"]
SRC = "/usr/share/datasets/fashion-mnist"


def read_idx(path):
    with gzip.open(path, "rb") as f:
        data = f.read()
    zero, dtype, ndim = data[0:2], data[2], data[3]
    if zero != b"\0\0" or dtype != 0x08:
        raise SystemExit(f"{path}: not an IDX file of unsigned bytes")
    dims = struct.unpack(">" + "I" * ndim, data[4:4 + 4 * ndim])
    return dims, data[4 + 4 * ndim:]


def upsample(pixels, side, size):
    """Bilinear resize of a side x side grey image (bytes) to size x size (pixel centres aligned)."""
    out = bytearray(size * size)
    scale = side / size
    for y in range(size):
        fy = min(max((y + 0.5) * scale - 0.5, 0.0), side - 1.0)
        y0 = int(fy)
        y1 = min(y0 + 1, side - 1)
        wy = fy - y0
        r0, r1 = y0 * side, y1 * side
        for x in range(size):
            fx = min(max((x + 0.5) * scale - 0.5, 0.0), side - 1.0)
            x0 = int(fx)
            x1 = min(x0 + 1, side - 1)
            wx = fx - x0
            top = pixels[r0 + x0] * (1 - wx) + pixels[r0 + x1] * wx
            bottom = pixels[r1 + x0] * (1 - wx) + pixels[r1 + x1] * wx
            out[y * size + x] = int(top * (1 - wy) + bottom * wy + 0.5)
    return bytes(out)


def png(pixels, size):
    def chunk(kind, data):
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data) & 0xFFFFFFFF)
    raw = b"".join(b"\0" + pixels[y * size:(y + 1) * size] for y in range(size))
    return (b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", struct.pack(">IIBBBBB", size, size, 8, 0, 0, 0, 0)) +
            chunk(b"IDAT", zlib.compress(raw, 6)) + chunk(b"IEND", b""))


def write_split(out, prefix, per_class, size):
    (n, h, w), images = read_idx(os.path.join(SRC, f"{prefix}-images-idx3-ubyte.gz"))
    (_,), labels = read_idx(os.path.join(SRC, f"{prefix}-labels-idx1-ubyte.gz"))
    counts = [0] * len(CLASSES)
    for c in CLASSES:
        os.makedirs(os.path.join(out, c), exist_ok=True)
    for i in range(n):
        c = labels[i]
        if counts[c] >= per_class:
            if min(counts) >= per_class:
                break
            continue
        pixels = images[i * h * w:(i + 1) * h * w]
        if size != h:
            pixels = upsample(pixels, h, size)
        with open(os.path.join(out, CLASSES[c], f"{i:05d}.png"), "wb") as f:
            f.write(png(pixels, size))
        counts[c] += 1
    return sum(counts)


def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("out")
    ap.add_argument("--size", type=int, default=64)
    ap.add_argument("--train-per-class", type=int, default=200)
    ap.add_argument("--test-per-class", type=int, default=50)
    a = ap.parse_args()
    if not os.path.isdir(SRC):
        raise SystemExit(f"{SRC} is missing: install Debian's dataset-fashion-mnist")
    n_train = write_split(os.path.join(a.out, "train"), "train", a.train_per_class, a.size)
    n_test = write_split(os.path.join(a.out, "test"), "t10k", a.test_per_class, a.size)
    print(f"{a.out}: {n_train} training and {n_test} test images, {a.size}x{a.size} grey PNGs in {len(CLASSES)} class folders")


if __name__ == "__main__":
    main()
