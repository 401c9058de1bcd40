"""Queries scored against ground truth on generated scenes: per object, a patch and a click from the training
view that shows it largest, IoU of the hard masks on held-out views, for the field and for the teacher's own maps."""

from __future__ import annotations

import time
from dataclasses import asdict

import numpy as np
import torch
import torch.nn.functional as F

from dfield.core.metrics import boundary_f, iou
from dfield.errors import QueryError
from dfield.features.segmentation import upsample_map
from dfield.query.builder import make_query
from dfield.query.clusters import MAX_CLUSTER_SAMPLES, auto_view_ids, contrast_query, subsample
from dfield.query.context import QueryContext, context
from dfield.query.relevance import relevance
from dfield.query.sets import QuerySet, click_embedding, patch_embedding
from dfield.query.spec import QuerySpec


def inscribed_square(mask: torch.Tensor) -> tuple[int, int, int]:
    """(x, y, r) of the pixel deepest inside `mask` (H, W) by chessboard distance: the square of half-width r-1
    around it lies entirely inside. Non-convex objects (a torus) get a box on the object, not on its hole."""
    depth = torch.zeros(mask.shape, dtype=torch.long)
    inside = mask.bool().clone()
    r = 0
    while inside.any():
        r += 1
        depth[inside] = r
        # Erode by one pixel (3x3); the image border counts as outside.
        eroded = -F.max_pool2d(-inside.float()[None, None], 3, stride=1, padding=1, ceil_mode=False)[0, 0]
        eroded[[0, -1], :] = 0
        eroded[:, [0, -1]] = 0
        inside = inside & (eroded > 0.5)
    if r == 0:
        raise QueryError("empty mask has no interior")
    flat = int(depth.reshape(-1).argmax())
    return flat % mask.shape[1], flat // mask.shape[1], int(depth.reshape(-1)[flat])


def object_prompt(ids: torch.Tensor, obj: int, box_mode: str = "interior") -> dict | None:
    """The training view where object `obj` is most visible (deepest interior), a box and a click on it there."""
    best = None
    for v in range(len(ids)):
        m = ids[v] == obj
        if m.sum() == 0:
            continue
        x, y, r = inscribed_square(m)
        if best is None or (r, int(m.sum())) > best[0]:
            best = ((r, int(m.sum())), v, x, y, m)
    if best is None:
        return None
    (r, _), v, x, y, m = best
    if box_mode == "interior":
        box = (x - r + 1, y - r + 1, x + r, y + r)
    elif box_mode == "bbox":
        ys, xs = torch.nonzero(m, as_tuple=True)
        box = (int(xs.min()), int(ys.min()), int(xs.max()) + 1, int(ys.max()) + 1)
    else:
        raise QueryError(f"box mode must be 'interior' or 'bbox', got {box_mode!r}")
    return {"view": v, "box": [int(b) for b in box], "click": [int(x), int(y)]}


def teacher_query(ctx: QueryContext, spec: QuerySpec) -> QuerySet:
    """The same patch or click, answered by the teacher alone: embedding and automatic negatives from the
    teacher's own maps of the training views (what a user of the 2D model would get)."""
    maps = ctx.teacher_maps("train")
    cams = ctx.train_cameras
    size = (cams.width, cams.height)
    if spec.patch is not None:
        v, *box = spec.patch
        pos = patch_embedding(maps.view(v), box, size)[None]
    else:
        v, x, y = spec.click
        pos = click_embedding(maps.view(v), (x, y), size)[None]
    views = auto_view_ids(len(cams), spec.auto_views, [v])

    def sample():
        return subsample(torch.cat([maps.view(i).reshape(-1, maps.dim) for i in views]), MAX_CLUSTER_SAMPLES)

    return contrast_query(pos, ctx.clusters(("teacher", *views), spec.clusters, sample), spec)


@torch.no_grad()
def teacher_masks(ctx: QueryContext, query: QuerySet, split: str, threshold: float) -> torch.Tensor:
    """(N, H, W) hard masks of `query` on the teacher's maps of a split, upsampled to the images."""
    data, maps = ctx.data(split), ctx.teacher_maps(split)
    return torch.stack([query.probability(upsample_map(maps.view(i), data.height, data.width)) > threshold
                        for i in range(len(data))])


def query_iou_per_object(run, box: str = "interior", split: str = "test", teacher: bool = True, **settings) -> dict:
    """For every object of a generated scene (ground included, empty space not): a patch and a click query from
    the training view where the object is most visible, scored by IoU of the hard masks on the held-out
    views against ground-truth ids, for the field and (optionally) for the teacher's own 2D maps.
    `settings` are QuerySpec fields (temperature, threshold, negatives, clusters, ...)."""
    ctx = context(run)
    train, test = ctx.data("train"), ctx.data(split)
    if train.object_ids is None or test.object_ids is None:
        raise QueryError(f"{ctx.run.cfg.data.path}: no ground-truth object ids; per-object IoU needs a generated scene")
    t0 = time.perf_counter()
    base = QuerySpec(**settings)
    gt = test.object_ids.long()
    names = {int(k): v for k, v in train.object_names.items()}
    ids = sorted(i for i in torch.unique(train.object_ids.long()).tolist() if i != 0)
    objects = {}
    for obj in ids:
        prompt = object_prompt(train.object_ids, obj, box)
        if prompt is None:
            continue
        row = {"id": obj, **prompt, "test_pixels": int((gt == obj).sum())}
        for kind, where in (("patch", (prompt["view"], *prompt["box"])), ("click", (prompt["view"], *prompt["click"]))):
            spec = QuerySpec(**{**asdict(base), kind: where})
            try:
                q = make_query(ctx, spec)
            except QueryError as e:  # e.g. the field renders empty space under the click: a failed query scores 0
                row.setdefault("errors", []).append(f"field {kind}: {e}")
                row[f"field_{kind}"] = 0.0
            else:
                masks = torch.stack([r.mask for r in relevance(ctx, q, test.cameras, threshold=spec.threshold)])
                row[f"field_{kind}"] = iou(masks, gt == obj)
                row[f"boundary_f_{kind}"] = boundary_f(masks, gt == obj)
            if teacher:
                masks = teacher_masks(ctx, teacher_query(ctx, spec), split, spec.threshold)
                row[f"teacher_{kind}"] = iou(masks, gt == obj)
        objects[names.get(obj, str(obj))] = row
    return {"objects": objects, "mean": mean_scores(objects), "box": box, "split": split, "views": len(test),
            "settings": asdict(base), "seconds": time.perf_counter() - t0}


def mean_scores(objects: dict) -> dict:
    """Mean of every score column over the objects (ground excluded: id 1 is the ground in generated scenes)."""
    rows = [r for r in objects.values() if r["id"] != 1]
    cols = [k for k in (rows[0] if rows else {}) if k.startswith(("field_", "teacher_", "boundary_f_"))]
    means = {}
    for c in cols:
        values = [r[c] for r in rows if r.get(c) is not None]
        means[c] = float(np.mean(values)) if values else None
    return means


TUNABLE = ("negatives", "temperature", "threshold", "auto_views", "clusters", "claim")


def format_object_table(res: dict) -> str:
    """A plain-text table of `query_iou_per_object` output: one row per object and the mean row, one column
    per score it has (field/teacher patch/click IoU, the field masks' boundary F, 3 decimals, '-' where missing)."""
    cols = [c for c in ("field_patch", "teacher_patch", "field_click", "teacher_click", "boundary_f_patch",
                        "boundary_f_click")
            if any(c in r for r in res["objects"].values())]
    lines = [f"{'object':<18}" + "".join(f"{c:>15}" for c in cols)]
    for name, r in res["objects"].items():
        lines.append(f"{name:<18}" + "".join(f"{_fmt(r.get(c)):>15}" for c in cols))
    lines.append(f"{'mean (objects)':<18}" + "".join(f"{_fmt(res['mean'].get(c)):>15}" for c in cols))
    return "\n".join(lines)


def _fmt(v) -> str:
    return "-" if v is None else f"{v:.3f}"
