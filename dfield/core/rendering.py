"""Volume rendering: weights from densities, and compositing of any per-sample channel.

Samples are kept in a padded (rays, samples) layout with a validity mask: fields are evaluated only at
valid samples and scattered back, so the expensive part scales with the points that matter while the
compositing maths stays simple dense tensor code.
"""

from __future__ import annotations

from typing import Callable, Protocol

import torch

from dfield.core.rays import Rays
from dfield.core.sampling import march


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


class Field(Protocol):
    """What the renderer needs from a field: a box, optional empty-space marks, and functions of points.

    Trained models, edit wrappers and composites all present this, so there is one renderer for all.
    `occupancy` is anything with `query(points) -> bool` (or None: everything may be occupied);
    `features` is None for a field without features.
    """

    aabb: torch.Tensor
    occupancy: object | None
    features: Callable[[torch.Tensor], torch.Tensor] | None

    def density(self, x: torch.Tensor) -> torch.Tensor: ...

    def color(self, x: torch.Tensor, d: torch.Tensor) -> torch.Tensor: ...


def render_field(field: Field, rays: Rays, near: float, far: float, step: float, background: torch.Tensor,
                 generator: torch.Generator | None = None, features: bool = False, weight_threshold: float = 1e-4,
                 max_samples: int = 1024, channels: dict[str, Callable] | None = None) -> dict[str, torch.Tensor]:
    """March `rays` through `field` and composite colour (and features, and any extra per-point `channels`).

    Only samples that visibly contribute (weight > `weight_threshold`) pay for colour and features.
    """
    s = march(rays, field.aabb, near, far, step, field.occupancy, generator, max_samples)
    sigma = scatter_samples(s.mask, field.density(s.positions))
    weights, _ = weights_from_density(sigma, s.dt)
    heavy = weights[s.mask] > weight_threshold
    color_mask = s.mask.clone()
    color_mask[s.mask] = heavy
    pos = s.positions[heavy]
    rgb = composite(weights, scatter_samples(color_mask, field.color(pos, rays.directions[s.ray_index[heavy]])))
    acc = weights.sum(-1)
    out = {"rgb": rgb + (1.0 - acc)[:, None] * background, "depth": (weights * s.t).sum(-1), "acc": acc}
    # Wide channels (a 384-d lifted feature) are summed per ray straight from the contributing samples: the
    # padded (rays, samples, C) layout would cost gigabytes per chunk. Stop-gradient on the weights: the
    # feature loss shapes features, never density (as in DFF).
    w_heavy, ray_heavy = weights.detach()[color_mask], s.ray_index[heavy]

    def per_ray(v: torch.Tensor) -> torch.Tensor:
        v = v[:, None] if v.dim() == 1 else v
        return v.new_zeros(len(rays), v.shape[1]).index_add(0, ray_heavy, w_heavy[:, None].to(v) * v)

    if features and field.features is not None:
        out["feature"] = per_ray(field.features(pos))
    for name, fn in (channels or {}).items():
        out[name] = per_ray(fn(pos).float()).squeeze(-1)
    return out
