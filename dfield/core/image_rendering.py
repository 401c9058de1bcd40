"""Whole images from anything that renders rays: dataset views, or any cameras (orbits, spirals)."""

from __future__ import annotations

from typing import Protocol

import torch

from dfield.core.rays import Rays, camera_image_rays
from dfield.data.dataset import Cameras


class RayRenderer(Protocol):
    """What whole-image rendering needs: a model (trained or edited) that renders rays in chunks."""

    def render_chunked(self, rays: Rays, chunk: int = 8192, **kwargs) -> dict[str, torch.Tensor]:
        """Render R rays, at most `chunk` at a time, -> per-ray outputs with R first: rgb (R, 3), depth (R,),
        acc (R,), and whatever `kwargs` ask for (feature (R, C), channels)."""
        ...


@torch.no_grad()
def render_image(model: RayRenderer, cameras: Cameras, i: int, ndc: tuple[float, int, int] | None = None,
                 chunk: int = 8192, device="cpu", **render_kwargs) -> dict[str, torch.Tensor]:
    """Render every pixel of camera `i`.

    Args:
        model: renders rays (`render_chunked`); `render_kwargs` (features=True, channels={...}) go to it.
        cameras: the cameras; `i` picks one.
        ndc: (focal, width, height) for forward-facing scenes modelled in NDC (see `ndc_of`), else None.
        chunk: rays per forward pass (bounds memory).
        device: where the rays are rendered.

    Returns:
        every per-ray output as an image on the CPU: rgb (H, W, 3), depth (H, W), acc (H, W), feature (H, W, C), ...

    Example:
        >>> out = render_image(run.model, run.scene.train_cameras(), 0)  # doctest: +SKIP
    """
    rays = camera_image_rays(cameras, i, ndc).to(device)
    out = model.render_chunked(rays, chunk, **render_kwargs)
    h, w = cameras.height, cameras.width
    return {k: v.reshape(h, w, *v.shape[1:]).cpu() for k, v in out.items() if v.shape[0] == h * w}


def ndc_of(scene_or_data) -> tuple[float, int, int] | None:
    """The NDC settings (focal, width, height) of a Dataset or a run's SceneInfo, or None when not in NDC."""
    if not scene_or_data.ndc:
        return None
    return (scene_or_data.ndc_focal, *scene_or_data.ndc_size)
