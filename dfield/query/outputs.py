"""What a query produces: heatmap, overlay and mask images of its relevance, the selected points as a PLY, and
`run_query` (what `dfield query` does: all of them for a camera path, plus query.json)."""

from __future__ import annotations

import json
import time
from dataclasses import asdict
from pathlib import Path

import numpy as np
import torch
from scipy.ndimage import binary_erosion

from dfield.core.camera_paths import orbit_path
from dfield.core.rays import camera_image_rays, ndc_to_world
from dfield.data.dataset import Cameras
from dfield.errors import QueryError
from dfield.io.atomic import atomic_write_text
from dfield.io.export import cluster_palette, save_ply, save_png, turbo
from dfield.query.builder import field_feature_sample, make_query
from dfield.query.clusters import auto_view_ids, nearest_cluster
from dfield.query.context import QueryContext, context
from dfield.query.evaluation import TUNABLE, query_iou_per_object
from dfield.query.relevance import Relevance, relevance
from dfield.query.spec import OPAQUE, QuerySpec, query_views, validate


def heatmap_image(rel: Relevance) -> np.ndarray:
    """Turbo colours of the probability, faded to white where nothing is rendered."""
    acc = rel.rendered.acc.clamp(0, 1).numpy()[..., None]
    return turbo(rel.probability.numpy()) * acc + (1 - acc)


def overlay_image(rel: Relevance, tint=(1.0, 0.1, 0.6), strength: float = 0.5) -> np.ndarray:
    """The rgb render with the selection tinted and everything else greyed out, so any object colour stands out."""
    rgb = rel.rendered.rgb.clamp(0, 1).numpy()
    m = rel.mask.numpy()[..., None].astype(np.float32)
    tinted = rgb * (1 - strength) + np.asarray(tint) * strength
    grey = 0.35 + 0.5 * (rgb @ np.array([0.299, 0.587, 0.114]))[..., None].repeat(3, -1)
    return m * tinted + (1 - m) * grey


def selection_points(rels: list[Relevance], cameras: Cameras, ndc=None,
                     voxels: int = 512) -> tuple[torch.Tensor, torch.Tensor]:
    """Selected pixels back-projected to 3D at their rendered depth, merged over views: (N, 3) points and
    (N, 3) colours, one point per cell of a `voxels`^3 grid over their extent (views overlap a lot)."""
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


def query_cameras(ctx: QueryContext, path: str, frames: int = 48) -> Cameras:
    """The cameras of a camera path name: "train" or "test" (the run's views) or "orbit" (`frames` cameras
    around the training views, see `orbit_path`); QueryError for any other name."""
    if path == "train":
        return ctx.train_cameras
    if path == "test":
        return ctx.data("test").cameras
    if path == "orbit":
        return orbit_path(ctx.train_cameras, frames)
    raise QueryError(f"unknown camera path {path!r}: expected test, train or orbit")


def cluster_maps(ctx: QueryContext, spec: QuerySpec, rels: list[Relevance], out: Path) -> list[Path]:
    """clusters_VVV.png per view: every opaque pixel in the colour of its nearest scene cluster, the chosen cluster
    (`spec.cluster`) outlined in white; clusters.json lists each cluster's colour (RGB 0-255) and pixel share."""
    views = auto_view_ids(len(ctx.train_cameras), spec.auto_views, query_views(spec))
    clusters = ctx.clusters(("field", *views), spec.clusters, lambda: field_feature_sample(ctx, views))
    palette = cluster_palette(len(clusters[1]))
    files, counts = [], np.zeros(len(palette))
    for r in rels:
        opaque = (r.rendered.acc > OPAQUE).numpy()
        ids = nearest_cluster(ctx.decode(r.rendered.feature), clusters).numpy()
        counts += np.bincount(ids[opaque], minlength=len(palette))
        img = np.where(opaque[..., None], palette[ids], 1.0)
        chosen = (ids == spec.cluster) & opaque
        edge = chosen & ~binary_erosion(chosen)
        img[edge] = 1.0
        files.append(save_png(out / f"clusters_{r.view:03d}.png", img))
    legend = [{"cluster": j, "rgb": [round(255 * c) for c in palette[j]], "share": counts[j] / max(counts.sum(), 1)}
              for j in range(len(palette))]
    files.append(atomic_write_text(out / "clusters.json", json.dumps({"chosen": spec.cluster, "clusters": legend},
                                                                      indent=1), durable=False))
    return files


def run_query(run: Path, spec: QuerySpec, path: str = "test", out: Path | None = None, ply: bool = True,
              eval_objects: bool = False, frames: int = 48) -> dict:
    """What `dfield query` does: relevance on every view of `path` (test, train or orbit), written to `out`
    (default RUN/query) as heatmaps, overlays, masks, a PLY of the selected region and query.json (with per-object
    IoU when asked, on generated scenes). Returns query.json's figures plus `out` and the number of `files`.

    Example:
        >>> s = run_query("runs/toy", QuerySpec(patch=(3, 40, 40, 60, 60)))   # doctest: +SKIP
        >>> s["selected_pixels"], s["out"]                                     # doctest: +SKIP
    """
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
    evaluation = query_iou_per_object(ctx, **{k: getattr(spec, k) for k in TUNABLE}) if eval_objects else None
    out = Path(out) if out is not None else Path(ctx.run.path) / "query"
    files = []
    for r in rels:
        files.append(save_png(out / f"heatmap_{r.view:03d}.png", heatmap_image(r)))
        files.append(save_png(out / f"overlay_{r.view:03d}.png", overlay_image(r)))
        files.append(save_png(out / f"mask_{r.view:03d}.png", r.mask.numpy().astype(np.uint8) * 255))
    if spec.cluster is not None:
        files += cluster_maps(ctx, spec, rels, out)
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
    files.append(atomic_write_text(out / "query.json", json.dumps(summary, indent=1), durable=False))
    return {**summary, "out": str(out), "files": len(files)}
