"""One-pass feature lifting: no training, just a weighted average of teacher features per voxel.

Every training ray carries its teacher feature; each sample along it splats that feature into the voxels
around it with the sample's rendering weight. A voxel's feature is the weighted mean of what it received.
The trained radiance field supplies the weights, so features land where the surfaces are.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from dataclasses import dataclass

import torch

from dfield.data.dataset import Dataset
from dfield.models.grid import GridModel, voxel_res
from dfield.core.rays import image_rays
from dfield.core.rendering import scatter_samples, weights_from_density
from dfield.core.sampling import march


def _trilinear(u: torch.Tensor, res: tuple[int, int, int]) -> tuple[torch.Tensor, torch.Tensor]:
    """Corner cell ids (N, 8) and weights (N, 8) of points u in [0, 1]^3 on a res grid (cell centres at the nodes)."""
    size = u.new_tensor([r - 1 for r in res])
    p = u.clamp(0, 1) * size
    p0 = torch.minimum(p.floor(), size - 1).clamp(min=0)
    f = p - p0
    i0 = p0.long()
    ids, ws = [], []
    for dx in (0, 1):
        for dy in (0, 1):
            for dz in (0, 1):
                ix, iy, iz = i0[:, 0] + dx, i0[:, 1] + dy, i0[:, 2] + dz
                ids.append((ix * res[1] + iy) * res[2] + iz)
                wx = f[:, 0] if dx else 1 - f[:, 0]
                wy = f[:, 1] if dy else 1 - f[:, 1]
                wz = f[:, 2] if dz else 1 - f[:, 2]
                ws.append(wx * wy * wz)
    return torch.stack(ids, -1), torch.stack(ws, -1)


@dataclass
class LiftedFeatures:
    """Teacher-space features per voxel of a res grid over aabb, trilinearly interpolated between cell centres.

    Only cells that received weight hold a row, so a wide (384-d) teacher costs memory in proportion to the
    surface, not the box: `grid` is (1 + K, D) with row 0 all zeros for the cells no ray saw, and `rows`
    (cells,) gives each cell's row."""

    aabb: torch.Tensor
    res: tuple[int, int, int]
    grid: torch.Tensor
    rows: torch.Tensor
    seconds: float = 0.0

    def features(self, x: torch.Tensor) -> torch.Tensor:
        u = (x - self.aabb[0]) / (self.aabb[1] - self.aabb[0])
        ids, w = _trilinear(u, self.res)
        return torch.nn.functional.embedding_bag(self.rows[ids], self.grid, per_sample_weights=w, mode="sum")

    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        return self.features(x)

    def to(self, device) -> "LiftedFeatures":
        return LiftedFeatures(self.aabb.to(device), self.res, self.grid.to(device), self.rows.to(device), self.seconds)

    def state(self) -> dict[str, torch.Tensor]:
        """Tensors for a checkpoint: the occupied cells' ids and their rows in fp16 (the precision of the
        teacher maps they average; lift_features already rounds to it, so a reload renders the same)."""
        cells = torch.nonzero(self.rows).reshape(-1)
        return {"aabb": self.aabb, "res": torch.tensor(self.res, dtype=torch.int64), "cells": cells.to(torch.int32),
                "grid": self.grid[self.rows[cells]].half()}

    @staticmethod
    def from_state(t: dict[str, torch.Tensor]) -> "LiftedFeatures":
        res = tuple(int(r) for r in t["res"])
        return _compact(t["aabb"].float(), res, t["cells"].long(), t["grid"].float())


def _compact(aabb: torch.Tensor, res: tuple[int, int, int], cells: torch.Tensor, values: torch.Tensor) -> LiftedFeatures:
    """LiftedFeatures holding `values` (K, D) at cell ids `cells` (K,) and zeros elsewhere."""
    rows = torch.zeros(res[0] * res[1] * res[2], dtype=torch.long, device=values.device)
    rows[cells] = torch.arange(1, len(cells) + 1, device=values.device)
    grid = torch.cat([values.new_zeros(1, values.shape[1]), values])
    return LiftedFeatures(aabb, res, grid, rows)


class _TouchedCellSums:
    """Weighted feature sums of the cells rays actually reach, grown as new cells are touched: memory goes with
    the surface (cells touched x D) rather than the box (cells x D: 1.4 GB for 96^3 cells of a 384-d teacher)."""

    def __init__(self, n_cells: int, dim: int):
        self.row = torch.full((n_cells,), -1, dtype=torch.long)  # each cell's row, -1 until touched
        self.cell = torch.zeros(0, dtype=torch.long)
        self.sums = torch.zeros(0, dim)
        self.weights = torch.zeros(0)
        self.n = 0

    def add(self, cells: torch.Tensor, sums: torch.Tensor, weights: torch.Tensor) -> None:
        """Add `sums` (U, D) and `weights` (U,) to the distinct cells `cells` (U,)."""
        new = cells[self.row[cells] < 0]
        if len(new):
            self._reserve(self.n + len(new))
            self.row[new] = torch.arange(self.n, self.n + len(new))
            self.cell[self.n : self.n + len(new)] = new
            self.n += len(new)
        rows = self.row[cells]
        self.sums.index_add_(0, rows, sums)
        self.weights.index_add_(0, rows, weights)

    def _reserve(self, need: int) -> None:
        if need <= len(self.weights):
            return
        pad = max(need, 2 * len(self.weights), 4096) - len(self.weights)  # doubling: few copies
        self.sums = torch.cat([self.sums, self.sums.new_zeros(pad, self.sums.shape[1])])
        self.weights = torch.cat([self.weights, self.weights.new_zeros(pad)])
        self.cell = torch.cat([self.cell, self.cell.new_zeros(pad)])

    def means(self) -> tuple[torch.Tensor, torch.Tensor]:
        """Cell ids (K,) in increasing order and their weighted mean features (K, D), cells with weight only."""
        w = self.weights[: self.n]
        keep = torch.nonzero(w > 0).reshape(-1)
        keep = keep[torch.argsort(self.cell[keep])]
        return self.cell[keep], self.sums[keep] / w[keep, None]


@torch.no_grad()
def lift_features(model: GridModel, data: Dataset, maps, n_voxels: int = 96**3, chunk: int = 8192,
                  weight_threshold: float = 1e-3, progress: Callable[[int], None] | None = None) -> LiftedFeatures:
    """Average `maps` (teacher features of `data`'s views) into a voxel grid over the model's box.

    Only cells that receive weight are kept (while lifting and in the result), rounded to fp16 precision.
    `progress(views_done)` is called after each view."""
    t0 = time.perf_counter()
    aabb = model.field.aabb.detach().cpu().clone()  # the grid's own box: must not follow later changes of the field's
    res = voxel_res(aabb, n_voxels)
    acc = _TouchedCellSums(res[0] * res[1] * res[2], maps.dim)
    for i in range(len(data)):
        rays = image_rays(data, i)
        v, u = torch.meshgrid(torch.arange(data.height) + 0.5, torch.arange(data.width) + 0.5, indexing="ij")
        for s in range(0, len(rays), chunk):
            r = rays[s : s + chunk]
            cam = torch.full((len(r),), i, dtype=torch.long)
            goal = maps.sample(cam, u.reshape(-1)[s : s + chunk], v.reshape(-1)[s : s + chunk]).float()
            smp = march(r, model.field.aabb, model.near, model.far, model.step, model.occupancy)
            sigma = scatter_samples(smp.mask, model.field.density(smp.positions))
            w = weights_from_density(sigma, smp.dt)[0][smp.mask]
            keep = w > weight_threshold
            pos, w, ray = smp.positions[keep].cpu(), w[keep].cpu(), smp.ray_index[keep].cpu()
            ids, tw = _trilinear((pos - aabb[0]) / (aabb[1] - aabb[0]), res)
            cw = (tw * w[:, None]).reshape(-1)  # (M * 8,)
            # One sparse (cells touched x rays) product instead of an (M * 8, D) tensor of weighted copies:
            # with a 384-d teacher that copy alone is gigabytes per chunk.
            cells, inv = torch.unique(ids.reshape(-1), return_inverse=True)
            splat = torch.sparse_coo_tensor(torch.stack([inv, ray.repeat_interleave(8)]), cw, (len(cells), len(r)),
                                            check_invariants=False)
            acc.add(cells, torch.sparse.mm(splat, goal), torch.zeros(len(cells)).index_add_(0, inv, cw))
        if progress is not None:
            progress(i + 1)
    cells, values = acc.means()
    lifted = _compact(aabb, res, cells, values.half().float())
    lifted.seconds = time.perf_counter() - t0
    return lifted
