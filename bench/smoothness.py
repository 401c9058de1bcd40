"""Feature smoothing ablation: one radiance field, then the same teacher distilled with each way of smoothing the
targets, scored by per-object patch and click queries on held-out views of a generated scene.

    .venv/bin/python bench/smoothness.py [--scene DIR | --seed 0] [--teacher dinov2] [--variants raw felzenszwalb ...]

The radiance field is trained once (no features; `--base-iterations`), then for each variant a copy of that run
gets `dfield distill --method fit` (features second, the paper's order; masks on the field's renders) with:

    raw           the teacher's maps as they are
    felzenszwalb  segment blur, offline Felzenszwalb regions merged by colour, depth and teacher features
    litemedsam    segment blur, LiteMedSAM masks
    gt            segment blur, the true object ids (the upper bound of segment smoothing)
    tv            8 x 8 patches with total variation 0.05 on the rendered features
    bilateral     RGB-guided joint bilateral filter of the targets
    felzenszwalb+tv
    felzenszwalb-mean, gt-mean      the same regions, each replaced by its mean feature (--smooth-mode mean)
    felzenszwalb-shade[-mean]       regions merged with lightness down-weighted (shaded faces join their object)
    tv-light        TV 0.005

Columns: mean patch / click 3D IoU over the objects (ground excluded), the lowest click IoU, the field click
masks' boundary F (2 px), seconds of distillation (masks and smoothing included) and peak RSS. Written to --out.
"""

from __future__ import annotations

import argparse
import json
import shutil
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
sys.path.insert(0, str(Path(__file__).resolve().parent))  # selection_objects.py beside this script

from selection_objects import selection_iou_per_object

from dfield.app import api
from dfield.config import TrainConfig
from dfield.data.generate import SceneSpec, generate_scene
from dfield.features.distill import distill
from dfield.query.evaluation import format_object_table, query_iou_per_object

REPO = Path(__file__).resolve().parents[1]
VARIANTS = {
    "raw": {},
    "felzenszwalb": {"smooth": "segments:felzenszwalb"},
    "litemedsam": {"smooth": "segments:litemedsam"},
    "gt": {"smooth": "segments:gt"},
    "tv": {"patch": 8, "tv": 0.05},
    "bilateral": {"smooth": "bilateral"},
    "felzenszwalb+tv": {"smooth": "segments:felzenszwalb", "patch": 8, "tv": 0.05},
    "felzenszwalb-mean": {"smooth": "segments:felzenszwalb", "smooth_mode": "mean"},
    "felzenszwalb-shade": {"smooth": "segments:felzenszwalb:lightness=0.3"},
    "felzenszwalb-shade-mean": {"smooth": "segments:felzenszwalb:lightness=0.3", "smooth_mode": "mean"},
    "gt-mean": {"smooth": "segments:gt", "smooth_mode": "mean"},
    "tv-light": {"patch": 8, "tv": 0.005},
}
DEFAULT_VARIANTS = ["raw", "felzenszwalb", "litemedsam", "gt", "tv", "bilateral", "felzenszwalb+tv"]


def main(argv=None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--scene", type=Path, default=None, help="a generated scene (default: generate one with --seed)")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--shared-colors", type=int, default=0,
                    help="generated scene: this many objects share the first one's colour")
    ap.add_argument("--work", type=Path, default=Path("/tmp/dfield_smoothness"), help="runs are kept here")
    ap.add_argument("--teacher", default="dinov2")
    ap.add_argument("--variants", nargs="+", default=DEFAULT_VARIANTS, choices=list(VARIANTS))
    ap.add_argument("--base-iterations", type=int, default=3000)
    ap.add_argument("--distill-iterations", type=int, default=1000)
    ap.add_argument("--selections", action="store_true",
                    help="also score the 3D selections `dfield edit` makes from the same box and click "
                         "(bench/selection_objects.py; a few minutes per variant)")
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--out", type=Path, default=REPO / "bench/results/smoothness.json")
    args = ap.parse_args(argv)
    torch.set_num_threads(args.threads)
    label = f"seed{args.seed}" + (f"-shared{args.shared_colors}" if args.shared_colors else "")
    work = args.work / label
    scene = args.scene or work / "scene"
    if not (Path(scene) / "transforms_train.json").is_file():
        generate_scene(scene, SceneSpec(seed=args.seed, shared_colors=args.shared_colors))
    base = work / "base"
    if not (base / "checkpoints").is_dir():
        cfg = TrainConfig(iterations=args.base_iterations, threads=args.threads)
        cfg.data.path = Path(scene)
        api.train(cfg, base, evaluate=False, progress=False)
    rows = {}
    for name in args.variants:
        run = work / name
        shutil.rmtree(run, ignore_errors=True)
        shutil.copytree(base, run)
        t0 = time.perf_counter()
        d = distill(run, args.teacher, method="fit", iterations=args.distill_iterations, threads=args.threads,
                    **VARIANTS[name])
        seconds = time.perf_counter() - t0
        res = query_iou_per_object(run, teacher=False)
        objs = [r for r in res["objects"].values() if r["id"] != 1]
        clicks = [r["field_click"] for r in objs]
        rows[name] = {"settings": VARIANTS[name], "patch_iou": res["mean"].get("field_patch"),
                      "click_iou": res["mean"].get("field_click"), "min_click_iou": min(clicks) if clicks else None,
                      "boundary_f_click": res["mean"].get("boundary_f_click"),
                      "boundary_f_patch": res["mean"].get("boundary_f_patch"), "seconds": seconds,
                      "smooth_seconds": d.summary["smooth_seconds"], "peak_rss_gib": d.summary["peak_rss_bytes"] / 2**30,
                      "objects": res["objects"]}
        if args.selections:
            sel = selection_iou_per_object(run, every=1000)
            clicks3d = [r["click_iou"] for r in sel["objects"].values() if r["id"] != 1]
            rows[name].update(sel_patch_iou=sel["mean"]["objects"]["patch_iou"],
                              sel_click_iou=sel["mean"]["objects"]["click_iou"],
                              sel_min_click_iou=min(clicks3d) if clicks3d else None, selections=sel["objects"])
        print(f"== {name}\n{format_object_table(res)}", flush=True)
    old = json.loads(args.out.read_text()) if args.out.is_file() else {}
    entry = old.setdefault(f"{label}:{args.teacher}", {"scene": str(scene), "rows": {}})
    entry["rows"].update(rows)  # variants run earlier on the same scene stay in the table
    rows = entry["rows"]
    print(f"\nscene {scene}, teacher {args.teacher}, {args.distill_iterations} distill steps on one radiance field")
    print(f"{'variant':<25}{'patch IoU':>10}{'click IoU':>10}{'min click':>10}{'bound. F':>10}{'3D patch':>10}"
          f"{'3D click':>10}{'3D min':>8}{'seconds':>9}{'RSS GiB':>9}")
    f3 = lambda v: f"{v:.3f}" if isinstance(v, (int, float)) else "-"  # noqa: E731
    for name, r in rows.items():
        print(f"{name:<25}{r['patch_iou']:>10.3f}{r['click_iou']:>10.3f}{r['min_click_iou']:>10.3f}"
              f"{r['boundary_f_click'] or 0:>10.3f}{f3(r.get('sel_patch_iou')):>10}{f3(r.get('sel_click_iou')):>10}"
              f"{f3(r.get('sel_min_click_iou')):>8}{r['seconds']:>9.1f}{r['peak_rss_gib']:>9.2f}")
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(old, indent=1))
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
