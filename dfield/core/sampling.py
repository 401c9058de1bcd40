"""Where along each ray to evaluate the field: ray-box clipping, an occupancy grid, and uniform marching.

On a CPU every evaluated point costs, so empty space is skipped twice: rays are clipped to the scene box,
and samples falling in cells the occupancy grid marks empty are dropped before the field sees them.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F

from dfield.core.grids import cell_centers, cell_index
from dfield.core.rays import Rays


def ray_aabb(rays: Rays, aabb: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Entry and exit distances of each ray through the box; exit < entry when the ray misses."""
    d = torch.where(rays.directions.abs() < 1e-9, torch.full_like(rays.directions, 1e-9), rays.directions)
    t0 = (aabb[0] - rays.origins) / d
    t1 = (aabb[1] - rays.origins) / d
    return torch.minimum(t0, t1).amax(-1), torch.maximum(t0, t1).amin(-1)


class OccupancyGrid:
    """A boolean grid over a box marking cells where the field may have density."""

    def __init__(self, aabb: torch.Tensor, resolution: int):
        self.aabb = aabb.clone().float()
        self.resolution = resolution
        self.occupied = torch.ones((resolution,) * 3, dtype=torch.bool, device=aabb.device)

    def query(self, pts: torch.Tensor) -> torch.Tensor:
        """(N, 3) points -> (N,) bool: inside the box and in a cell marked occupied."""
        flat, inside = cell_index(pts, self.aabb, (self.resolution,) * 3)
        return self.occupied.reshape(-1)[flat] & inside

    def cell_centers(self) -> torch.Tensor:
        """(resolution^3, 3) cell centres, in the order of `occupied.reshape(-1)`."""
        return cell_centers(self.aabb, (self.resolution,) * 3)

    @torch.no_grad()
    def update(self, density_fn, step: float, threshold: float = 1e-4, chunk: int = 2**18, dilate: int = 1) -> float:
        """Re-mark cells from the field's density at their centres. Returns the occupied fraction.

        A cell is kept when a step of length `step` through it would be at least `threshold` opaque,
        then the mask is dilated so thin structures between cell centres are not cut.
        """
        pts = self.cell_centers()
        alpha = torch.cat([1 - torch.exp(-density_fn(p) * step) for p in pts.split(chunk)])
        occ = alpha.reshape((self.resolution,) * 3)
        if dilate > 0:
            k = 2 * dilate + 1
            occ = F.max_pool3d(occ[None, None], k, stride=1, padding=dilate)[0, 0]
        self.occupied = occ > threshold
        return self.occupied.float().mean().item()

    def occupied_aabb(self) -> torch.Tensor:
        """The tight box around occupied cells (the whole box when nothing is occupied)."""
        idx = self.occupied.nonzero()
        if len(idx) == 0:
            return self.aabb.clone()
        size = (self.aabb[1] - self.aabb[0]) / self.resolution
        lo = self.aabb[0] + idx.amin(0).float() * size
        hi = self.aabb[0] + (idx.amax(0).float() + 1) * size
        return torch.stack([lo, hi])

    def state(self) -> dict[str, torch.Tensor]:
        """The grid as tensors to save: aabb (2, 3) and occupied (res, res, res) as uint8."""
        return {"aabb": self.aabb, "occupied": self.occupied.to(torch.uint8)}

    def load(self, state: dict[str, torch.Tensor]) -> None:
        """Restore the grid from `state()` output; the resolution comes from the saved mask."""
        self.aabb = state["aabb"].float()
        self.occupied = state["occupied"].bool()
        self.resolution = self.occupied.shape[0]


@dataclass
class RaySamples:
    """Padded samples: `t` (R, S) midpoints, `dt` (R, S) lengths, `mask` (R, S) which ones to evaluate."""

    t: torch.Tensor
    dt: torch.Tensor
    mask: torch.Tensor
    positions: torch.Tensor  # (M, 3) positions of the masked samples, in mask order
    ray_index: torch.Tensor  # (M,) which ray each masked sample belongs to


def march(
    rays: Rays,
    aabb: torch.Tensor,
    near: float,
    far: float,
    step: float,
    occupancy: OccupancyGrid | None = None,
    jitter: torch.Generator | None = None,
    max_samples: int = 1024,
) -> RaySamples:
    """Uniform steps of length `step` through the box, one jitter offset per ray when training.

    Samples sit at t = near + (k + offset) * step for whole k, anchored at the near plane rather than at
    the box entry: a larger box (an edit that moves or adds content) then evaluates the field at exactly
    the same points along every ray, so renders outside the edit stay as they were.
    """
    t_in, t_out = ray_aabb(rays, aabb)
    t_in = t_in.clamp(min=near)
    t_out = t_out.clamp(max=far)
    hit = t_out > t_in
    k0 = torch.where(hit, torch.floor((t_in - near) / step), torch.zeros_like(t_in))
    span = torch.where(hit, t_out - (near + k0 * step), torch.zeros_like(t_in))
    n = int(torch.ceil(span.max() / step).item()) + 1 if hit.any() else 0
    n = max(1, min(n, max_samples))
    device = rays.origins.device
    if jitter is not None:
        offset = torch.rand(len(rays), 1, generator=jitter).to(device)
    else:
        offset = torch.full((len(rays), 1), 0.5, device=device)
    k = k0[:, None] + torch.arange(n, device=device, dtype=torch.float32)
    t = near + (k + offset) * step
    mask = hit[:, None] & (t >= t_in[:, None]) & (t < t_out[:, None])
    ray_index = mask.nonzero()[:, 0]
    positions = rays.origins[ray_index] + rays.directions[ray_index] * t[mask][:, None]
    if occupancy is not None and len(positions):
        keep = occupancy.query(positions)
        mask = mask.clone()
        mask[mask.clone()] = keep
        ray_index, positions = ray_index[keep], positions[keep]
    # Step length in the ray's own units: with unit directions this is the world distance.
    dt = torch.full_like(t, step) * rays.directions.norm(dim=-1, keepdim=True)
    return RaySamples(t=t, dt=dt, mask=mask, positions=positions, ray_index=ray_index)
