"""The one in-memory scene type every reader produces: images, cameras, bounds and optional ground truth.

Conventions (shared by every reader, the ray generator and the renderer):
- `c2w` is camera-to-world in the OpenGL/Blender convention: the camera looks down -z, +y is up,
  +x is right. Readers of other conventions (LLFF, COLMAP) convert on load.
- Pixel (u, v) has its centre at (u + 0.5, v + 0.5); `cx, cy` are in the same pixel units.
- Images are uint8 RGB with any alpha already composited onto `background`, so memory stays at
  3 bytes per pixel (100s of views at full size fit) and losses compare like with like.
"""

from __future__ import annotations

from dataclasses import dataclass, field, replace
from pathlib import Path

import torch

from dfield.errors import DataError  # noqa: F401  (readers raise it; re-exported for them)


@dataclass
class Cameras:
    """N pinhole cameras sharing one image size: OpenGL camera-to-world poses and intrinsics in pixels."""

    c2w: torch.Tensor  # (N, 3, 4) float32
    fx: torch.Tensor  # (N,) float32, pixels
    fy: torch.Tensor
    cx: torch.Tensor
    cy: torch.Tensor
    width: int
    height: int

    def __len__(self) -> int:
        return self.c2w.shape[0]

    def __getitem__(self, idx) -> "Cameras":
        idx = torch.as_tensor(idx, dtype=torch.long).reshape(-1)
        return replace(self, c2w=self.c2w[idx], fx=self.fx[idx], fy=self.fy[idx], cx=self.cx[idx], cy=self.cy[idx])

    def scaled(self, factor: float) -> "Cameras":
        """Cameras for images resized by `factor` (0.25 = four times smaller)."""
        w, h = max(1, round(self.width * factor)), max(1, round(self.height * factor))
        sx, sy = w / self.width, h / self.height
        return replace(self, fx=self.fx * sx, fy=self.fy * sy, cx=self.cx * sx, cy=self.cy * sy, width=w, height=h)

    def to(self, device) -> "Cameras":
        """The same cameras with their tensors on `device`."""
        return replace(self, **{k: getattr(self, k).to(device) for k in ("c2w", "fx", "fy", "cx", "cy")})


@dataclass
class Dataset:
    """One split of a scene. `aabb` bounds what the field models (world units, or NDC when `ndc`)."""

    images: torch.Tensor  # (N, H, W, 3) uint8, background already composited
    cameras: Cameras
    image_paths: list[Path]
    aabb: torch.Tensor  # (2, 3) float32: min corner, max corner
    near: float
    far: float
    background: tuple[float, float, float] = (1.0, 1.0, 1.0)
    # Forward-facing scenes (LLFF) are modelled in normalised device coordinates: rays are mapped to NDC
    # before sampling, and `ndc_focal`/`ndc_size` describe the projection used.
    ndc: bool = False
    ndc_focal: float = 0.0
    ndc_size: tuple[int, int] = (0, 0)  # (width, height) the NDC mapping was defined at
    # Generated scenes carry per-pixel object ids (0 = background) and their names.
    object_ids: torch.Tensor | None = None  # (N, H, W) int16
    object_names: dict[int, str] = field(default_factory=dict)
    split: str = "train"
    source: str = ""  # the file or folder it was read from, for messages
    format: str = ""  # "blender", "llff", "colmap"
    # How the scene is modelled (`dfield.data.scene_type`): "object" (a box in world space), "forward" (NDC) or
    # "unbounded" (recentred so the object of interest fills the unit ball; the model contracts the rest).
    scene_type: str = "object"
    scene_note: str = ""  # why --scene-type auto chose it (empty when it was given)
    # Every camera of the scene, all splits (N_all, 3, 4): what scene-type detection and normalisation look at,
    # so every split is normalised alike. None: only this split's cameras are known.
    scene_c2w: torch.Tensor | None = None
    # The similarity (4, 4) the scene type applied to the reader's coordinates (None: none).
    scene_from_source: torch.Tensor | None = None

    def __len__(self) -> int:
        return self.images.shape[0]

    @property
    def height(self) -> int:
        """Image height H in pixels (that of the cameras)."""
        return self.cameras.height

    @property
    def width(self) -> int:
        """Image width W in pixels (that of the cameras)."""
        return self.cameras.width

    def subset(self, idx) -> "Dataset":
        """The views `idx` (an int or a sequence of ints), in that order, with everything else unchanged."""
        idx = torch.as_tensor(idx, dtype=torch.long).reshape(-1)
        return replace(
            self,
            images=self.images[idx],
            cameras=self.cameras[idx],
            image_paths=[self.image_paths[i] for i in idx.tolist()],
            object_ids=None if self.object_ids is None else self.object_ids[idx],
        )

    def float_images(self) -> torch.Tensor:
        """(N, H, W, 3) float32 images in [0, 1] (a new tensor, four times the memory of `images`)."""
        return self.images.float() / 255.0
