"""One-pass feature lifting: no training, just a weighted average of teacher features per voxel.

Every training ray carries its teacher feature; each sample along it splats that feature into the voxels
around it with the sample's rendering weight. A voxel's feature is the weighted mean of what it received.
The trained radiance field supplies the weights, so features land where the surfaces are.
"""

from __future__ import annotations

import dataclasses
import time
from collections.abc import Callable

import torch

from dfield.core.grids import trilinear_corners, voxel_res
from dfield.core.rays import image_rays
from dfield.core.rendering import visible_samples
from dfield.data.dataset import Dataset
from dfield.fields.lifted import LiftedFeatures, compact_lifted, compress_lifted
from dfield.models.grid import GridModel


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
                  weight_threshold: float = 1e-3, energy: float | None = 0.9995,
                  progress: Callable[[str, int, int, dict | None], None] | None = None) -> LiftedFeatures:
    r"""Average `maps` (teacher features of `data`'s views) into a voxel grid over the model's box.

    .. math::
        f(c) = \frac{\sum_{r, i} w_{r,i} \, k_c(x_{r,i}) \, F(r)}{\sum_{r, i} w_{r,i} \, k_c(x_{r,i})}

    over training rays r and their samples i (rendering weight w, trilinear weight k_c of cell c at the sample,
    teacher feature F at the ray's pixel). Only cells that receive weight are kept (while lifting and in the
    result), rounded to fp16 precision, and stored in the principal directions that keep `energy` of them
    (`compress_lifted`; None keeps all D). `progress("lift", views_done, views, None)` is called after each view.

    Args:
        model: a trained grid model (its density gives the weights; it is not changed).
        data: the training views `maps` belong to.
        maps: FeatureMaps of `data`.
        n_voxels: cell budget of the lifted grid over the model's box.

    Returns:
        LiftedFeatures (set them on the model with `model.set_lifted_features`).
    """
    t0 = time.perf_counter()
    aabb = model.field.aabb.detach().cpu().clone()  # the grid's own box: must not follow later changes of the field's
    res = voxel_res(aabb, n_voxels)
    acc = _TouchedCellSums(res[0] * res[1] * res[2], maps.dim)
    rs = dataclasses.replace(model.render_settings(), weight_threshold=weight_threshold)
    field = model.as_field()
    for i in range(len(data)):
        rays = image_rays(data, i)
        v, u = torch.meshgrid(torch.arange(data.height) + 0.5, torch.arange(data.width) + 0.5, indexing="ij")
        for s in range(0, len(rays), chunk):
            r = rays[s : s + chunk]
            cam = torch.full((len(r),), i, dtype=torch.long)
            goal = maps.sample(cam, u.reshape(-1)[s : s + chunk], v.reshape(-1)[s : s + chunk]).float()
            seen = visible_samples(field, r, rs)
            ray, w = seen.ray.cpu(), seen.weight.cpu()
            pos = (r.origins[seen.ray] + r.directions[seen.ray] * seen.t[:, None]).cpu()
            ids, tw = trilinear_corners((pos - aabb[0]) / (aabb[1] - aabb[0]), res)
            cw = (tw * w[:, None]).reshape(-1)  # (M * 8,)
            # One sparse (cells touched x rays) product instead of an (M * 8, D) tensor of weighted copies:
            # with a 384-d teacher that copy alone is gigabytes per chunk.
            cells, inv = torch.unique(ids.reshape(-1), return_inverse=True)
            splat = torch.sparse_coo_tensor(torch.stack([inv, ray.repeat_interleave(8)]), cw, (len(cells), len(r)),
                                            check_invariants=False)
            acc.add(cells, torch.sparse.mm(splat, goal), torch.zeros(len(cells)).index_add_(0, inv, cw))
        if progress is not None:
            progress("lift", i + 1, len(data), None)
    cells, values = acc.means()
    lifted = compact_lifted(aabb, res, cells, values.half().float())
    if energy is not None:
        lifted = compress_lifted(lifted, energy)
    lifted.seconds = time.perf_counter() - t0
    return lifted
