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
    # Optical depth in front of each sample, summed without it (cumsum(tau) - tau would lose the front
    # entirely in float32 when the last interval is huge, as in NeRF's 1e10 closing interval).
    front = torch.cumsum(torch.cat([torch.zeros_like(tau[:, :1]), tau[:, :-1]], -1), dim=-1)
    alpha = 1.0 - torch.exp(-tau)
    if tau.shape[1] == 0:
        return alpha, torch.ones(sigma.shape[0], device=sigma.device)
    return alpha * torch.exp(-front), torch.exp(-(front[:, -1] + tau[:, -1]))


def composite(weights: torch.Tensor, values: torch.Tensor) -> torch.Tensor:
    """Weighted sum along each ray. weights (R, S), values (R, S, C) -> (R, C)."""
    return torch.einsum("rs,rsc->rc", weights, values)


def scatter_samples(mask: torch.Tensor, values: torch.Tensor, fill: float = 0.0) -> torch.Tensor:
    """Put per-valid-sample values (M, ...) back into the padded (R, S, ...) layout."""
    out = values.new_full(mask.shape + values.shape[1:], fill)
    out[mask] = values
    return out
