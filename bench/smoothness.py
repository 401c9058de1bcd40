"""Feature smoothing ablation: one radiance field, then the same teacher distilled with each way of smoothing the
targets, scored by per-object 3D selections, 2D queries and segmentation on held-out views of a generated scene.

    .venv/bin/python bench/smoothness.py [--scene DIR | --seed 0 [--shared-colors 1]] [--teacher dinov2]
        [--variants raw felzenszwalb ...] [--no-selections]

The radiance field is trained once per scene (no features; `--base-iterations`, kept in --work), then for each
variant a copy of that run gets `dfield distill --method fit` (features second, the paper's order; masks on the
field's renders) with:

    raw           the teacher's maps as they are
    felzenszwalb  segment blur, offline Felzenszwalb regions merged by colour, depth and teacher features
    litemedsam    segment blur, LiteMedSAM masks
    gt            segment blur, the true object ids (the upper bound of segment smoothing)
    tv            8 x 8 patches with total variation 0.05 on the rendered features
    bilateral     RGB-guided joint bilateral filter of the targets
    felzenszwalb+tv, gt+tv, ...     the combinations
    *-mean        the same regions, each replaced by its mean feature (--smooth-mode mean)
    felzenszwalb-shade[-mean]       regions merged with lightness down-weighted (shaded faces join their object)
    tv-light        TV 0.005

Scores, per object and as means over the objects (ground excluded):
  3D patch / click  IoU of the 3D selection `dfield edit` makes from a box / a click on the training view that shows
                    the object largest (bench/selection_objects.py), rendered on the held-out views
  boundary F        of the 3D click selections' masks (object boundaries within 2 px)
  2D patch / click  IoU of the query masks on the held-out views (bench/query_objects.py)
  mIoU              every held-out pixel labelled with the object whose prototype (mean decoded field feature over
                    the object in its prompt view) is nearest (cosine from the prototypes' mean), empty pixels as
                    background, against the true ids
  seg. boundary F   boundary F of that segmentation, per object over the held-out views (within 2 px), ground excluded
plus seconds of distillation (masks and smoothing included) and its peak RSS. Rows merge into --out (JSON).
"""

from __future__ import annotations

import argparse
import json
import shutil
import sys
import time
from pathlib import Path

import torch
import torch.nn.functional as F

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
sys.path.insert(0, str(Path(__file__).resolve().parent))  # selection_objects.py beside this script

from selection_objects import GROUND, selection_iou_per_object

from dfield.app import api
from dfield.config import TrainConfig
from dfield.core.metrics import boundary_f, miou
from dfield.data.generate import SceneSpec, generate_scene
from dfield.features.distill import distill
from dfield.query.context import context
from dfield.query.evaluation import format_object_table, object_prompt, query_iou_per_object
from dfield.query.spec import OPAQUE

REPO = Path(__file__).resolve().parents[1]
TV = {"patch": 8, "tv": 0.05}
# Tuned on seed 0's renders with bench/segment_speed.py (completeness and purity of the regions against the true ids).
FELZ_TUNED = "segments:felzenszwalb:lightness=0.3,colour=15"


def _v(**settings) -> dict:
    """A variant: raw targets and random rays unless it says otherwise (whatever distill's defaults are)."""
    return {"smooth": "none", "patch": 0, "tv": 0.0, **settings}


VARIANTS = {
    "raw": _v(),
    "felzenszwalb": _v(smooth="segments:felzenszwalb"),
    "felzenszwalb-tuned": _v(smooth=FELZ_TUNED),
    "litemedsam": _v(smooth="segments:litemedsam"),
    "gt": _v(smooth="segments:gt"),
    "tv": _v(**TV),
    "bilateral": _v(smooth="bilateral"),
    "felzenszwalb+tv": _v(smooth="segments:felzenszwalb", **TV),
    "felzenszwalb-tuned+tv": _v(smooth=FELZ_TUNED, **TV),
    "litemedsam+tv": _v(smooth="segments:litemedsam", **TV),
    "gt+tv": _v(smooth="segments:gt", **TV),
    "bilateral+tv": _v(smooth="bilateral", **TV),
    "bilateral-narrow": _v(smooth="bilateral:sigma_space=1.5"),
    "bilateral-sharp": _v(smooth="bilateral:sigma_color=0.05"),
    "bilateral-narrow-sharp": _v(smooth="bilateral:sigma_space=1.5,sigma_color=0.05"),
    "bilateral-sharper": _v(smooth="bilateral:sigma_color=0.03"),
    "felzenszwalb-mean": _v(smooth="segments:felzenszwalb", smooth_mode="mean"),
    "felzenszwalb-mean+tv": _v(smooth="segments:felzenszwalb", smooth_mode="mean", **TV),
    "felzenszwalb-shade": _v(smooth="segments:felzenszwalb:lightness=0.3"),
    "felzenszwalb-shade-mean": _v(smooth="segments:felzenszwalb:lightness=0.3", smooth_mode="mean"),
    "gt-mean": _v(smooth="segments:gt", smooth_mode="mean"),
    "tv-light": _v(patch=8, tv=0.005),
    "tv-strong": _v(patch=8, tv=0.2),
    "default": {},  # whatever `dfield distill` does without smoothing flags
}
DEFAULT_VARIANTS = ["raw", "felzenszwalb", "litemedsam", "gt", "tv", "bilateral", "felzenszwalb+tv"]


@torch.no_grad()
def prototype_miou(run, split: str = "test") -> dict:
    """Segmentation of the held-out views by nearest object prototype (module docstring): mIoU over the ids."""
    ctx = context(run)
    train, test = ctx.data("train"), ctx.data(split)
    protos, ids = [], []
    for obj in sorted(i for i in torch.unique(train.object_ids.long()).tolist() if i != 0):
        prompt = object_prompt(train.object_ids, obj)
        if prompt is None:
            continue
        r = ctx.train_view(prompt["view"])
        m = (train.object_ids[prompt["view"]] == obj) & (r.acc > OPAQUE)
        if m.any():
            protos.append(ctx.decode(r.feature[m]).mean(0))
            ids.append(obj)
    protos = torch.stack(protos)
    center = protos.mean(0)
    unit = F.normalize(protos - center, dim=-1)
    labels = torch.tensor(ids)
    pred = []
    for i in range(len(test)):
        r = ctx.render(test.cameras, i)
        lab = labels[(F.normalize(ctx.decode(r.feature) - center, dim=-1) @ unit.T).argmax(-1)]
        pred.append(torch.where(r.acc > OPAQUE, lab, torch.zeros_like(lab)))
    pred, gt = torch.stack(pred), test.object_ids.long()
    mean, per = miou(pred, gt)
    names = {int(k): v for k, v in train.object_names.items()}
    # Boundary F of the segmentation, per object (ground excluded, as in the selection scores), over all views.
    bf = {names.get(k, str(k)): boundary_f(pred == k, gt == k) for k in ids if k != GROUND}
    bf = {k: v for k, v in bf.items() if v is not None}
    return {"miou": mean, "per_object": {names.get(k, str(k)): v for k, v in per.items()},
            "boundary_f_segmentation": sum(bf.values()) / len(bf) if bf else None, "boundary_f_per_object": bf}


def score(run: Path, selections: bool) -> dict:
    """Every score of one distilled run (module docstring)."""
    res = query_iou_per_object(run, teacher=False)
    row = {"patch_iou_2d": res["mean"].get("field_patch"), "click_iou_2d": res["mean"].get("field_click"),
           "boundary_f_click_2d": res["mean"].get("boundary_f_click"), "queries_2d": res["objects"]}
    row.update(prototype_miou(run))
    print(format_object_table(res), flush=True)
    if selections:
        sel = selection_iou_per_object(run, every=1000)
        objs = [r for r in sel["objects"].values() if r["id"] != 1]
        mean = sel["mean"]["objects"]
        row.update(patch_iou=mean["patch_iou"], click_iou=mean["click_iou"],
                   min_click_iou=min(r["click_iou"] for r in objs), min_patch_iou=min(r["patch_iou"] for r in objs),
                   boundary_f_click=mean["click_boundary_f"], boundary_f_patch=mean["patch_boundary_f"],
                   objects={name: {k: r.get(k) for k in ("id", "patch_iou", "click_iou", "patch_boundary_f",
                                                        "click_boundary_f", "click_best_match")}
                            for name, r in sel["objects"].items()})
    return row


def print_table(entry: dict, scene, teacher: str, steps: int) -> None:
    rows = entry["rows"]
    print(f"\nscene {scene}, teacher {teacher}, {steps} distill steps on one radiance field")
    cols = [("3D patch", "patch_iou"), ("3D click", "click_iou"), ("min click", "min_click_iou"),
            ("bound. F", "boundary_f_click"), ("2D patch", "patch_iou_2d"), ("2D click", "click_iou_2d"),
            ("mIoU", "miou"), ("seg. bd F", "boundary_f_segmentation"), ("seconds", "seconds"), ("RSS GiB", "peak_rss_gib")]
    print(f"{'variant':<24}" + "".join(f"{c:>10}" for c, _ in cols))
    for name, r in rows.items():
        cells = []
        for _, k in cols:
            v = r.get(k)
            cells.append("-" if v is None else f"{v:.1f}" if k == "seconds" else f"{v:.3f}" if k != "peak_rss_gib"
                         else f"{v:.2f}")
        print(f"{name:<24}" + "".join(f"{c:>10}" for c in cells))
    names = sorted({o for r in rows.values() for o in r.get("objects", {})})
    if names:
        print("\n3D click IoU per object")
        print(f"{'variant':<24}" + "".join(f"{n[:11]:>12}" for n in names))
        for name, r in rows.items():
            objs = r.get("objects", {})
            print(f"{name:<24}" + "".join(f"{objs[n]['click_iou']:>12.3f}" if n in objs else f"{'-':>12}" for n in names))


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
    ap.add_argument("--no-selections", dest="selections", action="store_false",
                    help="skip the 3D selections (bench/selection_objects.py; about a minute per variant)")
    ap.add_argument("--keep", action="store_true", help="keep each variant's run folder (default: only the base)")
    ap.add_argument("--rescore", action="store_true",
                    help="score the variants' kept run folders again (after a change to the queries) without "
                         "distilling; their seconds and memory stay the old row's")
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
        t0 = time.perf_counter()
        cfg = TrainConfig(iterations=args.base_iterations, threads=args.threads)
        cfg.data.path = Path(scene)
        api.train(cfg, base, evaluate=False, progress=False)
        print(f"radiance field: {time.perf_counter() - t0:.0f} s", flush=True)
    old = json.loads(args.out.read_text()) if args.out.is_file() else {}
    entry = old.setdefault(f"{label}:{args.teacher}", {"scene": str(scene), "rows": {}})
    for name in args.variants:
        run = work / name
        if args.rescore:
            if not (run / "distill.json").is_file():
                print(f"== {name}: no kept run at {run} (distil it with --keep first); skipped", flush=True)
                continue
            row = {k: v for k, v in entry["rows"].get(name, {}).items()
                   if k in ("settings", "seconds", "smooth_seconds", "peak_rss_gib", "distill_iterations")}
            row.update(score(run, args.selections), rescored=time.strftime("%Y-%m-%d"))
        else:
            shutil.rmtree(run, ignore_errors=True)
            shutil.copytree(base, run)
            t0 = time.perf_counter()
            d = distill(run, args.teacher, method="fit", iterations=args.distill_iterations, threads=args.threads,
                        **VARIANTS[name])
            seconds = time.perf_counter() - t0
            print(f"== {name}: distilled in {seconds:.0f} s", flush=True)
            row = {"settings": VARIANTS[name], "seconds": seconds, "smooth_seconds": d.summary["smooth_seconds"],
                   "peak_rss_gib": d.summary["peak_rss_bytes"] / 2**30, "distill_iterations": args.distill_iterations}
            row.update(score(run, args.selections))
        entry["rows"][name] = row  # variants run earlier on the same scene stay in the table
        args.out.parent.mkdir(parents=True, exist_ok=True)
        args.out.write_text(json.dumps(old, indent=1))  # after every variant: a kill loses one at most
        if not (args.keep or args.rescore):
            shutil.rmtree(run, ignore_errors=True)
    print_table(entry, scene, args.teacher, args.distill_iterations)
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
