"""Patch and click selections per object on a generated scene: the 3D counterpart of query_objects.py.

For every object (and the ground) the same box and click as query_objects.py (dfield.query.evaluation.object_prompt:
the training view where the object is most visible, its largest inscribed square and the pixel deepest
inside it) become a 3D selection exactly as `dfield edit` makes one (dfield.edit.build.make_selection, default
settings). Each selection is rendered as a channel of the unedited field on every held-out view (what
`dfield edit` scores: region = rendered selection > 0.5) and scored by IoU against the object's ground-truth
ids, pooled over the views. The patch selection is also deleted (dfield.edit.build.build_edited) and the edit's
locality PSNR (outside the touched pixels, minimum over views, 'inf' when identical) is measured on every
--every-th view. With --2d the 2D query masks of query_objects.py are scored beside them (cached renders).
Printed as a table and merged into bench/results/selection_objects.json under --label.

    python bench/selection_objects.py --run RUN [--label seed0] [--every 4] [--2d] [--images DIR]
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from query_objects import record  # bench/ is on the path when a bench script runs

from dfield.core.image_rendering import ndc_of
from dfield.core.metrics import boundary_f, iou
from dfield.core.rays import camera_image_rays
from dfield.core.rendering import render_field
from dfield.edit.build import build_edited, make_selection
from dfield.edit.locality import best_object, json_number, locality, object_overlaps, render_pair
from dfield.edit.spec import parse_select, parse_spec
from dfield.errors import EditError, QueryError
from dfield.query.context import context
from dfield.query.evaluation import object_prompt, query_iou_per_object

GROUND = 1  # generated scenes: id 1 is the ground disk (dfield.query.evaluation.mean_scores leaves it out the same way)
COLUMNS = ("patch_iou", "click_iou", "delete_locality_psnr")


@torch.no_grad()
def selection_channels(run, cameras, i: int, selections: dict, chunk: int = 8192) -> dict[str, torch.Tensor]:
    """Each selection seen from camera i on the unedited field: the base render of render_pair, with only the
    selection channels (one march for all of them)."""
    base = run.model
    rays = camera_image_rays(cameras, i, ndc_of(run.scene))
    channels = {k: s.mask for k, s in selections.items()}
    outs = [render_field(base.as_field(), rays[s : s + chunk], base.render_settings(), channels=channels)
            for s in range(0, len(rays), chunk)]
    h, w = cameras.height, cameras.width
    res = {k: torch.cat([o[k] for o in outs]).reshape(h, w) for k in channels}
    res["rgb"] = torch.cat([o["rgb"] for o in outs]).reshape(h, w, 3)
    return res


def select(run, where: str, value: list) -> tuple:
    """A selection as `dfield edit` builds it from a spec entry; a failure (a click on empty space, an empty
    selection) is reported and scores 0 (as query_iou_per_object scores a failed query)."""
    t0 = time.perf_counter()
    sel = parse_select(where, {where: value})
    try:
        return make_selection(sel, run, run.model.as_field(decoded=True), run.model.step), None, time.perf_counter() - t0
    except (EditError, QueryError) as e:
        return None, str(e), time.perf_counter() - t0


def object_row(run, obj: int, prompt: dict, test, every: int, names: dict, images: Path | None) -> dict:
    gt = test.object_ids.long()
    row = {"id": obj, **prompt, "test_pixels": int((gt == obj).sum())}
    t0 = time.perf_counter()
    patch = [prompt["view"], *prompt["box"]]
    edited, err = None, None
    try:  # the delete builds the patch selection itself, exactly as `dfield edit` would
        edited = build_edited(run, parse_spec({"edits": [{"op": "delete", "select": {"patch": patch}}]}))
    except (EditError, QueryError) as e:
        err = str(e)
    row["select_patch_seconds"] = time.perf_counter() - t0
    sels = {}
    if edited is not None:
        sels["patch"] = edited.layers[0].selection
    else:
        row.setdefault("errors", []).append(f"patch: {err}")
    click, err, row["select_click_seconds"] = select(run, "click", [prompt["view"], *prompt["click"]])
    if click is not None:
        sels["click"] = click
    else:
        row.setdefault("errors", []).append(f"click: {err}")
    for k, s in sels.items():
        row[f"{k}_voxels"] = s.voxel_count()

    t1 = time.perf_counter()
    regions = {k: [] for k in sels}
    overlaps = {k: {} for k in sels}
    psnrs, shown = [], []
    for i in range(len(test)):
        ch = selection_channels(run, test.cameras, i, sels) if sels else {}
        for k in sels:
            region = ch[k] > 0.5
            regions[k].append(region)
            object_overlaps(region, gt[i], overlaps[k])
        if edited is not None and i % every == 0:
            pair = render_pair(edited, test.cameras, i, ndc_of(run.scene))
            psnrs.append(locality(pair)["psnr_outside"])
            if images is not None and len(shown) < 4:
                shown.append((ch.get("rgb"), gt[i] == obj, regions.get("patch", [None])[-1],
                               regions["click"][-1] if "click" in regions else None, pair["rgb"]))
    for k in ("patch", "click"):
        row[f"{k}_iou"] = iou(torch.stack(regions[k]), gt == obj) if k in sels else 0.0
        row[f"{k}_boundary_f"] = boundary_f(torch.stack(regions[k]), gt == obj) if k in sels else 0.0
        if k in sels:
            row[f"{k}_best_match"] = best_object(overlaps[k], names)
    finite = [p for p in psnrs if p != float("inf")]
    row["delete_locality_psnr"] = json_number(min(finite) if finite else float("inf")) if psnrs else None
    row["locality_views"] = len(psnrs)
    row["render_seconds"] = time.perf_counter() - t1
    row["seconds"] = time.perf_counter() - t0
    if images is not None and shown:
        save_sheet(images / f"{names.get(str(obj), obj)}.png".replace(" ", "_"), shown)
    return row


def save_sheet(path: Path, shown: list) -> None:
    """Rows of held-out views: render, ground truth (green) vs patch selection (magenta), vs click, after delete."""
    from dfield.io.export import save_png

    def overlay(rgb, gt, region):
        out = rgb.clamp(0, 1).clone() * 0.5 + 0.25
        if region is None:
            return out
        out[gt & region] = torch.tensor([1.0, 1.0, 1.0])
        out[gt & ~region] = torch.tensor([0.1, 0.8, 0.1])  # missed
        out[~gt & region] = torch.tensor([0.9, 0.1, 0.8])  # selected, not the object
        return out

    rows = [torch.cat([rgb.clamp(0, 1), overlay(rgb, gt, p), overlay(rgb, gt, c), edited.clamp(0, 1)], 1)
            for rgb, gt, p, c, edited in shown]
    save_png(path, torch.cat(rows, 0))


def summarize(objects: dict) -> dict:
    """Means of the IoUs and seconds over the objects, without and with the ground; locality as the worst
    (lowest) PSNR over the objects, since one leaking edit is what matters."""
    out = {}
    for label, rows in (("objects", [r for r in objects.values() if r["id"] != GROUND]), ("all", list(objects.values()))):
        m = {}
        for c in ("patch_iou", "click_iou", "patch_boundary_f", "click_boundary_f", "field_patch", "field_click",
                  "seconds"):
            vals = [r[c] for r in rows if r.get(c) is not None]
            m[c] = float(np.mean(vals)) if vals else None
        loc = [float(r["delete_locality_psnr"]) for r in rows if r.get("delete_locality_psnr") is not None]
        m["delete_locality_psnr"] = json_number(min(loc)) if loc else None
        out[label] = m
    return out


def format_table(res: dict) -> str:
    has2d = any("field_patch" in r for r in res["objects"].values())
    head = ["3D patch", "3D click"] + (["2D patch", "2D click"] if has2d else []) + ["delete loc dB", "seconds"]
    lines = [f"{'object':<18}" + "".join(f"{h:>14}" for h in head)]

    def cells(r, locality_label=None):
        vals = [_fmt(r.get("patch_iou")), _fmt(r.get("click_iou"))]
        if has2d:
            vals += [_fmt(r.get("field_patch")), _fmt(r.get("field_click"))]
        loc = r.get("delete_locality_psnr")
        vals += [("-" if loc is None else loc if isinstance(loc, str) else f"{loc:.1f}") + (locality_label or ""),
                 f"{r['seconds']:.0f}" if r.get("seconds") is not None else "-"]
        return "".join(f"{v:>14}" for v in vals)

    for name, r in res["objects"].items():
        lines.append(f"{name:<18}" + cells(r))
    lines.append(f"{'mean (objects)':<18}" + cells(res["mean"]["objects"], " min"))
    lines.append(f"{'mean (+ground)':<18}" + cells(res["mean"]["all"], " min"))
    return "\n".join(lines)


def _fmt(v) -> str:
    return "-" if v is None else f"{v:.3f}"


def selection_iou_per_object(run, every: int = 1, with_2d: bool = False, images: Path | None = None,
                             box: str = "interior") -> dict:
    ctx = context(run)
    run = ctx.run
    train, test = ctx.data("train"), ctx.data("test")
    if train.object_ids is None or test.object_ids is None:
        raise SystemExit(f"{run.cfg.data.path}: no ground-truth object ids; this benchmark needs a generated scene")
    names = run.scene.object_names
    t0 = time.perf_counter()
    objects = {}
    for obj in sorted(i for i in torch.unique(train.object_ids.long()).tolist() if i != 0):
        prompt = object_prompt(train.object_ids, obj, box)
        if prompt is None:
            continue
        name = names.get(str(obj), str(obj))
        objects[name] = object_row(run, obj, prompt, test, every, names, images)
        print(f"  {name}: 3D patch {objects[name]['patch_iou']:.3f}, click {objects[name]['click_iou']:.3f} "
              f"({objects[name]['seconds']:.0f} s)", flush=True)
    if with_2d:
        q = query_iou_per_object(ctx, box=box, teacher=False)
        for name, r in q["objects"].items():
            if name in objects:
                objects[name].update(field_patch=r.get("field_patch"), field_click=r.get("field_click"))
    return {"objects": objects, "mean": summarize(objects), "box": box, "views": len(test), "every": every,
            "run": str(run.path), "teacher": run.cfg.features.teacher, "step": run.step,
            "seconds": time.perf_counter() - t0}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--run", type=Path, required=True, help="a trained run with a feature field on a generated scene")
    ap.add_argument("--label", default=None, help="key in the results file (default: the run folder)")
    ap.add_argument("--every", type=int, default=1, help="measure delete locality on every N-th held-out view")
    ap.add_argument("--2d", dest="with_2d", action="store_true", help="also score the 2D query masks (query_objects.py)")
    ap.add_argument("--box", choices=("interior", "bbox"), default="interior")
    ap.add_argument("--images", type=Path, default=None, help="write one picture per object here (4 views)")
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--out", type=Path, default=Path(__file__).resolve().parent / "results" / "selection_objects.json")
    args = ap.parse_args()
    torch.set_num_threads(args.threads)

    label = args.label or str(args.run)
    res = selection_iou_per_object(args.run, args.every, args.with_2d, args.images, args.box)
    print(f"\n{label}: {res['views']} held-out views (locality on every {args.every}), teacher {res['teacher']}, "
          f"box {args.box}, {res['seconds']:.0f} s (1 thread; seconds are noisy on a shared machine)")
    print(format_table(res))
    record(args.out, f"{label}/{args.box}", res)


if __name__ == "__main__":
    main()
