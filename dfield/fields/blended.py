"""Blended fields (Blending-NeRF): a frozen source field and a small trainable edit field combined per point.

At every point the edit field gives a density sigma_E, a colour c_E, a density blending ratio rho_sigma (how
much of the source's density is removed) and a colour blending ratio rho_c (how much of the source's colour is
replaced); a 3D attention field A(x) in [0, 1] (dfield.fields.attention, LENeRF) gates all three, so outside
the attention the result is the source, bit for bit. With g = min(1, A / a_full), r_sigma = g rho_sigma,
r_c = g rho_c and s_E = A sigma_E:

    sigma_B = (1 - r_sigma) sigma_S + s_E
    c_B     = [(1 - r_sigma) sigma_S ((1 - r_c) c_S + r_c c_E) + s_E c_E] / sigma_B

The three edit kinds of the paper switch these terms on: density addition ("add": s_E), density removal
("remove": r_sigma) and colour change ("color": r_c). The two ratios saturate at attention a_full
(`ratio_full`): a distilled attention often holds 0.9 or 0.97 inside an object, which would leave a tenth of a
removed object's density standing (a visible ghost) and a tenth of its old colour mixed into a recolour. An
optional deformation field moves where the source is read inside the attention (x -> x + A(x) delta(x)) for shape
changes.

The edit field is a dense grid over the attention's box (EditField says why not a factorised one). Its colour
follows the source colour through one per-channel gain, c_E = c_S * exp(g): a change of albedo under the scene's
own lighting, so a recolour seen in two views holds for every shade (lit, shadowed, the checker's dark squares)
and every side no view showed. Added matter has no source colour to follow; there (`color_model="free"`) the edit
colour is a residual MLP of a spatial latent z(x) and c_S in logit space:
c_E = sigmoid(logit(c_S) + MLP(z(x), c_S)).
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass

import torch
import torch.nn as nn
import torch.nn.functional as F

from dfield.core.sampling import OccupancyGrid
from dfield.fields.attention import AttentionField

KINDS = ("add", "remove", "color")


def blend(sigma_s: torch.Tensor, c_s: torch.Tensor, sigma_e: torch.Tensor, c_e: torch.Tensor, r_sigma: torch.Tensor,
          r_color: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Blend source and edit values at N points (Blending-NeRF's operations).

    .. math::
        \\sigma_B = (1 - r_\\sigma)\\,\\sigma_S + \\sigma_E, \\qquad
        c_B = \\frac{(1 - r_\\sigma)\\,\\sigma_S\\,((1 - r_c)\\,c_S + r_c\\,c_E) + \\sigma_E\\,c_E}{\\sigma_B}

    Ratios 0 and no edit density give the source exactly (up to rounding); ratios 1 give the edit. Where both
    densities are zero the colour is the ratio-mixed colour (it carries no weight).

    Args:
        sigma_s: (N,) source densities.
        c_s: (N, 3) source colours.
        sigma_e: (N,) edit densities (already gated by the attention).
        c_e: (N, 3) edit colours.
        r_sigma: (N,) density removal ratios in [0, 1].
        r_color: (N,) colour blending ratios in [0, 1].

    Returns:
        blended densities (N,) and colours (N, 3).

    Example:
        >>> s, c = torch.tensor([4.0, 4.0]), torch.tensor([[1.0, 0, 0], [1.0, 0, 0]])
        >>> e, ce = torch.tensor([0.0, 2.0]), torch.tensor([[0.0, 1, 0], [0.0, 1, 0]])
        >>> sigma, color = blend(s, c, e, ce, torch.tensor([0.0, 1.0]), torch.tensor([0.0, 1.0]))
        >>> sigma.tolist(), color.tolist()  # point 0: the source; point 1: the edit alone
        ([4.0, 2.0], [[1.0, 0.0, 0.0], [0.0, 1.0, 0.0]])
    """
    kept = (1 - r_sigma) * sigma_s
    sigma = kept + sigma_e
    mixed = (1 - r_color)[:, None] * c_s + r_color[:, None] * c_e
    # The edit's share of the density, in [0, 1] even where both densities are tiny.
    share = torch.where(sigma > 0, sigma_e / sigma.clamp(min=1e-12), torch.zeros_like(sigma))
    return sigma, (1 - share)[:, None] * mixed + share[:, None] * c_e


@dataclass
class EditFieldConfig:
    """Widths of an EditField and where its values start."""

    latent_dim: int = 8
    """Width of the spatial latent z(x) the colour MLP reads."""
    hidden: int = 32
    """Hidden width of the colour MLP."""
    density_shift: float = -6.0
    """sigma_E = softplus(g + shift) * scale with the grid's density channel g starting at 0: the edit starts with a
    faint density (0.06), small enough to leave renders as they were, large enough to get gradients."""
    density_scale: float = 25.0
    latent_init: float = 0.0
    """Standard deviation of the latent channels at the start (0: the colour starts as a function of c_S alone)."""
    removal_init: float = -5.0
    """Logit of the density removal ratio at the start (-5: 0.7 % removed)."""
    color_init: float = 4.0
    """Logit of the colour blending ratio at the start (4: the edit colour, which starts equal to the source's)."""
    color_model: str = "free"
    """How the edit colour follows the source's: `gain` (c_S times one learned per-channel gain: a recolour, which
    carries from painted views to every shade and side; what dfield guide-edit uses unless matter is added) or
    `free` (an MLP of the latent and c_S: any colour, for added matter; also what edit runs written before the
    gain existed used, so it is the default when a saved config does not say)."""


class EditField(nn.Module):
    """The trainable part of a blended field over the box `aabb`: a dense grid of `res` cells per axis with, per
    cell, an added-density logit, the two blending-ratio logits (density removal, colour) and a latent z(x); and
    the colour MLP. Values between cell centres are trilinear.

    A dense grid rather than the scene's factorised one: the edit's box is small (48^3 cells by default), and a
    product of factors that start small starts at a saddle (every factor's gradient is scaled by the others); the
    first version of this field, VM-factorised, never moved its latent or added density off zero.

    Example:
        >>> e = EditField(torch.tensor([[0.0] * 3, [1.0] * 3]), (8, 8, 8))
        >>> x, c = torch.rand(4, 3), torch.full((4, 3), 0.3)
        >>> z = e.latent(x)
        >>> torch.allclose(e.color(z, c), c), e.ratios(x).shape  # the colour starts as the source's
        (True, torch.Size([4, 2]))
    """

    def __init__(self, aabb: torch.Tensor, res, cfg: EditFieldConfig | None = None):
        super().__init__()
        cfg = EditFieldConfig() if cfg is None else dataclasses.replace(cfg)
        self.cfg = cfg
        self.register_buffer("aabb", aabb.detach().clone().float())
        res = tuple(int(r) for r in res)
        g = torch.zeros(3 + cfg.latent_dim, *res)
        g[1], g[2] = cfg.removal_init, cfg.color_init
        g[3:] = torch.randn(cfg.latent_dim, *res, generator=torch.Generator().manual_seed(0)) * cfg.latent_init
        self.grid = nn.Parameter(g)
        self.color_mlp = nn.Sequential(nn.Linear(cfg.latent_dim + 3, cfg.hidden), nn.ReLU(),
                                       nn.Linear(cfg.hidden, cfg.hidden), nn.ReLU(), nn.Linear(cfg.hidden, 3))
        nn.init.zeros_(self.color_mlp[-1].weight)
        nn.init.zeros_(self.color_mlp[-1].bias)
        if cfg.color_model not in ("gain", "free"):
            raise ValueError(f"color_model is 'gain' or 'free', got {cfg.color_model!r}")
        self.gain = nn.Parameter(torch.zeros(3))  # log of the per-channel gain: starts as the source colour
        self._register_load_state_dict_pre_hook(self._default_gain)

    @staticmethod
    def _default_gain(state_dict, prefix, *args):
        # Edit runs saved before the gain existed have none (and use the free model, which does not read it).
        state_dict.setdefault(prefix + "gain", torch.zeros(3))

    @property
    def res(self) -> tuple[int, int, int]:
        """Cells per axis of the grid."""
        return tuple(self.grid.shape[1:])

    def sample(self, x: torch.Tensor, channels: slice) -> torch.Tensor:
        """(N, 3) world points -> (N, C) trilinear grid values of `channels` (clamped to the box's border)."""
        aabb = self.aabb.to(x)
        u = ((x - aabb[0]) / (aabb[1] - aabb[0])).clamp(0, 1)
        g = (u * 2 - 1)[:, [2, 1, 0]].reshape(1, -1, 1, 1, 3)  # grid_sample wants (z, y, x) order
        v = F.grid_sample(self.grid[channels][None].to(x), g, mode="bilinear", padding_mode="border",
                          align_corners=False)
        return v.reshape(v.shape[1], -1).T

    def density(self, x: torch.Tensor) -> torch.Tensor:
        """(N, 3) -> (N,) added density sigma_E >= 0."""
        return F.softplus(self.sample(x, slice(0, 1))[:, 0] + self.cfg.density_shift) * self.cfg.density_scale

    def ratios(self, x: torch.Tensor) -> torch.Tensor:
        """(N, 3) -> (N, 2): density removal ratio rho_sigma and colour blending ratio rho_c, in [0, 1]."""
        return torch.sigmoid(self.sample(x, slice(1, 3)))

    def latent(self, x: torch.Tensor) -> torch.Tensor:
        """(N, 3) -> (N, latent_dim) spatial latent z(x)."""
        return self.sample(x, slice(3, None))

    def color(self, z: torch.Tensor, c_src: torch.Tensor) -> torch.Tensor:
        """Latents (N, latent_dim) and source colours (N, 3) -> edit colours (N, 3): c_S * exp(g) clamped to [0, 1]
        (`gain`), or sigmoid(logit(c_S) + MLP(z, c_S)) (`free`)."""
        if self.cfg.color_model == "gain":
            return (c_src * torch.exp(self.gain).to(c_src)).clamp(0, 1)
        base = torch.logit(c_src.clamp(1e-4, 1 - 1e-4))
        return torch.sigmoid(base + self.color_mlp(torch.cat([z, c_src], -1)))

    def regularizers(self) -> dict[str, torch.Tensor]:
        """Priors by name: `latent` (mean square plus total variation of the latent: the colour mapping varies in
        space only where the data asks, and smoothly), `density` (mean added density over the grid: no matter that
        no view asks for) and `tv` (total variation of the density and ratio logits: cells no ray supervises
        follow their neighbours)."""
        g = self.grid
        tv = lambda v: sum((v.diff(dim=k) ** 2).mean() for k in (1, 2, 3))  # noqa: E731
        sigma = F.softplus(g[0] + self.cfg.density_shift) * self.cfg.density_scale
        return {"latent": g[3:].square().mean() + tv(g[3:]), "density": sigma.mean(), "tv": tv(g[:3])}


class DeformationField(nn.Module):
    """A per-point offset over a box: a dense (3, X, Y, Z) grid, zero at the start and zero outside the box.

    Example:
        >>> d = DeformationField(torch.tensor([[0.0] * 3, [1.0] * 3]), (4, 4, 4))
        >>> d(torch.rand(5, 3)).abs().max().item()
        0.0
    """

    def __init__(self, aabb: torch.Tensor, res):
        super().__init__()
        self.register_buffer("aabb", aabb.detach().clone().float())
        self.offsets = nn.Parameter(torch.zeros(3, *(int(r) for r in res)))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """(N, 3) world points -> (N, 3) offsets."""
        if len(x) == 0:
            return x.new_zeros(0, 3)
        aabb = self.aabb.to(x)
        u = (x - aabb[0]) / (aabb[1] - aabb[0])
        inside = ((u >= 0) & (u <= 1)).all(-1, keepdim=True)
        g = (u * 2 - 1)[:, [2, 1, 0]].reshape(1, -1, 1, 1, 3)
        v = F.grid_sample(self.offsets[None].to(x), g, mode="bilinear", padding_mode="border", align_corners=False)
        return torch.where(inside, v.reshape(3, -1).T, torch.zeros_like(x))

    def regularizers(self) -> dict[str, torch.Tensor]:
        """`deform` (mean squared offset: move no more than needed) and `deform_tv` (neighbours move together)."""
        g = self.offsets
        return {"deform": g.square().mean(), "deform_tv": sum((g.diff(dim=k) ** 2).mean() for k in (1, 2, 3))}


class BlendedField:
    """A source field (any dfield.core.rendering.Field) blended with an edit field under an attention field.

    `kinds` picks the edit kinds (a subset of KINDS). With "add", density may appear where the source has none:
    the box grows to the attention's support and the occupancy marks it (or takes `occupancy`, made before).
    `ratio_full`: the attention from which the blending ratios act fully (module docstring).
    Outside the attention every value is the source's, passed
    through untouched; `touched(x)` says where that is not guaranteed. Features pass through from the source
    (the edit adds no meaning of its own), so queries answer on an edited scene as on the original.

    Example:
        >>> from dfield.core.rendering import RenderSettings, render_field
        >>> from dfield.core.rays import Rays
        >>> class Ball:  # an opaque red ball of radius 0.5
        ...     aabb, occupancy, features = torch.tensor([[-1.0] * 3, [1.0] * 3]), None, None
        ...     def density(self, x): return 200.0 * (x.norm(dim=-1) < 0.5)
        ...     def color(self, x, d): return torch.tensor([1.0, 0, 0]).expand(len(x), 3)
        >>> box = torch.tensor([[-0.6] * 3, [0.6] * 3])
        >>> edit = EditField(box, (8, 8, 8))
        >>> with torch.no_grad():
        ...     _ = edit.grid[1].fill_(20.0)  # remove everything the attention covers
        >>> f = BlendedField(Ball(), edit, AttentionField(box, (8, 8, 8), torch.ones(8, 8, 8)), ["remove"])
        >>> rays = Rays(torch.tensor([[0.0, 0, -3]]), torch.tensor([[0.0, 0, 1]]))
        >>> out = render_field(f, rays, RenderSettings(0.0, 6.0, 0.01, torch.ones(3)))
        >>> round(out["acc"].item(), 3)  # the ball is gone
        0.0
    """

    def __init__(self, source, edit: EditField, attention: AttentionField, kinds,
                 deform: DeformationField | None = None, occupancy=None, ratio_full: float = 1.0):
        kinds = frozenset(kinds)
        if not kinds or not kinds <= set(KINDS):
            raise ValueError(f"edit kinds must be a non-empty subset of {KINDS}, got {sorted(kinds)}")
        self.source, self.edit, self.attention, self.kinds, self.deform = source, edit, attention, kinds, deform
        if not 0 < ratio_full <= 1:
            raise ValueError(f"ratio_full is in (0, 1], got {ratio_full}")
        self.ratio_full = float(ratio_full)
        box = attention.support_box().to(source.aabb)
        self.aabb = torch.stack([torch.minimum(source.aabb[0], box[0]), torch.maximum(source.aabb[1], box[1])]) \
            if "add" in kinds else source.aabb
        if "add" not in kinds:
            self.occupancy = source.occupancy
        else:  # `occupancy`: one made earlier for the same attention (a full-grid pass is not free)
            self.occupancy = occupancy if occupancy is not None else \
                blended_occupancy(source.occupancy, attention, self.aabb)
        self.features = source.features
        self.selection = _AttentionMask(attention)

    # -- the blend at points inside the attention -------------------------------------------------------------
    def parts(self, x: torch.Tensor, a: torch.Tensor, d: torch.Tensor | None = None,
              sigma_s: torch.Tensor | None = None) -> dict[str, torch.Tensor]:
        """Everything blended at points `x` (M, 3) with attention `a` (M,) > 0: sigma_s, sigma_e (gated), r_sigma,
        r_color, sigma (blended) and, with directions `d`, c_s, c_e and color (blended). `sigma_s` may be passed
        when the source density there is already known (no deformation)."""
        y = x if self.deform is None else x + a[:, None] * self.deform(x)
        if sigma_s is None or self.deform is not None:
            sigma_s = self.source.density(y)
        rho = self.edit.ratios(x)
        zero = torch.zeros_like(a)
        gate = (a / self.ratio_full).clamp(max=1)
        r_sigma = gate * rho[:, 0] if "remove" in self.kinds else zero
        r_color = gate * rho[:, 1] if "color" in self.kinds else zero
        sigma_e = a * self.edit.density(x) if "add" in self.kinds else zero
        out = {"sigma_s": sigma_s, "sigma_e": sigma_e, "r_sigma": r_sigma, "r_color": r_color,
               "sigma": (1 - r_sigma) * sigma_s + sigma_e}
        if d is not None:
            c_s = self.source.color(y, d)
            c_e = self.edit.color(self.edit.latent(x), c_s) if self.kinds & {"add", "color"} else c_s
            out["sigma"], out["color"] = blend(sigma_s, c_s, sigma_e, c_e, r_sigma, r_color)
            out["c_s"], out["c_e"] = c_s, c_e
        return out

    # -- the Field interface ---------------------------------------------------------------------------------
    def density(self, x: torch.Tensor) -> torch.Tensor:
        """(N, 3) -> (N,) blended density (the source's outside the attention)."""
        a = self.attention(x)
        m = (a > 0).nonzero()[:, 0]
        sigma = self.source.density(x)
        if len(m) == 0:
            return sigma
        p = self.parts(x[m], a[m], sigma_s=sigma[m])
        return sigma.index_put((m,), p["sigma"].to(sigma.dtype))

    def color(self, x: torch.Tensor, d: torch.Tensor) -> torch.Tensor:
        """(N, 3) points, (N, 3) directions -> (N, 3) blended colours (the source's outside the attention)."""
        a = self.attention(x)
        m = (a > 0).nonzero()[:, 0]
        c = self.source.color(x, d)
        if len(m) == 0:
            return c
        p = self.parts(x[m], a[m], d[m])
        return c.index_put((m,), p["color"].to(c.dtype))

    def touched(self, x: torch.Tensor) -> torch.Tensor:
        """(N, 3) -> (N,) bool: where the attention is not zero (everywhere else values are the source's)."""
        return self.attention(x) > 0

    def parameters(self):
        """The trainable parameters: edit field, attention and deformation (never the source's)."""
        mods = [self.edit, self.attention] + ([self.deform] if self.deform is not None else [])
        return [p for m in mods for p in m.parameters()]


class _AttentionMask:
    """The attention as a hard selection (mask at 0.5), for scoring an edit's region like other edits'."""

    threshold = 0.5

    def __init__(self, attention: AttentionField):
        self.attention = attention

    def mask(self, x):
        return self.attention(x) >= self.threshold


class _Either:
    """Occupancy for sources without a grid: the source's marks or the attention's support."""

    def __init__(self, occupancy, attention: AttentionField):
        self.occupancy, self.attention = occupancy, attention

    def query(self, x):
        return self.occupancy.query(x) | (self.attention(x) > 0)


@torch.no_grad()
def blended_occupancy(occupancy, attention: AttentionField, aabb: torch.Tensor):
    """The source's occupancy with the attention's support added (an edit may put density where there was none),
    over `aabb`. Source cells keep their marks; a grown copy of the attention's support is added on top."""
    if occupancy is None:
        return None
    if not isinstance(occupancy, OccupancyGrid):
        return _Either(occupancy, attention)
    grid = OccupancyGrid(aabb, occupancy.resolution)
    if torch.equal(aabb, occupancy.aabb):
        occ = occupancy.occupied.clone()
    else:  # a larger box: re-mark the source's cells on the new grid, grown by one cell to miss none
        occ = occupancy.query(grid.cell_centers()).reshape(grid.occupied.shape).float()
        occ = F.max_pool3d(occ[None, None], 3, stride=1, padding=1)[0, 0] > 0
    add = (attention(grid.cell_centers()) > 0).reshape(occ.shape).float()
    add = F.max_pool3d(add[None, None], 3, stride=1, padding=1)[0, 0] > 0
    grid.occupied = occ | add.to(occ.device)
    return grid
