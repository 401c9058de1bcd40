"""What the trainer, renderer CLI and evaluation need from a model, whatever field and sampler it uses."""

from __future__ import annotations

import torch
import torch.nn as nn

from dfield.core.rays import Rays


class Model(nn.Module):
    """A field plus the sampler that feeds it. Subclasses implement `render_rays` and `param_groups`.

    `render_rays` returns a dict with at least `rgb` (R, 3), `depth` (R,), `acc` (R,) (opacity).
    """

    background: torch.Tensor

    def render_rays(self, rays: Rays, generator: torch.Generator | None = None, features: bool = False) -> dict[str, torch.Tensor]:
        """`features=True` also returns `feature` (R, C) where the model has a feature field."""
        raise NotImplementedError

    def param_groups(self, lr_scale: float = 1.0) -> list[dict]:
        raise NotImplementedError

    def on_step(self, step: int) -> bool:
        """Called before each training step. Returns True when the parameters changed shape (rebuild optimiser)."""
        return False

    def regularizer(self, step: int) -> torch.Tensor | None:
        return None

    def structure(self) -> dict:
        """JSON-able shape information needed to rebuild the model before loading its weights."""
        return {}

    def restructure(self, info: dict) -> None:
        pass

    @torch.no_grad()
    def render_chunked(self, rays: Rays, chunk: int = 8192, **kwargs) -> dict[str, torch.Tensor]:
        """Render any number of rays in chunks so a full image never needs all its samples in memory."""
        outs = [self.render_rays(rays[i : i + chunk], **kwargs) for i in range(0, len(rays), chunk)]
        return {k: torch.cat([o[k] for o in outs]) for k in outs[0]}
