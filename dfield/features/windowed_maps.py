"""Feature targets stored as windows onto the teacher's cells: per image pixel p, fixed weights on the K_y x K_x
teacher cells its filter reads,

    T(p) = sum_ij C[p, i, j] F[a_y(p_y) + i, a_x(p_x) + j],

which is what an edge-aware filter of bilinearly upsampled teacher maps is (dfield.features.smoothing.bilateral_windows).
Stored this way, targets cost K_y K_x weights per pixel (16-25 fp16 numbers) instead of D features (384 for DINOv2):
about 130 MB instead of 3 GB for 100 views at 200 px.

    targets = WindowedMaps(raw_maps, coef, anchor_y, anchor_x)
    targets.sample(view, u, v)   # (R, D), as FeatureMaps.sample on the filtered image-resolution maps
"""

from __future__ import annotations

import warnings
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from dfield.data.store import trim
from dfield.features.teachers.cache import FeatureMaps, sample_coords


def apply_windows(fmap: torch.Tensor, anchor_y: torch.Tensor, anchor_x: torch.Tensor, coef: torch.Tensor) -> torch.Tensor:
    """(H, W, D) = sum_ij coef[..., i, j] fmap[anchor_y + i, anchor_x + j] for (h, w, D) cells `fmap`, anchors (H,)
    and (W,) and weights `coef` (H, W, Ky, Kx); cells past the map's edge read zero.

    Example:
        >>> f = torch.arange(4.0).reshape(2, 2, 1)
        >>> coef = torch.zeros(1, 1, 2, 2); coef[0, 0, 1, 1] = 1.0
        >>> apply_windows(f, torch.tensor([0]), torch.tensor([0]), coef)[0, 0].tolist()
        [3.0]
    """
    fmap = torch.as_tensor(fmap).float()
    coef = torch.as_tensor(coef)
    (h, w, d), (hh, ww, ky, kx) = fmap.shape, coef.shape
    cells = torch.cat([fmap, fmap.new_zeros(ky, w, d)], 0)
    cells = torch.cat([cells, cells.new_zeros(h + ky, kx, d)], 1)
    out = torch.zeros(hh, ww, d)
    for i in range(ky):
        rows = cells[torch.as_tensor(anchor_y) + i]  # (H, w + Kx, D)
        for j in range(kx):
            out += coef[:, :, i, j, None].float() * rows[:, torch.as_tensor(anchor_x) + j]
    return out


@dataclass
class WindowedMaps:
    """Targets of every view as windows onto teacher `cells` (module docstring): `coef` (N, H, W, Ky, Kx) fp16,
    usually memory-mapped, `anchor_y` (H,) and `anchor_x` (W,) the first cell row / column of each pixel's window.
    Used wherever FeatureMaps are sampled (`sample`, `dim`, `image_size`, `len`)."""

    cells: FeatureMaps
    coef: np.ndarray
    anchor_y: np.ndarray
    anchor_x: np.ndarray
    teacher: str = ""
    path: Path | None = None

    def __post_init__(self):
        n, hh, ww = self.coef.shape[:3]
        if n != len(self.cells) or (ww, hh) != tuple(self.cells.image_size):
            raise ValueError(f"windows {self.coef.shape[:3]} do not fit {len(self.cells)} teacher maps of "
                             f"{self.cells.image_size[0]}x{self.cells.image_size[1]} images")
        self.anchor_y = np.asarray(self.anchor_y, dtype=np.int64)
        self.anchor_x = np.asarray(self.anchor_x, dtype=np.int64)

    def __len__(self) -> int:
        return self.coef.shape[0]

    @property
    def dim(self) -> int:
        """D, the number of feature channels (the teacher's)."""
        return self.cells.dim

    @property
    def image_size(self) -> tuple[int, int]:
        """(width, height) of the dataset images the targets belong to."""
        return self.cells.image_size

    def view(self, i: int) -> torch.Tensor:
        """float32 (H, W, D) targets of view `i`."""
        c = torch.from_numpy(np.asarray(self.coef[i], dtype=np.float32))
        return apply_windows(self.cells.view(i), torch.from_numpy(self.anchor_y), torch.from_numpy(self.anchor_x), c)

    def pixels(self, view_idx: np.ndarray, y: np.ndarray, x: np.ndarray) -> torch.Tensor:
        """float32 (R, D) targets at integer pixels (y, x) of views `view_idx` (all (R,) int arrays)."""
        _, h, w, d = self.cells.maps.shape
        ky, kx = self.coef.shape[3:]
        c = torch.from_numpy(np.asarray(self.coef[view_idx, y, x], dtype=np.float32)).reshape(len(view_idx), -1)
        # Past the edge a window's weight is 0, so any valid cell will do there (min with the last one).
        rows = (np.minimum(self.anchor_y[y][:, None] + np.arange(ky), h - 1) * w)[:, :, None] + \
            np.minimum(self.anchor_x[x][:, None] + np.arange(kx), w - 1)[:, None, :]
        rows = rows.reshape(len(view_idx), -1).T + view_idx * (h * w)  # (Ky Kx, R)
        flat = self._flat_cells()
        rows = torch.from_numpy(rows)
        out = torch.zeros(len(view_idx), d)
        for k in range(ky * kx):  # one window cell at a time: a (Ky Kx, R, D) float32 copy would be 4x the fp16 one
            out.addcmul_(c[:, k, None], flat.index_select(0, rows[k]).float())
        trim(self.cells.maps)
        trim(self.coef)
        return out

    def _flat_cells(self) -> torch.Tensor:
        """The teacher cells as one (N h w, D) tensor sharing the (read-only) mapping: torch's row gather runs on
        every core, numpy's fancy indexing on one (12 vs 30 ms for 2048 pixels of 7 x 7 cells)."""
        maps = self.cells.maps
        with warnings.catch_warnings():  # read-only memory: torch warns that writes would fail; none are made
            warnings.simplefilter("ignore", UserWarning)
            return torch.from_numpy(np.asarray(maps)).reshape(-1, maps.shape[-1])

    def sample(self, view_idx, u, v, device=None) -> torch.Tensor:
        """Targets at image pixel coordinates -> float32 (R, D), as `FeatureMaps.sample` on the image-resolution
        maps: bilinear between pixel centres ((i + 0.5, j + 0.5) is pixel (i, j) exactly), edge value beyond them."""
        n, hh, ww = self.coef.shape[:3]
        vi, u, v = sample_coords(view_idx, u, v, n)
        x = np.clip(u - 0.5, 0, ww - 1)
        y = np.clip(v - 0.5, 0, hh - 1)
        x0, y0 = np.floor(x).astype(np.int64), np.floor(y).astype(np.int64)
        fx, fy = x - x0, y - y0
        out = torch.zeros(len(vi), self.dim)
        # Rays through pixel centres (all of training's) read one pixel; only the corners with weight are gathered.
        for dy, dx, wgt in ((0, 0, (1 - fy) * (1 - fx)), (0, 1, (1 - fy) * fx), (1, 0, fy * (1 - fx)), (1, 1, fy * fx)):
            rows = np.nonzero(wgt > 0)[0]
            if rows.size:
                val = self.pixels(vi[rows], np.minimum(y0[rows] + dy, hh - 1), np.minimum(x0[rows] + dx, ww - 1))
                out[torch.from_numpy(rows)] += torch.from_numpy(wgt[rows].astype(np.float32))[:, None] * val
        return out if device is None else out.to(device, non_blocking=True)
