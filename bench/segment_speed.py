"""Seconds to segment a scene's training views, per segmenter, and how well the regions follow the objects.

    .venv/bin/python bench/segment_speed.py /tmp/gen200 [--segmenters felzenszwalb litemedsam] [--views 100]
        [--teacher dinov2] [--run RUN]

Each segmenter runs on the photos into an empty temporary mask cache (so nothing is cached yet), with the
teacher's maps (when --teacher is given, computed into the usual teacher cache first, not timed) for the
segmenters that read features. On generated scenes the regions are scored against the ground-truth ids:
purity (fraction of masked pixels whose region's majority id is their own), completeness (the share of each
object, per view, in its largest region: 1 when no object is cut apart), coverage (masked fraction) and regions
per view. With --run the views are the run's renders (rgb and depth), as `dfield distill --smooth` segments them. Written to --out as JSON.
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from dfield.data.load import load_dataset
from dfield.features.segmenters import cached_segments, make_segmenter
from dfield.features.targets import render_views
from dfield.features.teachers import cached_features, feature_cache_dir, make_teacher
from dfield.io.run import open_run

REPO = Path(__file__).resolve().parents[1]


def region_scores(labels: np.ndarray, ids: np.ndarray) -> dict:
    """Purity, coverage and regions/view of label maps (N, H, W) against true ids (N, H, W)."""
    pure = masked = regions = 0
    for lab, gt in zip(labels, ids):
        for k in range(1, int(lab.max()) + 1):
            inside = gt[lab == k]
            if inside.size:
                pure += np.bincount(inside).max()
                masked += inside.size
                regions += 1
    # Completeness: how much of each object (per view) its largest region holds; 1 when no object is cut apart.
    whole = []
    for lab, gt in zip(labels, ids):
        for obj in np.unique(gt[gt > 1]):
            inside = lab[gt == obj]
            inside = inside[inside > 0]
            whole.append(np.bincount(inside).max() / (gt == obj).sum() if inside.size else 0.0)
    return {"purity": pure / max(masked, 1), "coverage": masked / labels.size, "regions_per_view": regions / len(labels),
            "completeness": float(np.mean(whole)) if whole else None}


def main(argv=None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("scene", type=Path)
    ap.add_argument("--segmenters", nargs="+", default=["felzenszwalb", "litemedsam"])
    ap.add_argument("--views", type=int, default=100, help="first N training views")
    ap.add_argument("--teacher", default="", help="teacher whose maps the feature-reading segmenters get")
    ap.add_argument("--run", type=Path, default=None,
                    help="segment this trained run's renders of the views (with their depth), as distillation does")
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--out", type=Path, default=REPO / "bench/results/segment_speed.json")
    args = ap.parse_args(argv)
    torch.set_num_threads(args.threads)
    data = load_dataset(args.scene, "train")
    data = data.subset(torch.arange(min(args.views, len(data))))
    images, depths = data.images.numpy(), None
    if args.run is not None:
        renders = render_views(open_run(args.run).model, data)
        images, depths = renders["rgb"], renders["depth"]
    maps = cached_features(make_teacher(args.teacher), data, feature_cache_dir()) if args.teacher else None
    rows = []
    for spec in args.segmenters:
        seg = make_segmenter(spec)
        with tempfile.TemporaryDirectory() as cache:
            t0 = time.perf_counter()
            labels = cached_segments(seg, images, Path(cache), depths=depths, features=maps, object_ids=data.object_ids,
                                     paths=[str(p) for p in data.image_paths])
            seconds = time.perf_counter() - t0
            row = {"segmenter": seg.name, "views": len(images), "size": list(images.shape[1:3]), "seconds": seconds}
            if data.object_ids is not None:
                row.update(region_scores(np.asarray(labels), data.object_ids.numpy()))
        rows.append(row)
        print(f"{spec:14s} {len(images)} views {images.shape[2]}x{images.shape[1]}: {seconds:7.1f} s"
              + ("" if "purity" not in row else
                 f"  purity {row['purity']:.3f}  completeness {row['completeness']:.3f}  coverage {row['coverage']:.3f}"
                 f"  regions/view {row['regions_per_view']:.1f}"),
              flush=True)
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps({"scene": str(args.scene), "teacher": args.teacher, "rows": rows}, indent=1))
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
