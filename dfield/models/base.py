"""The model interface: everything the trainer, evaluation, queries and edits ask of a model, whatever field and
sampler it uses. Call sites ask the model (`has_features`, `decode`, `losses`, `schedule`), never probe its
attributes.
"""

from __future__ import annotations

import torch
import torch.nn as nn

from dfield.core.rays import Rays
from dfield.core.rendering import Field
from dfield.models.losses import photometric_loss
from dfield.models.schedule import Schedule


class Model(nn.Module):
    """A field plus the sampler that feeds it.

    Subclasses implement `render_rays` and `param_groups`, and override the rest where they differ:

    - rendering: `render_rays` returns at least rgb (R, 3), depth (R,), acc (R,) (opacity); `render_chunked`
      renders any number of rays; `as_field` gives the renderer's view for edits.
    - features: `has_features`, `trainable_features`, `feature_dim`, `decode` (rendered -> teacher space).
    - training: `param_groups`, `losses` (the model's own terms), `regularizer`, `schedule`, `scene_box`.
    - checkpoints: `structure` / `restructure` (shapes to rebuild before loading weights) and `extra_state` /
      `load_extra_state` (tensors that are not parameters or buffers).
    """

    background: torch.Tensor
    schedule: Schedule = Schedule()

    # -- rendering --------------------------------------------------------------------------------
    def render_rays(self, rays: Rays, generator: torch.Generator | None = None, features: bool = False,
                    visible: bool = False) -> dict[str, torch.Tensor]:
        """Render R rays; `generator` jitters samples (training). `features=True` also returns `feature` (R, C)
        where the model has a feature field; `visible=True` also returns `visible`, the samples composited
        (`dfield.core.rendering.VisibleSamples`), where the model renders through `render_field`, so features can
        follow later through `composite_samples(model.as_field().features, rays, visible)`."""
        raise NotImplementedError

    @torch.no_grad()
    def render_chunked(self, rays: Rays, chunk: int = 8192, **kwargs) -> dict[str, torch.Tensor]:
        """Render any number of rays in chunks of `chunk`, so a full image never needs all its samples in memory."""
        outs = [self.render_rays(rays[i : i + chunk], **kwargs) for i in range(0, len(rays), chunk)]
        return {k: torch.cat([o[k] for o in outs]) for k in outs[0]}

    def as_field(self, decoded: bool = False) -> Field:
        """The model as a `Field` for the renderer and edit wrappers; `decoded` gives features in teacher space."""
        raise TypeError(f"{type(self).__name__} cannot be seen as a field (edits and selections need a grid model)")

    # -- features ---------------------------------------------------------------------------------
    @property
    def has_features(self) -> bool:
        """Whether the model renders features (learned or lifted)."""
        return False

    @property
    def trainable_features(self) -> bool:
        """Whether the features are a learned field with a decoder (trained by distillation), not fixed data."""
        return False

    @property
    def feature_dim(self) -> int:
        """Width of the rendered features (before `decode`)."""
        return 0

    def decode(self, rendered: torch.Tensor) -> torch.Tensor:
        """Rendered features (..., feature_dim) -> the teacher's space (..., D)."""
        raise TypeError(f"{type(self).__name__} has no feature field")

    # -- training ---------------------------------------------------------------------------------
    def param_groups(self, lr_scale: float = 1.0) -> list[dict]:
        """Optimiser parameter groups, each with a `name` and a starting `lr`."""
        raise NotImplementedError

    def losses(self, out: dict[str, torch.Tensor], target_rgb: torch.Tensor) -> dict[str, torch.Tensor]:
        """The model's photometric loss terms for one batch (summed by the trainer): by default the MSE of `rgb`."""
        return {"rgb": photometric_loss(out["rgb"], target_rgb)}

    def regularizer(self, step: int) -> torch.Tensor | None:
        """A prior on the parameters added to the loss at `step` (None: none)."""
        return None

    def scene_box(self) -> torch.Tensor | None:
        """(2, 3) box outside which nothing is ever rendered (None: unbounded); rays missing it see background."""
        return None

    # -- checkpoints ------------------------------------------------------------------------------
    def structure(self) -> dict:
        """JSON-able shape information needed to rebuild the model before loading its weights."""
        return {}

    def restructure(self, info: dict) -> None:
        """Reshape to what `structure()` recorded."""

    def extra_state(self) -> dict[str, torch.Tensor]:
        """Tensors to checkpoint that are neither parameters nor buffers (occupancy grids, lifted features)."""
        return {}

    def load_extra_state(self, tensors: dict[str, torch.Tensor]) -> None:
        """Restore what `extra_state()` returned."""
