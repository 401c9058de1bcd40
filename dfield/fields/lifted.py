"""Lifted features: teacher-space features stored per voxel, a field with no training (see dfield.features.lifting,
which makes them by averaging teacher features along training rays)."""

from __future__ import annotations

from dataclasses import dataclass

import torch

from dfield.core.grids import trilinear_corners


@dataclass
class LiftedFeatures:
    """Teacher-space features per voxel of a res grid over aabb, trilinearly interpolated between cell centres.

    Only cells that received weight hold a row, so a wide (384-d) teacher costs memory in proportion to the
    surface, not the box: `grid` is (1 + K, k) with row 0 all zeros for the cells no ray saw, and `rows`
    (cells,) gives each cell's row. With a `basis` (k, D) the rows are coordinates in it (`compress_lifted`): the
    field renders k-wide features and `decode` maps them, or their composite along a ray, to teacher space
    (compositing is linear, so decoding after it is exact); without one, k = D and rows are teacher features."""

    aabb: torch.Tensor
    res: tuple[int, int, int]
    grid: torch.Tensor
    rows: torch.Tensor
    seconds: float = 0.0
    basis: torch.Tensor | None = None

    def features(self, x: torch.Tensor) -> torch.Tensor:
        """(N, 3) world points -> (N, k) features (teacher space without a basis), trilinear between cell centres."""
        u = (x - self.aabb[0]) / (self.aabb[1] - self.aabb[0])
        ids, w = trilinear_corners(u, self.res)
        return torch.nn.functional.embedding_bag(self.rows[ids], self.grid, per_sample_weights=w, mode="sum")

    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        return self.features(x)

    @property
    def teacher_dim(self) -> int:
        """D, the width of the teacher's features."""
        return self.grid.shape[1] if self.basis is None else self.basis.shape[1]

    def decode(self, f: torch.Tensor) -> torch.Tensor:
        """(..., k) features or their weighted sums -> (..., D) in teacher space."""
        return f if self.basis is None else f @ self.basis

    def to(self, device) -> "LiftedFeatures":
        """The same features with their tensors on `device`."""
        basis = None if self.basis is None else self.basis.to(device)
        return LiftedFeatures(self.aabb.to(device), self.res, self.grid.to(device), self.rows.to(device), self.seconds, basis)

    def state(self) -> dict[str, torch.Tensor]:
        """Tensors for a checkpoint: the occupied cells' ids and their rows in fp16 (the precision of the
        teacher maps they average; lift_features already rounds to it, so a reload renders the same), and the
        basis when there is one."""
        cells = torch.nonzero(self.rows).reshape(-1)
        out = {"aabb": self.aabb, "res": torch.tensor(self.res, dtype=torch.int64), "cells": cells.to(torch.int32),
               "grid": self.grid[self.rows[cells]].half()}
        if self.basis is not None:
            out["basis"] = self.basis
        return out

    @staticmethod
    def from_state(t: dict[str, torch.Tensor]) -> "LiftedFeatures":
        """Rebuild from `state()` output (rows back in float32; `seconds` is not saved and comes back 0)."""
        res = tuple(int(r) for r in t["res"])
        lifted = compact_lifted(t["aabb"].float(), res, t["cells"].long(), t["grid"].float())
        lifted.basis = t["basis"].float() if "basis" in t else None
        return lifted


def compact_lifted(aabb: torch.Tensor, res: tuple[int, int, int], cells: torch.Tensor, values: torch.Tensor) -> LiftedFeatures:
    """LiftedFeatures holding `values` (K, D) at cell ids `cells` (K,) and zeros elsewhere."""
    rows = torch.zeros(res[0] * res[1] * res[2], dtype=torch.long, device=values.device)
    rows[cells] = torch.arange(1, len(cells) + 1, device=values.device)
    grid = torch.cat([values.new_zeros(1, values.shape[1]), values])
    return LiftedFeatures(aabb, res, grid, rows)


def compress_lifted(lifted: LiftedFeatures, energy: float = 0.9995) -> LiftedFeatures:
    """The same features in the fewest principal directions of the cells' rows that keep `energy` of their summed
    squares (uncentred: empty cells stay exactly zero). Features averaged over a scene's few objects lie close to a
    low-dimensional subspace, so a 384-d teacher typically needs a few dozen; every render, query and selection
    then handles k-wide features and decodes once per pixel. Returned unchanged when that saves less than half.

    Each feature moves by sqrt(1 - energy) of its length or less on average (2.2 % at the default): cosine
    similarities, what queries compare, change by about (1 - energy) / 2.

    Example:
        >>> import torch
        >>> values = torch.randn(50, 2) @ torch.randn(2, 40)            # 40-d features of rank 2
        >>> lifted = compress_lifted(compact_lifted(torch.tensor([[0.0] * 3, [1.0] * 3]), (4, 4, 4), torch.arange(50), values))
        >>> lifted.grid.shape[1], lifted.teacher_dim
        (2, 40)
        >>> x = torch.rand(5, 3)
        >>> full = compact_lifted(torch.tensor([[0.0] * 3, [1.0] * 3]), (4, 4, 4), torch.arange(50), values)
        >>> torch.allclose(lifted.decode(lifted(x)), full(x), atol=1e-2)  # coefficients are stored in fp16
        True
    """
    if lifted.basis is not None:
        return lifted
    x = lifted.grid[1:].double()
    evals, evecs = torch.linalg.eigh(x.T @ x)  # ascending
    evals, evecs = evals.flip(0).clamp(min=0), evecs.flip(1)
    total = float(evals.sum())
    if total <= 0:
        return lifted
    k = int((torch.cumsum(evals, 0) < energy * total).sum()) + 1
    if 2 * k > x.shape[1]:
        return lifted
    basis = evecs[:, :k]
    # Rounded to fp16 like the rows they replace, so a checkpoint (fp16 rows) reloads to exactly this.
    grid = torch.cat([lifted.grid.new_zeros(1, k), (x @ basis).half().to(lifted.grid.dtype)])
    return LiftedFeatures(lifted.aabb, lifted.res, grid, lifted.rows, lifted.seconds, basis.T.float().contiguous())
