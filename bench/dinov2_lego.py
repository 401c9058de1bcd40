"""DINOv2 teacher on a real scene: how long caching takes, and whether distilled features are view-consistent.

1. Times `cached_features` for every training view with the DINOv2 ONNX teacher (first run: computed;
   second run: read back from the cache).
2. With --run RUN (a trained radiance field of the same scene), adds a feature field (features second),
   fits it, and saves a figure of PCA-coloured feature renders of several test views, one PCA for all.

    python bench/dinov2_lego.py DATA --downscale 4 [--run RUN] [--out bench/results/dinov2_lego]
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from dfield.data import load_dataset
from dfield.features.teachers import cached_features, make_teacher


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("data", type=Path, nargs="?", default=Path(__file__).resolve().parents[2] / "shared/data/blender_lego_400")
    ap.add_argument("--downscale", type=float, default=4)
    ap.add_argument("--teacher", default="dinov2:block=7,input_size=518")
    ap.add_argument("--run", type=Path)
    ap.add_argument("--fit-iterations", type=int, default=600)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--out", type=Path, default=Path(__file__).resolve().parent / "results" / "dinov2_lego")
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    args.out.mkdir(parents=True, exist_ok=True)
    data = load_dataset(args.data, "train", args.downscale)
    teacher = make_teacher(args.teacher)
    cache = args.out / "cache"  # a private cache so the first pass really computes
    t0 = time.perf_counter()
    maps = cached_features(teacher, data, cache)
    first = time.perf_counter() - t0
    t0 = time.perf_counter()
    cached_features(teacher, data, cache)
    second = time.perf_counter() - t0
    result = {"teacher": teacher.name, "views": len(data), "image_size": [data.width, data.height],
              "map_shape": list(maps.maps.shape), "cache_seconds_first": first, "cache_seconds_reuse": second}
    print(f"{teacher.name}: {len(data)} views -> maps {tuple(maps.maps.shape)}; computed in {first:.1f} s, reused in {second:.2f} s")

    if args.run is not None:
        from dfield.core.image_rendering import render_image
        from dfield.features.fitting import fit_features
        from dfield.features.pca import FeaturePCA
        from dfield.io.export import save_png
        from dfield.io.run import load_eval_data, open_run

        r = open_run(args.run)
        r.model.add_feature_field(64, teacher.dim)
        fit = fit_features(r.model, data, maps, iterations=args.fit_iterations)
        r.model.eval()
        test = load_eval_data(r.cfg)
        views = list(range(0, len(test), max(1, len(test) // 4)))[:4]
        renders = [render_image(r.model, test.cameras, i, features=True) for i in views]
        pca = FeaturePCA(torch.cat([o["feature"][o["acc"] > 0.5] for o in renders]))
        tiles = []  # per test view, top to bottom: ground truth, rendered colour, rendered features (PCA)
        for o, i in zip(renders, views):
            rgb = pca(o["feature"]) * o["acc"][..., None] + (1 - o["acc"][..., None])
            tiles.append(torch.cat([test.images[i].float() / 255, o["rgb"], rgb], 0))
        save_png(args.out / "pca_views.png", torch.cat(tiles, 1))
        result.update({"fit_seconds": fit["seconds"], "fit_loss": fit["loss"], "figure": str(args.out / "pca_views.png")})
        print(f"features fitted in {fit['seconds']:.1f} s (loss {fit['loss']:.4f}); figure {args.out / 'pca_views.png'}")
    (args.out / "result.json").write_text(json.dumps(result, indent=1))


if __name__ == "__main__":
    main()
