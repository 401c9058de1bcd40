"""Time drawing feature targets for a batch of rays: raw teacher maps (FeatureMaps.sample, 4 cells per ray) against
bilateral targets stored as windows (WindowedMaps.sample, K x K cells per ray), at 100 and 200 px with DINOv2's
37 x 37 cells of 384 channels on disk (memory-mapped, as the caches are).

    .venv/bin/python bench/target_sampling.py [--rays 2048] [--views 60] [--threads 2]
"""

from __future__ import annotations

import argparse
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from dfield.core.rays import pixel_coords
from dfield.features.smoothing import bilateral_windows
from dfield.features.teachers.cache import FeatureMaps
from dfield.features.windowed_maps import WindowedMaps


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--rays", type=int, default=2048)
    ap.add_argument("--views", type=int, default=60)
    ap.add_argument("--repeats", type=int, default=20)
    ap.add_argument("--threads", type=int, default=2)
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    rng = np.random.default_rng(0)
    with tempfile.TemporaryDirectory() as tmp:
        path = Path(tmp) / "cells.npy"
        np.save(path, rng.normal(size=(args.views, 37, 37, 384)).astype(np.float16))
        cells = np.load(path, mmap_mode="r")
        for size in (100, 200):
            raw = FeatureMaps(cells, (size, size), "random")
            ay, ax, coef = bilateral_windows((37, 37), torch.rand(size, size, 3), 3.0, 0.03)
            windows = WindowedMaps(raw, np.ascontiguousarray(np.broadcast_to(
                coef.numpy().astype(np.float16)[None], (args.views, *coef.shape))), ay.numpy(), ax.numpy())
            ids = torch.from_numpy(rng.integers(0, args.views * size * size, args.rays))
            view, u, v = pixel_coords(ids, size, size)
            times = {}
            for name, maps in (("raw", raw), ("windows", windows)):
                maps.sample(view, u, v)
                t0 = time.perf_counter()
                for _ in range(args.repeats):
                    maps.sample(view, u, v)
                times[name] = (time.perf_counter() - t0) / args.repeats * 1000
            print(f"{size} px, K = {coef.shape[2]}: raw {times['raw']:.1f} ms, windows {times['windows']:.1f} ms "
                  f"({times['windows'] / times['raw']:.1f}x) for {args.rays} rays")


if __name__ == "__main__":
    main()
