"""Where a guided edit acts: the 3D attention field (LENeRF) distilled from a query's per-view relevance maps, and
the hull of the pixels a user painted.

The source is frozen, so the rendering weights of its samples never change: they are computed once for the rays
that can meet the region (`region_samples`), and distilling the attention is then a few hundred cheap steps on
those samples (`distill_attention`): the attention rendered with the source's weights, sum_i w_i A(x_i), is
fitted to the relevance p(query | pixel) times the pixel's opacity, with a sparsity prior (the mean rendered
attention) and total variation on the grid. It starts from the query's 3D selection (dfield.edit.selection),
so cells no ray sees (the inside of an object, revealed when it is removed) keep the selection's answer.

Painted views say where too: the rays of painted pixels, from the camera to just behind the surface they see,
mark a hull (`paint_hull`); a cell painted from every painted view is where new matter may appear (density
addition), even in empty space that no query can select.
"""

from __future__ import annotations

import re
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image

from dfield.core.grids import cell_centers, cell_index, voxel_res
from dfield.core.optimizers import adam
from dfield.core.rays import Rays, camera_image_rays
from dfield.core.rendering import RenderSettings, scatter_samples, weights_from_density
from dfield.core.sampling import march, ray_aabb
from dfield.data.dataset import Cameras
from dfield.errors import EditError
from dfield.fields.attention import AttentionField

IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg", ".webp")


# ------------------------------------------------------------------------------------------- painted views


def load_edited_views(folder, n_views: int, width: int, height: int) -> dict[int, torch.Tensor]:
    """Edited renders of training views from `folder`: every image whose name ends in a number (rgb_007.png, as
    `dfield render RUN --path train` names them) is training view NUMBER. Returns {view: (H, W, 3) float in [0, 1]};
    transparent pixels (alpha < 0.5) are marked NaN: "no opinion", neither changed nor kept.

    Raises:
        EditError: naming the folder or file: no such folder, no numbered images, a view out of range, an image
            of another size than the run's views.
    """
    folder = Path(folder)
    if not folder.is_dir():
        raise EditError(f"{folder}: edited-views folder not found")
    out = {}
    for p in sorted(folder.iterdir()):
        m = re.search(r"(\d+)$", p.stem)
        if p.suffix.lower() not in IMAGE_SUFFIXES or m is None:
            continue
        view = int(m.group(1))
        if not 0 <= view < n_views:
            raise EditError(f"{p}: view {view} is out of range: the run has {n_views} training views (0..{n_views - 1})")
        try:
            img = Image.open(p)
            rgba = np.asarray(img.convert("RGBA"), dtype=np.float32) / 255.0
        except OSError as e:
            raise EditError(f"{p}: cannot read image ({e})") from None
        if rgba.shape[:2] != (height, width):
            raise EditError(f"{p}: image is {rgba.shape[1]}x{rgba.shape[0]}, the run's views are {width}x{height} "
                            f"(paint on renders from `dfield render RUN --path train`)")
        rgb = torch.from_numpy(rgba[..., :3].copy())
        rgb[torch.from_numpy(rgba[..., 3] < 0.5)] = float("nan")
        out[view] = rgb
    if not out:
        raise EditError(f"{folder}: no edited views (images named after their training view, e.g. rgb_007.png)")
    return out


def painted_mask(painted: torch.Tensor, rendered: torch.Tensor, tol: float = 0.04) -> torch.Tensor:
    """(H, W) bool: pixels the user changed (any channel differs from the source render by more than `tol`; PNG
    rounding is 1/510). Transparent (NaN) pixels are not painted.

    Example:
        >>> r = torch.zeros(2, 2, 3); p = r.clone(); p[0, 1] = 0.5
        >>> painted_mask(p, r).tolist()
        [[False, True], [False, False]]
    """
    diff = (painted - rendered).abs().amax(-1)
    return torch.nan_to_num(diff, nan=0.0) > tol


@torch.no_grad()
def paint_hull(rays: list[Rays], t_end: list[torch.Tensor], box: torch.Tensor, res, near: float,
               step: float) -> torch.Tensor:
    """(X, Y, Z) bool over `box`: cells crossed by the painted rays of every view (each view's rays given with how far
    they reach, `t_end`: just behind the surface they see), grown by one cell per view.

    Example:
        >>> box = torch.tensor([[-1.0] * 3, [1.0] * 3])
        >>> a = Rays(torch.tensor([[0.0, 0, -3]]), torch.tensor([[0.0, 0, 1]]))   # along z through the centre
        >>> b = Rays(torch.tensor([[-3.0, 0, 0]]), torch.tensor([[1.0, 0, 0]]))   # along x through the centre
        >>> hull = paint_hull([a, b], [torch.tensor([6.0]), torch.tensor([6.0])], box, (9, 9, 9), 0.0, 0.05)
        >>> bool(hull[4, 4, 4]), bool(hull[4, 4, 0]), int(hull.sum())  # the crossing, one cone only, 3^3 cells
        (True, False, 27)
    """
    res = tuple(int(r) for r in res)
    count = torch.zeros(res, dtype=torch.int32)
    for r, end in zip(rays, t_end):
        marks = torch.zeros(res)
        t0, t1 = ray_aabb(r, box)
        t0, t1 = t0.clamp(min=near), torch.minimum(t1, end)
        n = int(torch.ceil(((t1 - t0).clamp(min=0).max()) / step).item()) if len(r) else 0
        for k0 in range(0, n, 64):
            t = t0[:, None] + (torch.arange(k0, min(n, k0 + 64), dtype=torch.float32) + 0.5) * step
            ok = t < t1[:, None]
            pts = (r.origins[:, None] + r.directions[:, None] * t[..., None])[ok]
            flat, inside = cell_index(pts, box, res)
            marks.view(-1)[flat[inside]] = 1.0
        marks = F.max_pool3d(marks[None, None], 3, stride=1, padding=1)[0, 0]
        count += marks.to(torch.int32)
    return count >= max(1, len(rays))


@torch.no_grad()
def ray_max(fn: Callable[[torch.Tensor], torch.Tensor], rays: Rays, t_end: torch.Tensor, box: torch.Tensor,
            near: float, step: float, chunk: int = 4096) -> torch.Tensor:
    """(R,) the largest value of `fn` (points -> values in [0, 1]) along each ray inside `box`, up to `t_end` (R,).

    Example:
        >>> ball = lambda x: (x.norm(dim=-1) < 0.5).float()
        >>> rays = Rays(torch.tensor([[0.0, 0, -3], [0.0, 2, -3]]), torch.tensor([[0.0, 0, 1], [0.0, 0, 1]]))
        >>> ray_max(ball, rays, torch.tensor([6.0, 6.0]), torch.tensor([[-1.0] * 3, [1.0] * 3]), 0.0, 0.05).tolist()
        [1.0, 0.0]
    """
    out = torch.zeros(len(rays))
    for i in range(0, len(rays), chunk):
        r, end = rays[i:i + chunk], t_end[i:i + chunk]
        t0, t1 = ray_aabb(r, box)
        t0, t1 = t0.clamp(min=near), torch.minimum(t1, end)
        n = int(torch.ceil((t1 - t0).clamp(min=0).max() / step).item()) if len(r) else 0
        best = torch.zeros(len(r))
        for k0 in range(0, n, 64):
            t = t0[:, None] + (torch.arange(k0, min(n, k0 + 64), dtype=torch.float32) + 0.5) * step
            ok = t < t1[:, None]
            pts = r.origins[:, None] + r.directions[:, None] * t[..., None]
            v = torch.zeros(ok.shape)
            v[ok] = fn(pts[ok]).float().cpu()
            best = torch.maximum(best, v.amax(1))
        out[i:i + chunk] = best
    return out


# ------------------------------------------------------------------------------------------- source samples


@dataclass
class RegionSamples:
    """The source's visible samples on the rays of some training views that meet a box: what rendering the
    attention with the frozen source's weights needs, computed once."""

    positions: torch.Tensor  # (M, 3)
    weights: torch.Tensor  # (M,) source rendering weights
    ray: torch.Tensor  # (M,) which ray (0..R-1) each sample belongs to
    view: torch.Tensor  # (R,) training view of each ray
    pixel: torch.Tensor  # (R,) flat pixel id (row-major) of each ray in its view
    acc: torch.Tensor  # (R,) source opacity of each ray

    @property
    def n_rays(self) -> int:
        """Number of rays R."""
        return len(self.view)


@torch.no_grad()
def region_samples(field, settings: RenderSettings, cameras: Cameras, views, box: torch.Tensor, ndc=None,
                   min_weight: float = 1e-3, chunk: int = 8192) -> RegionSamples:
    """Samples of `field` (the frozen source) with rendering weight above `min_weight`, on the rays of training
    `views` that cross `box` (samples inside `box` only; `acc` counts the whole ray)."""
    pos, wts, ray, view, pixel, acc = [], [], [], [], [], []
    n = 0
    for v in views:
        rays = camera_image_rays(cameras, int(v), ndc).to(box.device)
        t0, t1 = ray_aabb(rays, box)
        ids = (t1 > t0.clamp(min=settings.near)).nonzero()[:, 0]
        for part in ids.split(chunk):
            r = rays[part]
            smp = march(r, field.aabb, settings.near, settings.far, settings.step, field.occupancy, None,
                        settings.max_samples)
            sigma = scatter_samples(smp.mask, field.density(smp.positions))
            w, _ = weights_from_density(sigma, smp.dt)
            ws = w[smp.mask]
            keep = (ws > min_weight) & ((smp.positions >= box[0]) & (smp.positions <= box[1])).all(-1)
            pos.append(smp.positions[keep])
            wts.append(ws[keep])
            ray.append(smp.ray_index[keep] + n)
            view.append(torch.full((len(part),), int(v), dtype=torch.long))
            pixel.append(part.cpu())
            acc.append(w.sum(-1))
            n += len(part)
    cat = lambda xs, shape: torch.cat(xs) if xs else torch.zeros(shape)  # noqa: E731
    return RegionSamples(cat(pos, (0, 3)), cat(wts, (0,)), cat(ray, (0,)).long(), cat(view, (0,)).long(),
                         cat(pixel, (0,)).long(), cat(acc, (0,)))


def rendered_attention(attention: AttentionField, s: RegionSamples, rays: torch.Tensor | None = None) -> torch.Tensor:
    """The attention rendered with the source's weights, sum_i w_i A(x_i), for rays `rays` (indices; default all)."""
    if rays is None:
        return torch.zeros(s.n_rays).index_add(0, s.ray, s.weights * attention(s.positions))
    lookup = torch.full((s.n_rays,), -1, dtype=torch.long)
    lookup[rays] = torch.arange(len(rays))
    local = lookup[s.ray]
    m = local >= 0
    return torch.zeros(len(rays)).index_add(0, local[m], s.weights[m] * attention(s.positions[m]))


# ------------------------------------------------------------------------------------------- the attention field


def region_box(boxes: list[torch.Tensor], limit: torch.Tensor, margin: float = 0.1, cells: int = 2,
               resolution: int = 48) -> torch.Tensor:
    """The box around all `boxes`, grown by `margin` of its size plus `cells` cells of a `resolution`-cell grid,
    clipped to `limit`."""
    lo = torch.stack([b[0] for b in boxes]).amin(0)
    hi = torch.stack([b[1] for b in boxes]).amax(0)
    pad = margin * (hi - lo) + cells * (hi - lo).max() / resolution
    return torch.stack([torch.maximum(lo - pad, limit[0]), torch.minimum(hi + pad, limit[1])])


@torch.no_grad()
def initial_attention(box: torch.Tensor, voxels: int, sources: list[Callable[[torch.Tensor], torch.Tensor]],
                      floor: float = 0.02, blur: int = 1, grow: int = 0) -> AttentionField:
    """An attention field over `box` (about `voxels` cells) starting as the union (max) of `sources`, functions
    of points giving a selection in [0, 1] (a 3D query selection, a paint hull), grown by `grow` whole cells (so
    the selection's surface lies inside the mask, not on its graded edge) and softened by a `blur`-cell box
    filter so its edges are graded."""
    res = voxel_res(box, voxels)
    pts = cell_centers(box, res)
    p = torch.zeros(len(pts))
    for fn in sources:
        p = torch.maximum(p, fn(pts).float().cpu())
    p = p.reshape(res)
    if grow > 0:
        p = F.max_pool3d(p[None, None], 2 * grow + 1, stride=1, padding=grow)[0, 0]
    if blur > 0:
        k = 2 * blur + 1
        p = torch.maximum(p, F.avg_pool3d(p[None, None], k, stride=1, padding=blur, count_include_pad=False)[0, 0])
    return AttentionField(box, res, p.clamp(0.01, 0.99), floor=floor)


def distill_attention(attention: AttentionField, samples: RegionSamples, targets: torch.Tensor, steps: int = 200,
                      batch: int = 4096, lr: float = 0.1, sparsity: float = 0.02, tv: float = 0.05, seed: int = 0,
                      progress: Callable | None = None) -> dict:
    """Fit the attention rendered with the source's weights to `targets` (R,) (relevance x opacity per ray of
    `samples`), with the sparsity and TV priors (LENeRF's). Returns the final figures: loss terms and the
    rendered attention's agreement with the targets (IoU of both above 0.5)."""
    if samples.n_rays == 0 or steps <= 0:
        return {"steps": 0}
    g = torch.Generator().manual_seed(seed)
    opt = adam([attention.logits], lr=lr, betas=(0.9, 0.999))
    stats = {}
    for step in range(steps):
        rays = torch.randint(samples.n_rays, (min(batch, samples.n_rays),), generator=g)
        lookup = torch.full((samples.n_rays,), -1, dtype=torch.long)
        lookup[rays] = torch.arange(len(rays))
        local = lookup[samples.ray]
        m = local >= 0
        wa = samples.weights[m] * attention(samples.positions[m])
        rendered = torch.zeros(len(rays)).index_add(0, local[m], wa)
        data = (rendered - targets[rays]).square().mean()
        sparse = wa.sum() / samples.weights[m].sum().clamp(min=1e-6)
        smooth = attention.total_variation()
        loss = data + sparsity * sparse + tv * smooth
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        stats = {"loss": loss.item(), "data": data.item(), "sparsity": sparse.item(), "tv": smooth.item()}
        if progress is not None:
            progress("attention", step + 1, steps, stats)
    with torch.no_grad():
        r = rendered_attention(attention, samples)
        inter = ((r > 0.5) & (targets > 0.5)).sum().item()
        union = ((r > 0.5) | (targets > 0.5)).sum().item()
    return {"steps": steps, **stats, "iou": inter / max(union, 1)}
