"""Volume rendering: weights from densities, and compositing of any per-sample channel along rays.

Samples are kept in a padded (rays, samples) layout with a validity mask: fields are evaluated only at
valid samples and scattered back, so the expensive part scales with the points that matter while the
compositing maths stays simple dense tensor code.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable, Protocol

import torch

from dfield.core.profiling import PROFILER
from dfield.core.rays import Rays
from dfield.core.sampling import march


def weights_from_density(sigma: torch.Tensor, dt: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Rendering weights of samples along rays, from their densities and lengths.

    .. math::
        w_i = T_i (1 - e^{-\\sigma_i \\delta_i}), \\quad T_i = e^{-\\sum_{j<i} \\sigma_j \\delta_j}

    Args:
        sigma: (R, S) densities (per unit length).
        dt: (R, S) sample lengths, in the same units.

    Returns:
        weights (R, S) and the transmittance left after the last sample (R,).

    Example:
        >>> w, left = weights_from_density(torch.tensor([[0.0, 1e9, 5.0]]), torch.ones(1, 3))
        >>> w.tolist(), left.tolist()  # the opaque second sample takes all the weight
        ([[0.0, 1.0, 0.0]], [0.0])
    """
    tau = sigma * dt
    # Optical depth in front of each sample, summed without it (cumsum(tau) - tau would lose the front
    # entirely in float32 when the last interval is huge, as in NeRF's 1e10 closing interval).
    front = torch.cumsum(torch.cat([torch.zeros_like(tau[:, :1]), tau[:, :-1]], -1), dim=-1)
    alpha = 1.0 - torch.exp(-tau)
    if tau.shape[1] == 0:
        return alpha, torch.ones(sigma.shape[0], device=sigma.device)
    return alpha * torch.exp(-front), torch.exp(-(front[:, -1] + tau[:, -1]))


def composite(weights: torch.Tensor, values: torch.Tensor) -> torch.Tensor:
    """Weighted sum along each ray: weights (R, S), values (R, S, C) -> (R, C)."""
    return torch.einsum("rs,rsc->rc", weights, values)


def scatter_samples(mask: torch.Tensor, values: torch.Tensor, fill: float = 0.0) -> torch.Tensor:
    """Put per-valid-sample values (M, ...) back into the padded (R, S, ...) layout of `mask` (R, S) bool."""
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

    def density(self, x: torch.Tensor) -> torch.Tensor:
        """(N, 3) points -> (N,) densities sigma >= 0, per unit length of the field's space (world, or NDC)."""
        ...

    def color(self, x: torch.Tensor, d: torch.Tensor) -> torch.Tensor:
        """(N, 3) points and (N, 3) ray directions -> (N, 3) colours in [0, 1]."""
        ...


@dataclass(frozen=True)
class RenderSettings:
    """How rays are marched and composited: everything `render_field` needs besides the field and the rays."""

    near: float
    """Samples start here along each ray (and are anchored here: t = near + (k + offset) * step)."""
    far: float
    step: float
    """Sample spacing along rays, in the rays' own units."""
    background: torch.Tensor
    """(3,) colour composited behind what the rays see."""
    weight_threshold: float = 1e-4
    """Samples with a smaller rendering weight skip colour, features and channels."""
    max_samples: int = 1024
    """Most samples per ray."""


def render_field(field: Field, rays: Rays, settings: RenderSettings, generator: torch.Generator | None = None,
                 features: bool = False, channels: dict[str, Callable] | None = None) -> dict[str, torch.Tensor]:
    """March `rays` through `field` and composite colour (and features, and any extra per-point `channels`).

    Only samples that visibly contribute (weight > `settings.weight_threshold`) pay for colour and features.
    Features and channels are composited with detached weights: a loss on them never reaches density.

    Args:
        field: anything with the `Field` interface.
        rays: R rays.
        settings: marching and compositing settings.
        generator: jitters sample positions (training); None samples at cell midpoints.
        features: also composite `field.features` (when the field has them).
        channels: name -> function of points (M, 3) -> (M,) or (M, C), composited like features.

    Returns:
        rgb (R, 3), depth (R,) (weighted distance, not divided by opacity), acc (R,) (opacity), and
        feature (R, C) / each channel when asked.

    Example:
        >>> class Ball:  # an opaque unit ball, red
        ...     aabb, occupancy, features = torch.tensor([[-1.0] * 3, [1.0] * 3]), None, None
        ...     def density(self, x): return 100.0 * (x.norm(dim=-1) < 1)
        ...     def color(self, x, d): return torch.tensor([1.0, 0, 0]).expand(len(x), 3)
        >>> rays = Rays(torch.tensor([[0.0, 0, -3]]), torch.tensor([[0.0, 0, 1]]))
        >>> out = render_field(Ball(), rays, RenderSettings(0.0, 6.0, 0.01, torch.ones(3)))
        >>> round(out["acc"].item(), 3), round(out["depth"].item(), 1)
        (1.0, 2.0)
    """
    s = settings
    with PROFILER.phase("march"):
        samples = march(rays, field.aabb, s.near, s.far, s.step, field.occupancy, generator, s.max_samples)
    with PROFILER.phase("density"):
        sigma = scatter_samples(samples.mask, field.density(samples.positions))
    weights, _ = weights_from_density(sigma, samples.dt)
    heavy = weights[samples.mask] > s.weight_threshold
    color_mask = samples.mask.clone()
    color_mask[samples.mask] = heavy
    pos = samples.positions[heavy]
    with PROFILER.phase("color"):
        rgb = composite(weights, scatter_samples(color_mask, field.color(pos, rays.directions[samples.ray_index[heavy]])))
    acc = weights.sum(-1)
    out = {"rgb": rgb + (1.0 - acc)[:, None] * s.background, "depth": (weights * samples.t).sum(-1), "acc": acc}
    # Wide channels (a 384-d lifted feature) are summed per ray straight from the contributing samples: the
    # padded (rays, samples, C) layout would cost gigabytes per chunk. Stop-gradient on the weights: the
    # feature loss shapes features, never density (as in DFF).
    w_heavy, ray_heavy = weights.detach()[color_mask], samples.ray_index[heavy]

    def per_ray(v: torch.Tensor) -> torch.Tensor:
        v = v[:, None] if v.dim() == 1 else v
        return v.new_zeros(len(rays), v.shape[1]).index_add(0, ray_heavy, w_heavy[:, None].to(v) * v)

    if features and field.features is not None:
        with PROFILER.phase("features"):
            out["feature"] = per_ray(field.features(pos))
    for name, fn in (channels or {}).items():
        out[name] = per_ray(fn(pos).float()).squeeze(-1)
    return out
