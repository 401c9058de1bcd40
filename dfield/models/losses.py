"""Loss terms, one definition each: the photometric loss every model trains with and the feature-distillation loss.

Models own which terms they add (`Model.losses`); the trainer and the feature fitter only sum them.
"""

from __future__ import annotations

from typing import Literal

import torch


def photometric_loss(rgb: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    """Mean squared error between rendered (R, 3) and target (R, 3) colours in [0, 1]."""
    return ((rgb - target) ** 2).mean()


def feature_loss(decoded: torch.Tensor, target: torch.Tensor, kind: Literal["l2", "l1"] = "l2") -> torch.Tensor:
    """Distillation loss between decoded rendered features (R, D) and the teacher's features (R, D) at the
    same pixels: mean squared (l2) or mean absolute (l1) difference over rays and channels.

    Example:
        >>> feature_loss(torch.zeros(2, 3), torch.ones(2, 3), "l1").item()
        1.0
    """
    diff = decoded - target
    return (diff.abs() if kind == "l1" else diff**2).mean()


def patch_tv_loss(features: torch.Tensor, size: int) -> torch.Tensor:
    """Anisotropic total variation of rendered feature patches: `features` (n * size * size, D) in the order
    RayBatcher.sample_patches draws rays; the mean over patches, neighbour pairs and channels of

        |f[y, x + 1] - f[y, x]| + |f[y + 1, x] - f[y, x]|.

    Example:
        >>> patch = torch.tensor([[0.], [1.], [0.], [1.]])    # one 2 x 2 patch: columns 0 and 1
        >>> patch_tv_loss(patch, 2).item()                    # |1-0| across, |0-0| down
        1.0
    """
    if size < 2:
        raise ValueError(f"total variation needs patches of at least 2 x 2, got {size}")
    p = features.reshape(-1, size, size, features.shape[-1])
    return (p[:, :, 1:] - p[:, :, :-1]).abs().mean() + (p[:, 1:] - p[:, :-1]).abs().mean()
