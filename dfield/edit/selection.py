"""Selections: functions of 3D points giving how much each point belongs to what a query named.

A query scores features; a selection scores points. Scoring every render sample through the feature field
and decoder is slow and speckled, so `VoxelSelection` scores the occupied cells of a grid once, optionally
grows the hard mask by a cell or two (object boundaries are where features blur), and afterwards looks
points up. Edits only ever ask a selection `mask(x)`.
"""

from __future__ import annotations

from typing import Callable

import numpy as np
import torch
import torch.nn.functional as F
from scipy import ndimage

from dfield.core.grids import cell_centers, cell_index, voxel_res
from dfield.errors import QueryError
from dfield.query.sets import QuerySet


class Selection:
    """Base of all selections: `prob` scores points in [0, 1]; a point is selected when its score >= `threshold`."""

    threshold: float = 0.5

    def prob(self, x: torch.Tensor) -> torch.Tensor:
        """(N, 3) points -> (N,) soft selection in [0, 1]."""
        raise NotImplementedError

    def mask(self, x: torch.Tensor) -> torch.Tensor:
        """(N, 3) points -> (N,) bool: selected (`prob` >= `threshold`)."""
        return self.prob(x) >= self.threshold


class BoxSelection(Selection):
    """Everything inside an axis-aligned world box: for scripted edits and for tests."""

    def __init__(self, lo, hi):
        self.lo, self.hi = torch.as_tensor(lo, dtype=torch.float32), torch.as_tensor(hi, dtype=torch.float32)
        if not (self.lo < self.hi).all():
            raise QueryError(f"box selection needs lo < hi on every axis, got {self.lo.tolist()} / {self.hi.tolist()}")

    def prob(self, x: torch.Tensor) -> torch.Tensor:
        return ((x >= self.lo.to(x)) & (x <= self.hi.to(x))).all(-1).float()


class FeatureSelection(Selection):
    """p(query | feature(x)) straight from a field's (teacher-space) features; exact but slow per point."""

    def __init__(self, features: Callable[[torch.Tensor], torch.Tensor], query: QuerySet, threshold: float = 0.5):
        self.features, self.query, self.threshold = features, query, threshold

    def prob(self, x: torch.Tensor) -> torch.Tensor:
        return self.query.probability(self.features(x)) if len(x) else x.new_zeros(0)


class VoxelSelection(Selection):
    """A selection sampled at cell centres of a grid over `aabb`, read back by nearest cell."""

    def __init__(self, aabb: torch.Tensor, prob: torch.Tensor, threshold: float = 0.5):
        self.aabb, self.grid, self.threshold = aabb.float(), prob.float(), threshold
        self.res = torch.tensor(prob.shape)

    @staticmethod
    @torch.no_grad()
    def sample(source: Selection, aabb: torch.Tensor, resolution: int = 128, occupied=None, dilate: int = 0,
               chunk: int = 2**16, low: float | None = None, seeds: torch.Tensor | None = None,
               fill_interior: bool = True, density: Callable[[torch.Tensor], torch.Tensor] | None = None,
               probe: int = 3) -> "VoxelSelection":
        """Score `source` at the cell centres (only where `occupied.query` says there may be matter), then clean up.

        Feature queries are noisy per cell, so the hard selection is grown from confident cells into connected
        cells scoring at least `low` (hysteresis: boundary cells where features blur join their object), and only
        connected pieces that hold a `seeds` point (the 3D point a click or patch landed on) are kept, so
        look-alike specks elsewhere in the scene are not edited with it. `dilate` then grows the result by
        whole cells. With `fill_interior`, cells buried inside matter (not next to empty space reachable from the
        box's border) take the selection of the nearest surface cell: a deleted object leaves no core behind.
        With `density`, each cell is scored at the densest of `probe`^3 points spread over it instead of at its
        centre: features are only trained where rendering weight falls, and a thin surface (a ground plane)
        misses most cell centres, which then read the untrained features of its faint halo.
        """
        aabb = aabb.float()
        size = aabb[1] - aabb[0]
        res = list(voxel_res(aabb, resolution**3))
        pts = cell_centers(aabb.cpu(), res)
        keep = torch.ones(len(pts), dtype=torch.bool) if occupied is None else occupied.query(pts).cpu()
        surface, nearest = _surface(keep.reshape(res)) if fill_interior and occupied is not None else (keep, None)
        prob = torch.zeros(len(pts))
        idx = surface.reshape(-1).nonzero()[:, 0]
        cell = size / torch.tensor(res, dtype=torch.float32)
        batch = max(1, chunk // probe**3) if density is not None and probe > 1 else chunk
        for part in idx.split(batch):
            x = pts[part].to(aabb.device)
            if density is not None and probe > 1:
                x = densest_points(density, x, cell.to(x), probe)
            prob[part] = source.prob(x).float().cpu()
        grid = prob.reshape(res)
        if nearest is not None:
            # Inside solid matter nothing was ever seen, so features there mean nothing: take the nearest surface's.
            grid = torch.where(keep.reshape(res), grid[tuple(nearest)], grid)
        threshold = source.threshold
        if low is not None or seeds is not None:
            grid = _connected(grid, threshold, threshold if low is None else low, seeds, aabb).float()
            threshold = 0.5
        if dilate > 0:
            grid = F.max_pool3d(grid[None, None], 2 * dilate + 1, stride=1, padding=dilate)[0, 0]
        return VoxelSelection(aabb, grid, threshold)

    def prob(self, x: torch.Tensor) -> torch.Tensor:
        flat, inside = cell_index(x, self.aabb.to(x), self.res)
        return torch.where(inside, self.grid.to(x.device).reshape(-1)[flat], x.new_zeros(()))

    def voxel_count(self) -> int:
        """Number of selected cells (score >= `threshold`)."""
        return int((self.grid >= self.threshold).sum())


def densest_points(density: Callable[[torch.Tensor], torch.Tensor], centres: torch.Tensor, cell: torch.Tensor,
                   k: int) -> torch.Tensor:
    """For each cell centre, the point of highest density on a k x k x k lattice of sub-cell centres."""
    a = (torch.arange(k, dtype=centres.dtype, device=centres.device) + 0.5) / k - 0.5
    offsets = torch.stack(torch.meshgrid(a, a, a, indexing="ij"), -1).reshape(-1, 3) * cell
    pts = centres[:, None] + offsets[None]
    best = density(pts.reshape(-1, 3)).reshape(len(centres), -1).argmax(1)
    return pts[torch.arange(len(centres), device=centres.device), best]


def selection_bounds(selection: Selection, fallback: torch.Tensor) -> torch.Tensor:
    """A world box holding the selection (`fallback` when the selection cannot say)."""
    if isinstance(selection, BoxSelection):
        return torch.stack([selection.lo, selection.hi])
    if isinstance(selection, VoxelSelection):
        idx = (selection.grid >= selection.threshold).nonzero()
        if len(idx):
            cell = (selection.aabb[1] - selection.aabb[0]) / selection.res
            return torch.stack([selection.aabb[0] + idx.amin(0) * cell, selection.aabb[0] + (idx.amax(0) + 1) * cell])
    return fallback.float()


def _connected(grid: torch.Tensor, high: float, low: float, seeds: torch.Tensor | None, aabb: torch.Tensor) -> torch.Tensor:
    """Hysteresis on a probability grid, keeping the 26-connected pieces that touch a seed (all, without seeds)."""
    labels, n = ndimage.label((grid >= low).numpy(), structure=np.ones((3, 3, 3)))
    labels = torch.from_numpy(labels)
    strong = torch.unique(labels[grid >= high])
    wanted = strong[strong > 0]
    if seeds is not None and len(wanted):
        res = torch.tensor(grid.shape)
        ijk = ((seeds.float().cpu() - aabb[0]) / (aabb[1] - aabb[0]) * res).long()
        near = set()
        for c in ijk:  # a seed sits on a surface, so look a couple of cells around it
            lo, hi = (c - 2).clamp(min=0), torch.minimum(c + 3, res)
            near.update(torch.unique(labels[lo[0]:hi[0], lo[1]:hi[1], lo[2]:hi[2]]).tolist())
        seeded = wanted[torch.tensor([int(w) in near for w in wanted], dtype=torch.bool)]
        wanted = seeded if len(seeded) else wanted
    return torch.isin(labels, wanted) & (labels > 0)


def _surface(dense: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Dense cells next to outside empty space, and for every cell the index of the nearest such cell."""
    d = dense.numpy()
    labels, _ = ndimage.label(~d, structure=np.ones((3, 3, 3)))
    border = np.unique(np.concatenate([labels[[0, -1]].ravel(), labels[:, [0, -1]].ravel(), labels[:, :, [0, -1]].ravel()]))
    outside = np.isin(labels, border[border > 0])
    surface = d & ndimage.binary_dilation(outside, structure=np.ones((3, 3, 3)))
    if not surface.any():
        return dense, None
    nearest = ndimage.distance_transform_edt(~surface, return_distances=False, return_indices=True)
    return torch.from_numpy(surface), torch.from_numpy(nearest)
