"""Volume rendering: weights from densities, and compositing of any per-sample channel along rays.

Samples are kept in a padded (rays, samples) layout with a validity mask: fields are evaluated only at
valid samples and scattered back, so the expensive part scales with the points that matter while the
compositing maths stays simple dense tensor code.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable, Iterator, Protocol

import torch

from dfield.core.contraction import Contraction
from dfield.core.profiling import PROFILER
from dfield.core.rays import Rays
from dfield.core.sampling import OccupancyGrid, RaySamples, first_hit, march, march_window, plan_march


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


def distortion_loss(weights: torch.Tensor, s: torch.Tensor, ds: torch.Tensor) -> torch.Tensor:
    """mip-NeRF 360's distortion loss per ray: small when a ray's weight sits in one short interval, large when it
    is smeared along the ray (the semi-transparent clouds near the cameras that unbounded scenes collapse into).

    .. math::
        \\mathcal{L}_{dist} = \\sum_{i,j} w_i w_j |s_i - s_j| + \\frac{1}{3} \\sum_i w_i^2 \\Delta s_i

    computed in O(S) with cumulative sums over the sorted samples.

    Args:
        weights: (R, S) rendering weights (0 for padding).
        s: (R, S) sample midpoints in normalised ray distance, increasing along each ray.
        ds: (R, 1) or (R, S) interval lengths in the same units.

    Returns:
        (R,) the loss of each ray.

    Example:
        >>> s, ds = torch.tensor([[0.1, 0.5, 0.9]]), torch.full((1, 1), 0.4)
        >>> distortion_loss(torch.tensor([[0.0, 1.0, 0.0]]), s, ds).tolist()  # one interval: its own width / 3
        [0.13333334028720856]
        >>> round(distortion_loss(torch.tensor([[0.5, 0.0, 0.5]]), s, ds).item(), 4)  # split: 2 * 0.25 * 0.8 + ...
        0.4667
    """
    ws = weights * s
    before_w = torch.cumsum(weights, -1) - weights
    before_ws = torch.cumsum(ws, -1) - ws
    inter = 2.0 * (weights * (s * before_w - before_ws)).sum(-1)
    intra = (weights * weights * ds).sum(-1) / 3.0
    return inter + intra


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
    window: int = 64
    """Rendering without gradients marches this many steps at a time and stops a ray once less than
    `stop_transmittance` of its light is left (0: one pass over every step, as in training)."""
    stop_transmittance: float = 1e-4
    contraction: Contraction | None = None
    """Unbounded scenes: rays are not clipped to the field's box but run from near to far, with steps uniform in
    warped distance and lengths measured in contracted space (`dfield.core.sampling`)."""
    distortion: bool = False
    """Unbounded scenes, training: also return each ray's `distortion_loss` over its normalised warped distance."""


def render_field(field: Field, rays: Rays, settings: RenderSettings, generator: torch.Generator | None = None,
                 features: bool = False, channels: dict[str, Callable] | None = None,
                 colors: bool = True, visible: bool = False) -> dict[str, torch.Tensor | VisibleSamples]:
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
        colors: False skips the colour branch (no `rgb` in the result): fitting features on a frozen field needs
            only the weights.
        visible: also return `visible`, the VisibleSamples composited (ray indices into `rays`, detached), so
            features can be added later with `composite_samples` and no second march (the viewer shows colour
            first).

    Returns:
        rgb (R, 3), depth (R,) (weighted distance, not divided by opacity), acc (R,) (opacity), and
        feature (R, C) / each channel / visible when asked.

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
    if s.window > 0 and generator is None and not torch.is_grad_enabled():
        return _render_terminated(field, rays, s, features, channels, colors, visible)
    with PROFILER.phase("march"):
        samples = march(rays, field.aabb, s.near, s.far, s.step, field.occupancy, generator, s.max_samples,
                        s.contraction)
    # The samples by flat index into the padded layout, gathered with index_select: boolean-mask indexing would run a
    # nonzero at every use (a CPU step's march and compositing spent a fifth of their time there).
    flat = samples.flat
    with PROFILER.phase("density"):
        sigma = field.density(samples.positions)
        sigma = sigma.new_zeros(samples.mask.numel()).index_put((flat,), sigma).view(samples.mask.shape)
    weights, _ = weights_from_density(sigma, samples.dt)
    w_flat = weights.view(-1).index_select(0, flat)
    heavy = (w_flat.detach() > s.weight_threshold).nonzero().squeeze(1)
    pos = samples.positions.index_select(0, heavy)
    ray_heavy = samples.ray_index.index_select(0, heavy)
    acc = weights.sum(-1)
    out = {"depth": (weights * samples.t).sum(-1), "acc": acc}
    if s.distortion and samples.s is not None:
        out["distortion"] = distortion_loss(weights, samples.s, samples.ds)
    if colors:
        with PROFILER.phase("color"):
            col = field.color(pos, rays.directions.index_select(0, ray_heavy))
            # Summed per ray from the contributing samples, as `composite` would over the padded layout.
            rgb = col.new_zeros(len(rays), 3).index_add(0, ray_heavy, w_flat.index_select(0, heavy)[:, None] * col)
        out["rgb"] = rgb + (1.0 - acc)[:, None] * s.background
    # Wide channels (a 384-d lifted feature) are summed per ray straight from the contributing samples: the
    # padded (rays, samples, C) layout would cost gigabytes per chunk. Stop-gradient on the weights: the
    # feature loss shapes features, never density (as in DFF).
    w_heavy = w_flat.detach().index_select(0, heavy)
    if visible:
        out["visible"] = VisibleSamples(ray_heavy, samples.t.detach().view(-1).index_select(0, flat.index_select(0, heavy)), w_heavy)

    def per_ray(v: torch.Tensor) -> torch.Tensor:
        v = v[:, None] if v.dim() == 1 else v
        return v.new_zeros(len(rays), v.shape[1]).index_add(0, ray_heavy, w_heavy[:, None].to(v) * v)

    if features and field.features is not None:
        with PROFILER.phase("features"):
            out["feature"] = per_ray(field.features(pos))
    for name, fn in (channels or {}).items():
        out[name] = per_ray(fn(pos).float()).squeeze(-1)
    return out


def _skip_empty_front(rays: Rays, plan, grid: OccupancyGrid, s: RenderSettings) -> None:
    """Move each ray's first step up to just before the first occupied coarse cell it meets (rays meeting none
    are dropped). The steps skipped are all in empty fine cells, where the march would place no sample; later
    steps keep their exact positions (same near-plane anchor) and the ray keeps its last step."""
    end = plan.near + (plan.k0 + plan.n) * plan.step  # where the one-pass march stops (max_samples)
    start = first_hit(rays, plan.t_in, torch.minimum(plan.t_out, end), grid.coarse())
    plan.hit &= torch.isfinite(start)
    k0 = torch.where(plan.hit, torch.maximum(plan.k0, torch.floor((start - plan.near) / plan.step)), plan.k0)
    plan.t_out = torch.minimum(plan.t_out, end)
    plan.t_in = torch.maximum(plan.t_in, torch.where(plan.hit, start, plan.t_in))
    plan.k0 = k0
    if plan.hit.any():
        span = (plan.t_out - (plan.near + k0 * plan.step))[plan.hit]
        plan.n = max(1, int(torch.ceil(span.max() / plan.step).item()) + 1)


def _terminated_windows(field: Field, rays: Rays, s: RenderSettings) -> Iterator[tuple[torch.Tensor, RaySamples, torch.Tensor]]:
    """March `rays` `s.window` steps at a time without gradients, yielding per window the rays still going `idx`
    (K,), their samples (RaySamples over those K rays) and the samples' rendering weights (K, window), already
    multiplied by the transmittance each ray brought in. Rays leave once their transmittance drops below
    `s.stop_transmittance` (behind an opaque surface nothing more can be seen) or their box ends, so the march,
    the occupancy look-ups and the density of every later step are skipped.

    The same samples (up to the stop) get the same weights as in one pass: each window's weights are its own
    front-to-back weights times the transmittance the ray brought in. What a stopped ray leaves out weighs less
    than `s.stop_transmittance` in total; a ray whose samples no edit touches stops at the same step as before.
    """
    with PROFILER.phase("march"):
        plan = plan_march(rays, field.aabb, s.near, s.far, s.step, None, s.max_samples, s.contraction)
        if isinstance(field.occupancy, OccupancyGrid) and s.contraction is None:
            _skip_empty_front(rays, plan, field.occupancy, s)
    trans = torch.ones(len(rays), device=rays.origins.device)
    idx = plan.hit.nonzero()[:, 0]
    for j0 in range(0, plan.n, s.window):
        if len(idx) == 0:
            break
        j1 = min(j0 + s.window, plan.n)
        with PROFILER.phase("march"):
            smp = march_window(rays, plan, j0, j1, field.occupancy, idx)
        with PROFILER.phase("density"):
            sigma = scatter_samples(smp.mask, field.density(smp.positions))
        w, left = weights_from_density(sigma, smp.dt)
        w = w * trans[idx, None]
        yield idx, smp, w
        trans[idx] = trans[idx] * left
        last_t = plan.near + (plan.k0[idx] + (j1 - 1) + plan.offset[idx, 0]) * plan.step
        idx = idx[(trans[idx] > s.stop_transmittance) & (last_t + plan.step < plan.t_out[idx])]


@dataclass
class VisibleSamples:
    """The samples of R rays that a render composites (rendering weight above the settings' threshold), flat:
    `ray` (M,) which ray each belongs to, `t` (M,) its distance along the ray, `weight` (M,) its rendering weight."""

    ray: torch.Tensor
    t: torch.Tensor
    weight: torch.Tensor


@torch.no_grad()
def visible_samples(field: Field, rays: Rays, settings: RenderSettings) -> VisibleSamples:
    """Where `rays` see `field`: the samples `render_field` would composite colour and features from (without
    jitter), with their weights. Rendering features of a frozen field again is then only a weighted sum of the
    feature function at o + t d, with no march and no density (`dfield.features.fitting`).

    Example:
        >>> class Slab:  # a half-opaque slab at 0.5 < z < 0.6
        ...     aabb, occupancy, features = torch.tensor([[-1.0] * 3, [1.0] * 3]), None, None
        ...     def density(self, x): return 7.0 * ((x[:, 2] > 0.5) & (x[:, 2] < 0.6))
        >>> rays = Rays(torch.tensor([[0.0, 0, -3]]), torch.tensor([[0.0, 0, 1]]))
        >>> v = visible_samples(Slab(), rays, RenderSettings(0.0, 6.0, 0.01, torch.ones(3)))
        >>> round(v.weight.sum().item(), 2), round(v.t.min().item(), 1), round(v.t.max().item(), 1)
        (0.5, 3.5, 3.6)
    """
    parts = []
    for idx, smp, w in _terminated_windows(field, rays, settings):
        keep = smp.mask & (w > settings.weight_threshold)
        parts.append((idx[:, None].expand_as(keep)[keep], smp.t[keep], w[keep]))
    if not parts:
        empty = rays.origins.new_zeros(0)
        return VisibleSamples(empty.long(), empty, empty)
    return VisibleSamples(*(torch.cat(x) for x in zip(*parts)))


def composite_samples(fn: Callable[[torch.Tensor], torch.Tensor], rays: Rays, samples: VisibleSamples) -> torch.Tensor:
    """(R, C) per-ray weighted sums of `fn` (points (M, 3) -> (M, C)) at the visible samples of `rays`: what
    `render_field` composites for features, from samples found before (its `visible` output, `visible_samples`).

    Example:
        >>> rays = Rays(torch.zeros(2, 3), torch.tensor([[0.0, 0, 1], [1.0, 0, 0]]))
        >>> seen = VisibleSamples(torch.tensor([0, 0, 1]), torch.tensor([1.0, 2.0, 3.0]), torch.tensor([0.5, 0.25, 1.0]))
        >>> composite_samples(lambda x: x, rays, seen)  # 0.5 * (0, 0, 1) + 0.25 * (0, 0, 2); 1.0 * (3, 0, 0)
        tensor([[0., 0., 1.],
                [3., 0., 0.]])
    """
    pos = rays.origins[samples.ray] + rays.directions[samples.ray] * samples.t[:, None]
    v = fn(pos)
    v = v[:, None] if v.dim() == 1 else v
    return v.new_zeros(len(rays), v.shape[1]).index_add(0, samples.ray, samples.weight[:, None].to(v) * v)


def _render_terminated(field: Field, rays: Rays, s: RenderSettings, features: bool,
                       channels: dict[str, Callable] | None, colors: bool = True,
                       visible: bool = False) -> dict[str, torch.Tensor | VisibleSamples]:
    """`render_field` without gradients, through `_terminated_windows` (rays stop once nothing more can be seen)."""
    R, device = len(rays), rays.origins.device
    rgb = torch.zeros(R, 3, device=device)
    depth = torch.zeros(R, device=device)
    acc = torch.zeros(R, device=device)
    wide: dict[str, torch.Tensor] = {}
    seen: list[tuple[torch.Tensor, torch.Tensor, torch.Tensor]] = []
    wanted = {} if not (features and field.features is not None) else {"feature": field.features}
    wanted.update({name: (lambda fn: lambda p: fn(p).float())(fn) for name, fn in (channels or {}).items()})
    for idx, smp, w in _terminated_windows(field, rays, s):
        heavy = w[smp.mask] > s.weight_threshold
        color_mask = smp.mask.clone()
        color_mask[smp.mask] = heavy
        pos = smp.positions[heavy]
        ray_heavy = idx[smp.ray_index[heavy]]
        if len(pos):
            w_heavy = w[color_mask]
            if visible:
                seen.append((ray_heavy, smp.t[color_mask], w_heavy))
            if colors:
                with PROFILER.phase("color"):
                    col = field.color(pos, rays.directions[ray_heavy])
                rgb.index_add_(0, ray_heavy, w_heavy[:, None] * col)
            for name, fn in wanted.items():
                with PROFILER.phase("features" if name == "feature" else "channels"):
                    v = fn(pos)
                v = v[:, None] if v.dim() == 1 else v
                if name not in wide:
                    wide[name] = v.new_zeros(R, v.shape[1])
                wide[name].index_add_(0, ray_heavy, w_heavy[:, None].to(v) * v)
        depth[idx] += (w * smp.t).sum(-1)
        acc[idx] += w.sum(-1)
    out = {"depth": depth, "acc": acc}
    if colors:
        out["rgb"] = rgb + (1.0 - acc)[:, None] * s.background
    if visible:
        empty = rays.origins.new_zeros(0)
        out["visible"] = (VisibleSamples(*(torch.cat(x) for x in zip(*seen))) if seen
                          else VisibleSamples(empty.long(), empty, empty))
    for name in wanted:
        if name in wide:
            out[name] = wide[name] if name == "feature" else wide[name].squeeze(-1)
        else:  # nothing visible anywhere: zeros of the right width
            v = wanted[name](field.aabb.mean(0, keepdim=True).to(device))  # any point: only its width counts
            zeros = rays.origins.new_zeros(R, 1 if v.dim() == 1 else v.shape[1])
            out[name] = zeros if name == "feature" else zeros.squeeze(-1)
    return out
