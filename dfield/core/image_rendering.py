"""Render whole images from a model: dataset views, or any cameras (orbits, spirals)."""

from __future__ import annotations

import torch

from dfield.data.dataset import Cameras
from dfield.models.base import Model
from dfield.core.rays import camera_image_rays


@torch.no_grad()
def render_camera(model: Model, cameras: Cameras, i: int, ndc: tuple[float, int, int] | None = None,
                  chunk: int = 8192, device="cpu", features: bool = False) -> dict[str, torch.Tensor]:
    """Render camera `i`; returns rgb (H,W,3), depth (H,W), acc (H,W) (and feature (H,W,C)) on the CPU."""
    rays = camera_image_rays(cameras, i, ndc).to(device)
    out = model.render_chunked(rays, chunk, features=features)
    h, w = cameras.height, cameras.width
    return {k: v.reshape(h, w, *v.shape[1:]).cpu() for k, v in out.items() if v.shape[0] == h * w}


def ndc_of(scene_or_data) -> tuple[float, int, int] | None:
    if not scene_or_data.ndc:
        return None
    return (scene_or_data.ndc_focal, *scene_or_data.ndc_size)
