"""Features second: distil a teacher into a feature field on top of an already trained, frozen radiance field.

Only the feature volume, its basis and the decoder learn; density and colour stay bit-for-bit as trained.
This is the radiance-first/features-second schedule, and the fair baseline one-pass lifting is compared to.
"""

from __future__ import annotations

import time
from collections.abc import Callable

import torch

from dfield.core.rays import RayBatcher, pixel_coords
from dfield.data.dataset import Dataset
from dfield.models.base import Model
from dfield.models.grid import GridModel
from dfield.models.losses import feature_loss, patch_tv_loss


def teacher_targets(maps, data: Dataset, ids: torch.Tensor) -> torch.Tensor:
    """The teacher's features (R, D) at flat pixel ids `ids` over `data`'s views (as RayBatcher draws them)."""
    return maps.sample(*pixel_coords(ids, data.width, data.height))


def ray_feature_loss(model: Model, data: Dataset, maps, rays, ids: torch.Tensor, loss: str = "l2") -> torch.Tensor:
    """Distillation loss of `rays` (through the pixels `ids`): their decoded rendered features against the teacher."""
    out = model.render_rays(rays, None, features=True)
    goal = teacher_targets(maps, data, ids).to(out["feature"].device)
    return feature_loss(model.decode(out["feature"]), goal, loss)


def fit_features(model: GridModel, data: Dataset, maps, iterations: int = 1000, batch_rays: int = 2048,
                 lr_grid: float = 0.02, lr_network: float = 1e-3, loss: str = "l2", seed: int = 0,
                 patch: int = 0, tv: float = 0.0, progress: Callable[[str, int, int, dict | None], None] | None = None) -> dict:
    """Train only the feature branch of `model` (add one first: `model.add_feature_field`) against teacher `maps`
    of `data`'s views, with Adam and learning rates decaying tenfold over the run. `patch` > 0 draws the rays as
    patch x patch pixel patches, and `tv` > 0 adds that weight times the total variation of each rendered patch.

    `progress("distill", step, iterations, {"loss": value})` is called after each step. Returns seconds, final loss and
    iterations. Every other parameter is frozen while it runs and trainable again afterwards.
    """
    for p in model.parameters():
        p.requires_grad_(False)
    grid = [model.field.feature_vol.planes, model.field.feature_vol.lines]
    net = list(model.field.feature_basis.parameters()) + list(model.decoder.parameters())
    for p in grid + net:
        p.requires_grad_(True)
    opt = torch.optim.Adam([{"params": grid, "lr": lr_grid}, {"params": net, "lr": lr_network}], betas=(0.9, 0.99))
    batcher = RayBatcher(data, batch_rays, seed=seed)
    device = model.field.aabb.device
    t0 = time.perf_counter()
    last = float("nan")
    for step in range(iterations):
        for g, base in zip(opt.param_groups, (lr_grid, lr_network)):
            g["lr"] = base * 0.1 ** (step / iterations)
        rays, _, ids = batcher.sample_patches(patch) if patch > 0 else batcher.sample()
        out = model.render_rays(rays.to(device), None, features=True)
        decoded = model.decode(out["feature"])
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
