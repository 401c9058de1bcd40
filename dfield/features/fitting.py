"""Features second: distil a teacher into a feature field on top of an already trained, frozen radiance field.

Only the feature volume, its basis and the decoder learn; density and colour stay bit-for-bit as trained.
This is the radiance-first/features-second schedule, and the fair baseline one-pass lifting is compared to.
"""

from __future__ import annotations

import time
from collections.abc import Callable

import numpy as np
import torch

from dfield.core.optimizers import adam
from dfield.core.rays import RayBatcher, Rays, pixel_coords
from dfield.core.rendering import VisibleSamples, composite_samples, render_field, visible_samples
from dfield.data.dataset import Dataset
from dfield.models.grid import GridModel
from dfield.models.losses import feature_loss, patch_tv_loss


def teacher_targets(maps, data: Dataset, ids: torch.Tensor) -> torch.Tensor:
    """The teacher's features (R, D) at flat pixel ids `ids` over `data`'s views (as RayBatcher draws them)."""
    return maps.sample(*pixel_coords(ids, data.width, data.height))


def render_features(model: GridModel, rays: Rays) -> torch.Tensor:
    """(R, feature_dim) features rendered along `rays`, without the colour branch: the loss on them never needs the
    colour, and on the frozen radiance field of features second that branch would be half of every step."""
    return render_field(model.as_field(), rays, model.render_settings(), None, features=True, colors=False)["feature"]


class SamplePool:
    """The visible samples (`dfield.core.rendering.visible_samples`) of every training pixel of a frozen radiance
    field, found once; rendering features of any batch of those pixels is then a weighted sum of the feature
    function at o + t d, with no march and no density, and gives what `render_features` gives (float rounding
    aside): the same samples at the same distances with the same weights.

    Memory: 8 bytes per visible sample (t and weight), about 64 bytes per pixel of a surface scene.

    Example:
        >>> pool = SamplePool(model, data)                          # doctest: +SKIP
        >>> features = pool.render(model, *batcher.sample()[::2])    # (R, feature_dim), as render_features  # doctest: +SKIP
    """

    def __init__(self, model: GridModel, data: Dataset, chunk: int = 1 << 14,
                 progress: Callable[[str, int, int, dict | None], None] | None = None, renders: bool = False):
        batcher = RayBatcher(data, 1)
        device = model.field.aabb.device
        field, settings = model.as_field(), model.render_settings()
        n = batcher.n_pixels
        counts = torch.zeros(n, dtype=torch.long)
        ts, ws, rgb, depth = [], [], [], []
        for start in range(0, n, chunk):
            ids = torch.arange(start, min(n, start + chunk))
            rays, _ = batcher.rays_of(ids)
            if renders:  # the same march, which also composites the colour: the views' renders come almost free
                with torch.no_grad():
                    out = render_field(field, rays.to(device), settings, None, colors=True, visible=True)
                v = out["visible"]
                rgb.append((out["rgb"].clamp(0, 1) * 255).round().to(torch.uint8).cpu())
                depth.append(out["depth"].float().cpu())
            else:
                v = visible_samples(field, rays.to(device), settings)
            order = torch.sort(v.ray, stable=True).indices  # samples grouped by ray, front to back within each
            ts.append(v.t[order].cpu())
            ws.append(v.weight[order].cpu())
            counts[start:start + len(ids)] = torch.bincount(v.ray.cpu(), minlength=len(ids))
            if progress is not None:
                progress("distill: visible samples", min(n, start + chunk), n, None)
        self.t, self.weight = torch.cat(ts), torch.cat(ws)
        self.offsets = torch.zeros(n + 1, dtype=torch.long)
        self.offsets[1:] = counts.cumsum(0)
        self.renders: dict[str, np.ndarray] | None = None
        """With `renders`: rgb uint8 (N, H, W, 3) and depth float32 (N, H, W) of every view, as
        `dfield.features.targets.render_views` gives them."""
        if renders:
            hw = (len(data), data.height, data.width)
            self.renders = {"rgb": torch.cat(rgb).reshape(*hw, 3).numpy(), "depth": torch.cat(depth).reshape(hw).numpy()}

    def render(self, model: GridModel, rays: Rays, ids: torch.Tensor) -> torch.Tensor:
        """(R, feature_dim) features of `model` rendered along `rays` through the pixels `ids` (R,)."""
        start, count = self.offsets[ids], self.offsets[ids + 1] - self.offsets[ids]
        ray = torch.repeat_interleave(torch.arange(len(ids)), count)
        first = torch.repeat_interleave(count.cumsum(0) - count, count)
        rows = start[ray] + torch.arange(len(ray)) - first
        device = rays.origins.device
        ray, t, w = ray.to(device), self.t[rows].to(device), self.weight[rows].to(device)
        return composite_samples(model.field.features, rays, VisibleSamples(ray, t, w))


def ray_feature_loss(model: GridModel, data: Dataset, maps, rays, ids: torch.Tensor, loss: str = "l2") -> torch.Tensor:
    """Distillation loss of `rays` (through the pixels `ids`): their decoded rendered features against the teacher."""
    feature = render_features(model, rays)
    return feature_loss(model.decode(feature), teacher_targets(maps, data, ids).to(feature.device), loss)


def fit_features(model: GridModel, data: Dataset, maps, iterations: int = 1000, batch_rays: int = 2048,
                 lr_grid: float = 0.02, lr_network: float = 1e-3, loss: str = "l2", seed: int = 0,
                 patch: int = 0, tv: float = 0.0, progress: Callable[[str, int, int, dict | None], None] | None = None,
                 pool: SamplePool | None = None) -> dict:
    """Train only the feature branch of `model` (add one first: `model.add_feature_field`) against teacher `maps`
    of `data`'s views, with Adam and learning rates decaying tenfold over the run. `patch` > 0 draws the rays as
    patch x patch pixel patches, and `tv` > 0 adds that weight times the total variation of each rendered patch.

    The visible samples of every training pixel are found first (`SamplePool`, progress "distill: visible samples"):
    the radiance field is frozen, so each step only evaluates the feature branch where rays see the scene.
    `progress("distill", step, iterations, {"loss": value})` is called after each step. Returns seconds (pool
    included), final loss and iterations. Every other parameter is frozen while it runs and trainable again afterwards.
    `pool`: one already found (by a caller that also wanted the renders), used instead.
    """
    for p in model.parameters():
        p.requires_grad_(False)
    grid = [model.field.feature_vol.planes, model.field.feature_vol.lines]
    net = list(model.field.feature_basis.parameters()) + list(model.decoder.parameters())
    for p in grid + net:
        p.requires_grad_(True)
    opt = adam([{"params": grid, "lr": lr_grid}, {"params": net, "lr": lr_network}], betas=(0.9, 0.99))
    t0 = time.perf_counter()
    pool = pool if pool is not None else SamplePool(model, data, progress=progress)
    batcher = RayBatcher(data, batch_rays, seed=seed)
    device = model.field.aabb.device
    last = float("nan")
    for step in range(iterations):
        for g, base in zip(opt.param_groups, (lr_grid, lr_network)):
            g["lr"] = base * 0.1 ** (step / iterations)
        rays, _, ids = batcher.sample_patches(patch) if patch > 0 else batcher.sample()
        decoded = model.decode(pool.render(model, rays.to(device), ids))
        value = feature_loss(decoded, teacher_targets(maps, data, ids).to(decoded.device), loss)
        if tv > 0:
            value = value + tv * patch_tv_loss(decoded, patch)
        opt.zero_grad(set_to_none=True)
        value.backward()
        opt.step()
        last = value.item()
        if progress is not None:
            progress("distill", step + 1, iterations, {"loss": last})
    for p in model.parameters():
        p.requires_grad_(True)
    return {"seconds": time.perf_counter() - t0, "loss": last, "iterations": iterations}
