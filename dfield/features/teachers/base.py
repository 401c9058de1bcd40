"""The 2D teacher interface: a teacher turns images into dense per-pixel feature maps at its own (usually lower)
resolution; a 3D feature field is then distilled from those maps (cached once per scene by
dfield.features.teachers.cache).

Adding a teacher (the Python hook):

    import torch
    from dfield.features.teachers import Teacher, register_teacher

    class MyTeacher(Teacher):
        def __init__(self, scale=0.5):
            self.name = f"mine(scale={scale})"   # every setting that changes the output goes in here
            self.dim = 64
            self.scale = scale
        def encode(self, images, object_ids=None):  # uint8 (N, H, W, 3) -> float32 (N, h, w, 64)
            ...

    register_teacher("mine", MyTeacher)          # then make_teacher("mine", scale=0.25)
"""

from __future__ import annotations

from collections.abc import Sequence

import torch

from dfield.data.dataset import Dataset
from dfield.errors import TeacherError


class Teacher:
    """Base class: set `name` (a stable id that includes every output-changing setting) and `dim`."""

    name: str = "teacher"
    dim: int = 0
    text_aligned: bool = False  # True when encode_text() maps text into the same space as the features
    uses_object_ids: bool = False  # True when encode() reads ground-truth object ids (part of the cache key)

    def encode(self, images: torch.Tensor, object_ids: torch.Tensor | None = None) -> torch.Tensor:
        """uint8 (N, H, W, 3) -> float32 (N, h, w, D) dense feature maps at the teacher's own resolution.

        Cell (j, i) of an h x w map covers the image rectangle [i W/w, (i+1) W/w) x [j H/h, (j+1) H/h),
        so the map is aligned with the whole image (see FeatureMaps.sample)."""
        raise NotImplementedError

    def encode_text(self, texts: list[str]) -> torch.Tensor:
        """(T, D) text embeddings in the feature space; only text-aligned teachers have one."""
        raise TeacherError(f"{self.name} has no text encoder; use a patch or click query")

    # Hooks used by cached_features; the defaults suit any teacher that only looks at pixels.
    def encode_views(self, data: Dataset, idx: Sequence[int]) -> torch.Tensor:
        """Features of the views `idx` of `data` (teachers that need file names override this)."""
        idx = list(idx)
        ids = None
        if self.uses_object_ids:
            if data.object_ids is None:
                raise TeacherError(f"teacher {self.name} needs ground-truth object ids; this scene has none "
                                   "(only generated scenes carry them)")
            ids = data.object_ids[idx]
        return self.encode(data.images[idx], ids)

    def cache_token(self, data: Dataset) -> bytes:
        """Extra bytes for the cache key beyond the teacher name and the image bytes (e.g. source-file stamps)."""
        return b""

    def __repr__(self) -> str:
        return f"<{type(self).__name__} {self.name} dim={self.dim}>"


def resize_normalize(images: torch.Tensor, input_size: int, patch: int, mean, std) -> torch.Tensor:
    """uint8 (N, H, W, 3) -> float32 (N, 3, h', w') for a ViT: shorter side ~`input_size`, both sides rounded
    to multiples of `patch` (so the token grid covers the whole image, aspect kept up to that rounding),
    antialiased bilinear resize, then (pixels / 255 - mean) / std."""
    x = torch.as_tensor(images).permute(0, 3, 1, 2).float() / 255.0
    H, W = x.shape[2:]
    s = input_size / min(H, W)
    h = max(patch, round(H * s / patch) * patch)
    w = max(patch, round(W * s / patch) * patch)
    if (h, w) != (H, W):
        x = torch.nn.functional.interpolate(x, size=(h, w), mode="bilinear", align_corners=False, antialias=True)
    m = torch.tensor(mean, dtype=torch.float32).view(1, 3, 1, 1)
    sd = torch.tensor(std, dtype=torch.float32).view(1, 3, 1, 1)
    return ((x - m) / sd).contiguous()
