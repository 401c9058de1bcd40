"""One-pass feature lifting: no training, just a weighted average of teacher features per voxel.

Every training ray carries its teacher feature; each sample along it splats that feature into the voxels
around it with the sample's rendering weight. A voxel's feature is the weighted mean of what it received.
The trained radiance field supplies the weights, so features land where the surfaces are.
"""

from __future__ import annotations

import time
from dataclasses import dataclass

import torch

from dfield.data.dataset import Dataset
from dfield.models.grid import GridModel, voxel_res
from dfield.rays import image_rays
from dfield.render import scatter_samples, weights_from_density
from dfield.sampling import march


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
    aabb: torch.Tensor
    res: tuple[int, int, int]
    grid: torch.Tensor  # (cells, D) weighted-mean teacher features
    seconds: float = 0.0

    def features(self, x: torch.Tensor) -> torch.Tensor:
        u = (x - self.aabb[0]) / (self.aabb[1] - self.aabb[0])
        ids, w = _trilinear(u, self.res)
        return torch.nn.functional.embedding_bag(ids, self.grid, per_sample_weights=w, mode="sum")


@torch.no_grad()
def lift_features(model: GridModel, data: Dataset, maps, n_voxels: int = 96**3, chunk: int = 8192,
                  weight_threshold: float = 1e-3) -> LiftedFeatures:
    """Average `maps` (teacher features of `data`'s views) into a voxel grid over the model's box."""
    t0 = time.perf_counter()
    aabb = model.field.aabb.detach().cpu()
    res = voxel_res(aabb, n_voxels)
    n_cells = res[0] * res[1] * res[2]
    acc, wsum = None, torch.zeros(n_cells)
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
            cw = tw * w[:, None]  # (M, 8)
            if acc is None:
                acc = torch.zeros(n_cells, goal.shape[1])
            acc.index_add_(0, ids.reshape(-1), (cw[..., None] * goal[ray][:, None, :]).reshape(-1, goal.shape[1]))
            wsum.index_add_(0, ids.reshape(-1), cw.reshape(-1))
    grid = acc / wsum.clamp(min=1e-8)[:, None]
    return LiftedFeatures(aabb, res, grid, time.perf_counter() - t0)
