"""Volume rendering: weights from densities, and compositing of any per-sample channel.

Samples are kept in a padded (rays, samples) layout with a validity mask: fields are evaluated only at
valid samples and scattered back, so the expensive part scales with the points that matter while the
compositing maths stays simple dense tensor code.
"""

from __future__ import annotations

import torch


def weights_from_density(sigma: torch.Tensor, dt: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """sigma, dt: (R, S). Returns rendering weights (R, S) and the transmittance left after the ray (R,)."""
    tau = sigma * dt
    # Exclusive cumulative optical depth; exp of a sum is steadier than a cumprod of (1 - alpha).
    cum = torch.cumsum(tau, dim=-1)
    trans = torch.exp(-(cum - tau))
    alpha = 1.0 - torch.exp(-tau)
    return alpha * trans, torch.exp(-cum[:, -1]) if cum.shape[1] else torch.ones(sigma.shape[0], device=sigma.device)


def composite(weights: torch.Tensor, values: torch.Tensor) -> torch.Tensor:
    """Weighted sum along each ray. weights (R, S), values (R, S, C) -> (R, C)."""
    return torch.einsum("rs,rsc->rc", weights, values)


def scatter_samples(mask: torch.Tensor, values: torch.Tensor, fill: float = 0.0) -> torch.Tensor:
    """Put per-valid-sample values (M, ...) back into the padded (R, S, ...) layout."""
    out = values.new_full(mask.shape + values.shape[1:], fill)
    out[mask] = values
    return out
