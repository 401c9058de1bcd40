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
    surface, not the box: `grid` is (1 + K, D) with row 0 all zeros for the cells no ray saw, and `rows`
    (cells,) gives each cell's row."""

    aabb: torch.Tensor
    res: tuple[int, int, int]
    grid: torch.Tensor
    rows: torch.Tensor
    seconds: float = 0.0

    def features(self, x: torch.Tensor) -> torch.Tensor:
        """(N, 3) world points -> (N, D) teacher-space features, trilinear between cell centres."""
        u = (x - self.aabb[0]) / (self.aabb[1] - self.aabb[0])
        ids, w = trilinear_corners(u, self.res)
        return torch.nn.functional.embedding_bag(self.rows[ids], self.grid, per_sample_weights=w, mode="sum")

    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        return self.features(x)

    def to(self, device) -> "LiftedFeatures":
        """The same features with their tensors on `device`."""
        return LiftedFeatures(self.aabb.to(device), self.res, self.grid.to(device), self.rows.to(device), self.seconds)

    def state(self) -> dict[str, torch.Tensor]:
        """Tensors for a checkpoint: the occupied cells' ids and their rows in fp16 (the precision of the
        teacher maps they average; lift_features already rounds to it, so a reload renders the same)."""
        cells = torch.nonzero(self.rows).reshape(-1)
        return {"aabb": self.aabb, "res": torch.tensor(self.res, dtype=torch.int64), "cells": cells.to(torch.int32),
                "grid": self.grid[self.rows[cells]].half()}

    @staticmethod
    def from_state(t: dict[str, torch.Tensor]) -> "LiftedFeatures":
        """Rebuild from `state()` output (rows back in float32; `seconds` is not saved and comes back 0)."""
        res = tuple(int(r) for r in t["res"])
        return compact_lifted(t["aabb"].float(), res, t["cells"].long(), t["grid"].float())


def compact_lifted(aabb: torch.Tensor, res: tuple[int, int, int], cells: torch.Tensor, values: torch.Tensor) -> LiftedFeatures:
    """LiftedFeatures holding `values` (K, D) at cell ids `cells` (K,) and zeros elsewhere."""
    rows = torch.zeros(res[0] * res[1] * res[2], dtype=torch.long, device=values.device)
    rows[cells] = torch.arange(1, len(cells) + 1, device=values.device)
    grid = torch.cat([values.new_zeros(1, values.shape[1]), values])
    return LiftedFeatures(aabb, res, grid, rows)
