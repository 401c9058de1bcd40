"""What a query produces: per-view relevance maps, heatmap/overlay/mask images, the selected points as a PLY,
and the `dfield query` command around them."""

from __future__ import annotations

import json
import time
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np
import torch

from dfield.data.dataset import Cameras
from dfield.query.sets import QueryError, QuerySet
from dfield.query.builder import OPAQUE, QueryContext, QuerySpec, context, make_query, validate
from dfield.query.render_cache import RenderedView


# ---------------------------------------------------------------------------------------------- relevance


@dataclass
class Relevance:
    view: int
    probability: torch.Tensor  # (H, W) p(query | pixel), before the opacity mask
    mask: torch.Tensor  # (H, W) bool: probability above the threshold on an opaque pixel
    rendered: RenderedView


@torch.no_grad()
def view_relevance(ctx: QueryContext, query: QuerySet, cameras: Cameras, i: int, threshold: float) -> Relevance:
    r = ctx.render(cameras, i)
    p = query.probability(ctx.decode(r.feature))
    return Relevance(i, p, (p > threshold) & (r.acc > OPAQUE), r)


def relevance(run, query: QuerySet, cameras: Cameras | None = None, views=None,
              threshold: float = 0.5) -> list[Relevance]:
    """Per-view probability maps and hard masks of `query` (default: every training view). Views are rendered
    once per run and camera; later queries on them only decode and softmax."""
    ctx = context(run)
    cameras = ctx.train_cameras if cameras is None else cameras
    views = range(len(cameras)) if views is None else views
    return [view_relevance(ctx, query, cameras, int(i), threshold) for i in views]


def heatmap_image(rel: Relevance) -> np.ndarray:
    """Turbo colours of the probability, faded to white where nothing is rendered."""
    from dfield.io.export import turbo

    acc = rel.rendered.acc.clamp(0, 1).numpy()[..., None]
    return turbo(rel.probability.numpy()) * acc + (1 - acc)


def overlay_image(rel: Relevance, tint=(1.0, 0.1, 0.6), strength: float = 0.5) -> np.ndarray:
    """The rgb render with the selection tinted and everything else greyed out, so any object colour stands out."""
    rgb = rel.rendered.rgb.clamp(0, 1).numpy()
    m = rel.mask.numpy()[..., None].astype(np.float32)
    tinted = rgb * (1 - strength) + np.asarray(tint) * strength
    grey = 0.35 + 0.5 * (rgb @ np.array([0.299, 0.587, 0.114]))[..., None].repeat(3, -1)
    return m * tinted + (1 - m) * grey


def ndc_to_world(points: torch.Tensor, focal: float, width: int, height: int, near: float = 1.0) -> torch.Tensor:
    """Inverse of rays.to_ndc for points: NDC (x, y, z) -> the forward-facing world frame."""
    ax, ay = -2.0 * focal / width, -2.0 * focal / height
    z = 2.0 * near / (points[:, 2] - 1.0).clamp(max=-1e-6)
    return torch.stack([points[:, 0] * z / ax, points[:, 1] * z / ay, z], -1)


def selection_points(rels: list[Relevance], cameras: Cameras, ndc=None,
                     voxels: int = 512) -> tuple[torch.Tensor, torch.Tensor]:
    """Selected pixels back-projected to 3D at their rendered depth, merged over views: (N, 3) points and
    (N, 3) colours, one point per cell of a `voxels`^3 grid over their extent (views overlap a lot)."""
    from dfield.core.rays import camera_image_rays

    pts, cols = [], []
    for rel in rels:
        m = rel.mask.reshape(-1)
        if not m.any():
            continue
        rays = camera_image_rays(cameras, rel.view, ndc)
        r = rel.rendered
        # Depth is a weighted sum over samples; dividing by the opacity gives the expected surface distance.
        t = (r.depth / r.acc.clamp(min=1e-6)).reshape(-1)[m]
        p = rays.origins[m] + rays.directions[m] * t[:, None]
        pts.append(ndc_to_world(p, *ndc) if ndc is not None else p)
        cols.append(r.rgb.reshape(-1, 3)[m])
    if not pts:
        return torch.zeros(0, 3), torch.zeros(0, 3)
    pts, cols = torch.cat(pts), torch.cat(cols)
    lo, hi = pts.min(0).values, pts.max(0).values
    cell = ((pts - lo) / ((hi - lo).max().clamp(min=1e-9) / voxels)).long()
    _, inverse = torch.unique(cell, dim=0, return_inverse=True)
    first = torch.full((int(inverse.max()) + 1,), len(pts), dtype=torch.long).scatter_reduce(
        0, inverse, torch.arange(len(pts)), reduce="amin")
    return pts[first], cols[first].clamp(0, 1)


# ------------------------------------------------------------------------------------------- command line


def query_cameras(ctx: QueryContext, path: str, frames: int = 48) -> Cameras:
    if path == "train":
        return ctx.train_cameras
    if path == "test":
        return ctx.data("test").cameras
    if path == "orbit":
        from dfield.core.camera_paths import orbit_path

        return orbit_path(ctx.train_cameras, frames)
    raise QueryError(f"unknown camera path {path!r}: expected test, train or orbit")


def run_query(run: Path, spec: QuerySpec, path: str = "test", out: Path | None = None, ply: bool = True,
              eval_objects: bool = False, frames: int = 48) -> dict:
    """What `dfield query` does: relevance on every view of `path`, written as heatmaps, overlays, masks, a PLY
    of the selected region and query.json (with per-object IoU when asked, on generated scenes)."""
    from dfield.io.export import save_ply, save_png

    t0 = time.perf_counter()
    ctx = context(run)
    cams = ctx.train_cameras
    validate(spec, len(cams), cams.width, cams.height)
    if eval_objects and ctx.data("train").object_ids is None:
        raise QueryError(f"{ctx.run.cfg.data.path}: --eval-objects needs ground-truth object ids (a generated scene)")
    q = make_query(ctx, spec)
    cameras = query_cameras(ctx, path, frames)
    rels = relevance(ctx, q, cameras, threshold=spec.threshold)
    selected = sum(int(r.mask.sum()) for r in rels)
    if selected == 0:
        best = max(float((r.probability * (r.rendered.acc > OPAQUE)).max()) for r in rels)
        raise QueryError(f"nothing selected: no pixel has probability above {spec.threshold} in any of the {len(rels)} "
                         f"{path} views (the highest is {best:.2f}); lower --threshold")
    from dfield.query.evaluation import TUNABLE, format_object_table, query_iou_per_object  # it builds on this module

    evaluation = query_iou_per_object(ctx, **{k: getattr(spec, k) for k in TUNABLE}) if eval_objects else None
    out = Path(out) if out is not None else Path(ctx.run.path) / "query"
    files = []
    for r in rels:
        files.append(save_png(out / f"heatmap_{r.view:03d}.png", heatmap_image(r)))
        files.append(save_png(out / f"overlay_{r.view:03d}.png", overlay_image(r)))
        files.append(save_png(out / f"mask_{r.view:03d}.png", r.mask.numpy().astype(np.uint8) * 255))
    points = None
    if ply:
        pts, cols = selection_points(rels, cameras, ctx.ndc)
        points = len(pts)
        files.append(save_ply(out / "selection.ply", pts.numpy(), cols.numpy()))
    summary = {
        "run": str(ctx.run.path), "step": ctx.run.step, "path": path, "views": len(rels),
        "spec": asdict(spec), "positives": len(q.positives), "negatives": len(q.negatives),
        "selected_pixels": selected, "selected_fraction": [float(r.mask.float().mean()) for r in rels],
        "ply_points": points, "renders": ctx.cache.renders, "seconds": time.perf_counter() - t0,
        "objects": evaluation,
    }
    files.append(out / "query.json")
    (out / "query.json").write_text(json.dumps(summary, indent=1))
    print(f"selected {selected} pixels over {len(rels)} {path} views ({len(q.positives)} positive, "
          f"{len(q.negatives)} negative embeddings); {ctx.cache.renders} views rendered, the rest from the cache")
    if evaluation is not None:
        print(format_object_table(evaluation))
    print(f"wrote {len(files)} files to {out}")
    return summary
