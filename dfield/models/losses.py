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
