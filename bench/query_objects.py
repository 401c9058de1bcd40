"""Patch and click queries per object on a generated scene: 3D query IoU on held-out views, field vs teacher.

For every object (and the ground) a box (its largest inscribed square, or its full bounding box with
--box bbox) and a click (the pixel deepest inside it) are taken from the training view where the object is
most visible. Each becomes a query (automatic negatives from clustering the scene's features) whose hard
mask (p > threshold on opaque pixels) on each held-out view is scored against the ground-truth ids:
  field    the run's rendered, decoded features (3D)
  teacher  the same box or click on the teacher's own 2D maps, with negatives clustered from its maps
Printed as a table and merged into bench/results/query_objects.json under --label.

    python bench/query_objects.py --run RUN [--scene SCENE --teacher dinov2 --iterations 1500] [--label seed0]
    python bench/query_objects.py --run RUN --sweep        # the settings grid used to pick the defaults

Without an existing RUN, --scene trains one there first (features jointly with the radiance field).
"""

from __future__ import annotations

import argparse
import itertools
import json
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from dfield.query.context import context
from dfield.query.evaluation import format_object_table, query_iou_per_object
from dfield.query.spec import QuerySpec

SWEEP = {"clusters": (8, 16, 24), "claim": (0.7, 0.8, 0.9), "temperature": (0.05, 0.1, 0.2),
         "threshold": (0.3, 0.5, 0.7)}


def train_run(scene: Path, run: Path, teacher: str, iterations: int, batch_rays: int) -> None:
    from dfield.app import api
    from dfield.config import TrainConfig

    cfg = TrainConfig(iterations=iterations, batch_rays=batch_rays, threads=torch.get_num_threads())
    cfg.data.path = scene
    cfg.features.teacher = teacher
    api.train(cfg, run, evaluate=False, progress=False)


def record(out: Path, key: str, value) -> None:
    """Store `value` under `key` in the JSON results file `out`, keeping the other keys (runs and settings add up)."""
    results = json.loads(out.read_text()) if out.is_file() else {}
    results[key] = value
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(results, indent=1))
    print(f"wrote {out}")


def sweep(ctx, box: str) -> list[dict]:
    """Mean IoU of the field's queries for every combination of SWEEP (the renders are cached after the first)."""
    rows = []
    keys = list(SWEEP)
    for values in itertools.product(*SWEEP.values()):
        settings = dict(zip(keys, values))
        res = query_iou_per_object(ctx, box=box, teacher=False, **settings)
        rows.append({**settings, **res["mean"]})
        print(" ".join(f"{k}={v}" for k, v in settings.items()),
              f"field_patch={res['mean']['field_patch']:.3f} field_click={res['mean']['field_click']:.3f}", flush=True)
    return rows


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--run", type=Path, required=True, help="a run with a feature field on a generated scene")
    ap.add_argument("--scene", type=Path, help="train RUN on this generated scene first if it does not exist")
    ap.add_argument("--teacher", default="dinov2")
    ap.add_argument("--iterations", type=int, default=1500)
    ap.add_argument("--batch-rays", type=int, default=2048,
                    help="rays per step (2048: the README table's protocol, as the demo; the library default is 1024 "
                         "x 4500 steps since 8c003e4, which halved what 1500 steps of this bench train on)")
    ap.add_argument("--box", choices=("interior", "bbox"), default="interior")
    ap.add_argument("--label", default=None, help="key in the results file (default: the run folder)")
    ap.add_argument("--sweep", action="store_true", help="search the settings grid on this run instead")
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--out", type=Path, default=Path(__file__).resolve().parent / "results" / "query_objects.json")
    for name in ("temperature", "threshold", "claim", "click_radius"):
        ap.add_argument(f"--{name.replace('_', '-')}", type=float, default=getattr(QuerySpec, name))
    for name in ("clusters", "auto_views"):
        ap.add_argument(f"--{name.replace('_', '-')}", type=int, default=getattr(QuerySpec, name))
    args = ap.parse_args()
    torch.set_num_threads(args.threads)

    if not (args.run / "config.json").is_file():
        if args.scene is None:
            ap.error(f"{args.run} is not a run; give --scene to train one")
        train_run(args.scene, args.run, args.teacher, args.iterations, args.batch_rays)
    ctx = context(args.run)
    label = args.label or str(args.run)
    t0 = time.perf_counter()
    if args.sweep:
        record(args.out, f"{label}/sweep/{args.box}", sweep(ctx, args.box))
    else:
        settings = {k: getattr(args, k) for k in ("temperature", "threshold", "claim", "clusters", "auto_views",
                                                   "click_radius")}
        res = query_iou_per_object(ctx, box=args.box, **settings)
        res.update(run=str(args.run), teacher=ctx.run.cfg.features.teacher, step=ctx.run.step,
                   renders=ctx.cache.renders)
        print(f"\n{label}: {res['views']} held-out views, teacher {res['teacher']}, box {args.box}, "
              f"{ctx.cache.renders} views rendered ({time.perf_counter() - t0:.0f} s)")
        print(format_object_table(res))
        record(args.out, f"{label}/{args.box}", res)


if __name__ == "__main__":
    main()
