"""Pixels -> rays, and the random ray batches the trainer draws.

Rays of non-NDC scenes have unit-length directions, so `t` along a ray is a distance in world units and
a rendered depth is the distance from the camera centre.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from dfield.core.pixels import PixelRuns
from dfield.data.dataset import Cameras, Dataset
from dfield.data.store import trim


@dataclass
class Rays:
    """A batch of R rays: origins and directions, both (R, 3); index or slice it like a tensor."""

    origins: torch.Tensor  # (R, 3)
    directions: torch.Tensor  # (R, 3)

    def __len__(self) -> int:
        return self.origins.shape[0]

    def __getitem__(self, sl) -> "Rays":
        return Rays(self.origins[sl], self.directions[sl])

    def to(self, device) -> "Rays":
        """The same rays on `device`."""
        return Rays(self.origins.to(device), self.directions.to(device))


def camera_rays(cameras: Cameras, cam_idx: torch.Tensor, u: torch.Tensor, v: torch.Tensor) -> Rays:
    """Rays through pixel coordinates (u right, v down; pixel centres at +0.5) of the given cameras."""
    c2w = cameras.c2w[cam_idx]
    x = (u - cameras.cx[cam_idx]) / cameras.fx[cam_idx]
    y = -(v - cameras.cy[cam_idx]) / cameras.fy[cam_idx]  # image v grows down, camera y up (OpenGL)
    d_cam = torch.stack([x, y, -torch.ones_like(x)], -1)
    d = (c2w[:, :, :3] @ d_cam[..., None])[..., 0]
    return Rays(c2w[:, :, 3].expand_as(d).contiguous(), d)


def to_ndc(rays: Rays, focal: float, width: int, height: int, near: float = 1.0) -> Rays:
    """Map forward-facing rays into normalised device coordinates (the NeRF LLFF convention)."""
    o, d = rays.origins, rays.directions
    t = -(near + o[:, 2]) / d[:, 2]
    o = o + t[:, None] * d
    ox, oy, oz = o.unbind(-1)
    dx, dy, dz = d.unbind(-1)
    ax, ay = -2.0 * focal / width, -2.0 * focal / height
    o_ndc = torch.stack([ax * ox / oz, ay * oy / oz, 1.0 + 2.0 * near / oz], -1)
    d_ndc = torch.stack([ax * (dx / dz - ox / oz), ay * (dy / dz - oy / oz), -2.0 * near / oz], -1)
    return Rays(o_ndc, d_ndc)


def ndc_to_world(points: torch.Tensor, focal: float, width: int, height: int, near: float = 1.0) -> torch.Tensor:
    """Inverse of `to_ndc` for points: (N, 3) NDC (x, y, z) -> (N, 3) in the forward-facing world frame."""
    ax, ay = -2.0 * focal / width, -2.0 * focal / height
    z = 2.0 * near / (points[:, 2] - 1.0).clamp(max=-1e-6)
    return torch.stack([points[:, 0] * z / ax, points[:, 1] * z / ay, z], -1)


def pixel_coords(ids: torch.Tensor, width: int, height: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Flat pixel ids over a stack of views (view-major, then row-major) -> (view, u, v).

    `u`, `v` are float pixel-centre coordinates (x + 0.5, y + 0.5), the convention of `camera_rays` and of
    teacher feature sampling.

    Example:
        >>> pixel_coords(torch.tensor([0, 7, 13]), width=4, height=3)
        (tensor([0, 0, 1]), tensor([0.5000, 3.5000, 1.5000]), tensor([0.5000, 1.5000, 0.5000]))
    """
    hw = width * height
    cam, pix = ids // hw, ids % hw
    return cam, (pix % width).float() + 0.5, (pix // width).float() + 0.5


def field_rays(cameras: Cameras, cam_idx, u, v, ndc: tuple[float, int, int] | None = None) -> Rays:
    """Camera rays in the space the field lives in: unit directions, or NDC (focal, W, H) for forward-facing scenes."""
    rays = camera_rays(cameras, cam_idx, u, v)
    if ndc is not None:
        return to_ndc(rays, *ndc)
    return Rays(rays.origins, torch.nn.functional.normalize(rays.directions, dim=-1))


def dataset_rays(data: Dataset, cam_idx: torch.Tensor, u: torch.Tensor, v: torch.Tensor) -> Rays:
    """`field_rays` through pixel coordinates (u, v) of the dataset's cameras, in NDC when the dataset is."""
    return field_rays(data.cameras, cam_idx, u, v, (data.ndc_focal, *data.ndc_size) if data.ndc else None)


def camera_image_rays(cameras: Cameras, i: int, ndc: tuple[float, int, int] | None = None) -> Rays:
    """All rays of camera `i`, row-major (H*W rays)."""
    h, w = cameras.height, cameras.width
    v, u = torch.meshgrid(torch.arange(h, dtype=torch.float32), torch.arange(w, dtype=torch.float32), indexing="ij")
    cam = torch.full((h * w,), i, dtype=torch.long)
    return field_rays(cameras, cam, u.reshape(-1) + 0.5, v.reshape(-1) + 0.5, ndc)


def image_rays(data: Dataset, i: int) -> Rays:
    """All rays of view `i` of the dataset, row-major (H*W rays), in NDC when the dataset is."""
    return camera_image_rays(data.cameras, i, (data.ndc_focal, *data.ndc_size) if data.ndc else None)


class RayBatcher:
    """Draws random training rays with their target colours, reproducibly from its own generator.

    Pixels are drawn uniformly over all training pixels. `restrict` limits the draw to a subset (e.g. the
    pixels whose rays hit the scene box), which saves work on rays that can only ever see background.

    Target colours are read from the dataset's images where they lie, usually a memory map of the on-disk image
    store (`dfield.data.store`), whose pages are handed back after every batch (`trim`): memory does not grow with
    the number of images.
    """

    def __init__(self, data: Dataset, batch_size: int, seed: int = 0):
        self.data = data
        self.batch_size = batch_size
        self.gen = torch.Generator().manual_seed(seed)
        self.n_pixels = len(data) * data.height * data.width
        self.pool: PixelRuns | None = None  # the pixels to draw from, None = all
        self.colors = data.images.reshape(-1, 3)

    def restrict(self, pool: PixelRuns | torch.Tensor | None) -> None:
        """Draw from now on only from these pixels (PixelRuns, or a 1D long tensor of flat ids), or from all pixels
        again with None."""
        if pool is not None and not isinstance(pool, PixelRuns):
            pool = PixelRuns.from_ids(torch.unique(torch.as_tensor(pool, dtype=torch.long)))
        self.pool = pool

    def sample(self) -> tuple[Rays, torch.Tensor, torch.Tensor]:
        """Returns rays, target rgb (R,3) float in [0,1], and the flat pixel ids."""
        if self.pool is None:
            ids = torch.randint(0, self.n_pixels, (self.batch_size,), generator=self.gen)
        else:
            ids = self.pool[torch.randint(0, len(self.pool), (self.batch_size,), generator=self.gen)]
        return self.rays_of(ids) + (ids,)

    def sample_patches(self, size: int) -> tuple[Rays, torch.Tensor, torch.Tensor]:
        """Like `sample`, with the batch drawn as batch_size // size^2 square patches of size x size pixels.

        Rays come patch by patch, each patch row-major, so `out.reshape(n, size, size, ...)` gives the patches.
        A patch is centred on a pixel drawn as `sample` draws one (from the restricted pool when there is one),
        then moved inside its image; so patches reach the same pixels random rays do, plus their neighbours.
        """
        w, h = self.data.width, self.data.height
        if not 1 <= size <= min(w, h):
            raise ValueError(f"patch size {size} does not fit {w}x{h} images")
        n = max(1, self.batch_size // (size * size))
        if self.pool is None:
            centre = torch.randint(0, self.n_pixels, (n,), generator=self.gen)
        else:
            centre = self.pool[torch.randint(0, len(self.pool), (n,), generator=self.gen)]
        view, pix = centre // (w * h), centre % (w * h)
        x0 = (pix % w - size // 2).clamp(0, w - size)
        y0 = (pix // w - size // 2).clamp(0, h - size)
        dy, dx = torch.meshgrid(torch.arange(size), torch.arange(size), indexing="ij")
        ids = (view[:, None] * (w * h) + (y0[:, None] + dy.reshape(1, -1)) * w + x0[:, None] + dx.reshape(1, -1))
        ids = ids.reshape(-1)
        return self.rays_of(ids) + (ids,)

    def rays_of(self, ids: torch.Tensor) -> tuple[Rays, torch.Tensor]:
        """Rays and target colours (R, 3) in [0, 1] of flat pixel ids."""
        rays = dataset_rays(self.data, *pixel_coords(ids, self.data.width, self.data.height))
        colors = self.colors[ids].float() / 255.0
        trim(self.colors)
        return rays, colors

    def state(self) -> torch.Tensor:
        """The random generator's state (uint8 tensor), to checkpoint so a resumed run draws the same batches."""
        return self.gen.get_state()

    def set_state(self, state: torch.Tensor) -> None:
        """Restore a generator state from `state()`."""
        self.gen.set_state(state)
