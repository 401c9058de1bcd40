"""Regular grids over a box: resolution from a voxel budget, cell centres, cell lookup and trilinear corners.

One definition of each, shared by the occupancy grid, the factorised volumes' schedule, lifted feature grids,
voxelised selections and meshing, so they all agree on where a cell is.
"""

from __future__ import annotations

import torch


def voxel_res(aabb: torch.Tensor, n_voxels: int, minimum: int = 2, aspect=(1.0, 1.0, 1.0)) -> tuple[int, int, int]:
    """Per-axis resolution giving (nearly) cubic voxels and about `n_voxels` cells over the box.

    Args:
        aabb: (2, 3) min and max corner.
        n_voxels: the cell budget (e.g. 128**3).
        minimum: fewest cells along any axis.
        aspect: relative voxel size per axis ((1, 1, 4): voxels four times as deep as they are wide).

    Example:
        >>> voxel_res(torch.tensor([[0.0, 0.0, 0.0], [2.0, 1.0, 1.0]]), 2 * 16**3)
        (32, 16, 16)
        >>> voxel_res(torch.tensor([[0.0, 0.0, 0.0], [1.0, 1.0, 1.0]]), 16**3, aspect=(1, 1, 4))
        (25, 25, 6)
    """
    size = [s / a for s, a in zip((aabb[1] - aabb[0]).tolist(), aspect)]
    voxel = (size[0] * size[1] * size[2] / n_voxels) ** (1 / 3)
    return tuple(max(minimum, int(round(s / voxel))) for s in size)


def cell_centers(aabb: torch.Tensor, res: tuple[int, int, int]) -> torch.Tensor:
    """(res[0] * res[1] * res[2], 3) world positions of the cell centres, x-major (cell (i, j, k) is row
    (i * res[1] + j) * res[2] + k)."""
    axes = [(torch.arange(r, device=aabb.device, dtype=torch.float32) + 0.5) / r for r in res]
    g = torch.stack(torch.meshgrid(*axes, indexing="ij"), -1).reshape(-1, 3)
    return aabb[0] + g * (aabb[1] - aabb[0])


def cell_index(points: torch.Tensor, aabb: torch.Tensor, res) -> tuple[torch.Tensor, torch.Tensor]:
    """Flat ids (N,) of the cells holding `points` (N, 3), in the order of `cell_centers`, and whether each point
    lies inside the box (N,) bool. Points outside get the id of the nearest border cell."""
    res_t = torch.as_tensor(res, device=points.device)
    u = (points - aabb[0]) / (aabb[1] - aabb[0])
    inside = ((u >= 0) & (u <= 1)).all(-1)
    ijk = torch.minimum((u * res_t).long().clamp(min=0), res_t - 1)
    return (ijk[:, 0] * res_t[1] + ijk[:, 1]) * res_t[2] + ijk[:, 2], inside


def trilinear_corners(u: torch.Tensor, res: tuple[int, int, int]) -> tuple[torch.Tensor, torch.Tensor]:
    """Trilinear interpolation on a grid whose nodes are at the corners of [0, 1]^3 (node i at i / (res - 1)).

    Args:
        u: (N, 3) coordinates in [0, 1] (clamped).
        res: nodes per axis.

    Returns:
        ids (N, 8) flat node ids (x-major) and weights (N, 8) summing to 1 per point.
    """
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
