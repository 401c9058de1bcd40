"""Features second: distil a teacher into a feature field on top of an already trained, frozen radiance field.

Only the feature volume, its basis and the decoder learn; density and colour stay bit-for-bit as trained.
This is the radiance-first/features-second schedule, and the fair baseline one-pass lifting is compared to.
"""

from __future__ import annotations

import time

import torch

from dfield.data.dataset import Dataset
from dfield.fields.vm import VMVolume
from dfield.models.grid import GridModel
from dfield.rays import RayBatcher


def add_feature_field(model: GridModel, dim: int, teacher_dim: int, comp: int = 16) -> None:
    """Give a trained model a fresh feature volume at its grid resolution, and a decoder."""
    f = model.field
    f.cfg.feature_dim = dim
    f.cfg.feature_comp = comp
    device = f.aabb.device
    f.feature_vol = VMVolume(comp, f.res, f.cfg.init_scale).to(device)
    f.feature_basis = torch.nn.Linear(3 * comp, dim, bias=False).to(device)
    model.decoder = torch.nn.Linear(dim, teacher_dim).to(device)


def fit_features(model: GridModel, data: Dataset, maps, iterations: int = 1000, batch_rays: int = 2048,
                 lr_grid: float = 0.02, lr_network: float = 1e-3, loss: str = "l2", seed: int = 0,
                 progress=None) -> dict:
    """Train only the feature branch against teacher `maps` of `data`'s views. Returns seconds and final loss."""
    for p in model.parameters():
        p.requires_grad_(False)
    grid = [model.field.feature_vol.planes, model.field.feature_vol.lines]
    net = list(model.field.feature_basis.parameters()) + list(model.decoder.parameters())
    for p in grid + net:
        p.requires_grad_(True)
    opt = torch.optim.Adam([{"params": grid, "lr": lr_grid}, {"params": net, "lr": lr_network}], betas=(0.9, 0.99))
    batcher = RayBatcher(data, batch_rays, seed=seed)
    hw = data.height * data.width
    device = model.field.aabb.device
    t0 = time.perf_counter()
    last = float("nan")
    for step in range(iterations):
        for g, base in zip(opt.param_groups, (lr_grid, lr_network)):
            g["lr"] = base * 0.1 ** (step / iterations)
        rays, _, ids = batcher.sample()
        out = model.render_rays(rays.to(device), None, features=True)
        cam, pix = ids // hw, ids % hw
        goal = maps.sample(cam, (pix % data.width).float() + 0.5, (pix // data.width).float() + 0.5).to(device)
        diff = model.decode(out["feature"]) - goal
        value = (diff.abs() if loss == "l1" else diff**2).mean()
        opt.zero_grad(set_to_none=True)
        value.backward()
        opt.step()
        last = value.item()
        if progress is not None:
            progress(step + 1, last)
    for p in model.parameters():
        p.requires_grad_(True)
    return {"seconds": time.perf_counter() - t0, "loss": last, "iterations": iterations}
