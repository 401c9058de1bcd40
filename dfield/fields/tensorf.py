"""The default radiance field: factorised (VM) density and appearance volumes plus a small colour MLP.

A field is a function of points: `density(x)` and `color(x, d)` take world points inside `aabb`.
The box can shrink during training (to the occupied region) and the volumes be resampled finer; both
keep what was learned.
"""

from __future__ import annotations

import dataclasses
import functools
from dataclasses import dataclass
from typing import Literal

import torch
import torch.nn as nn
import torch.nn.functional as F

from dfield.core.contraction import Contraction
from dfield.fields.encoding import encoding_dim, positional_encoding
from dfield.fields.vm import VMVolume


@dataclass
class TensoRFConfig:
    """Ranks and widths of a TensoRFField: VM components of the density and appearance volumes, the colour
    MLP (appearance width, hidden width, positional-encoding frequencies), the density activation and the
    optional feature volume."""

    density_comp: int = 16
    app_comp: int = 48
    app_dim: int = 27
    hidden: int = 128
    view_freqs: int = 2
    feat_freqs: int = 2
    # softplus(feature + shift) * scale: a negative shift starts the scene empty, the scale sets how
    # quickly density grows per unit of feature.
    density_shift: float = -10.0
    density_scale: float = 25.0
    init_scale: float = 0.1
    feature_dim: int = 0
    """Width of the distilled feature field (0: none). A linear decoder maps it to the teacher's width."""
    feature_comp: int = 16
    """VM components per plane of the feature volume."""
    mlp_precision: Literal["auto", "float32", "bfloat16"] = "auto"
    """Arithmetic of the colour MLP. bfloat16 runs its matrix products 2.6x faster (forward + backward, 9k samples,
    2 cores of an AMD EPYC with AVX512-BF16) for a 0.4 % relative error in the colour logits; auto uses it where
    the processor has bf16 matrix units (CPUs with AVX512-BF16 or AMX, CUDA GPUs that support bf16)."""


BF16_ROWS = 4096
"""Row multiple the bf16 colour MLP pads its input to (see TensoRFField.color)."""


@functools.cache
def _bf16_matmul_units(device_type: str) -> bool:
    if device_type == "cuda":
        return torch.cuda.is_bf16_supported()
    if device_type == "cpu":
        return torch.backends.mkldnn.is_available() and torch.ops.mkldnn._is_mkldnn_bf16_supported()
    return False


def bf16_matmul(device: torch.device, precision: str = "auto") -> bool:
    """Whether the colour MLP runs in bfloat16 on `device` for a `mlp_precision` setting (see TensoRFConfig)."""
    if precision not in ("auto", "float32", "bfloat16"):
        raise ValueError(f"mlp_precision {precision!r}: expected auto, float32 or bfloat16")
    return precision == "bfloat16" or (precision == "auto" and _bf16_matmul_units(device.type))


class TensoRFField(nn.Module):
    """Density, colour and (optionally) low-dimensional features as functions of world points in `aabb`.

    Args:
        aabb: (2, 3) box the volumes span.
        res: (3,) grid resolution of the volumes.
        cfg: ranks and widths (default TensoRFConfig()).

    Example:
        >>> f = TensoRFField(torch.tensor([[-1.0] * 3, [1.0] * 3]), (16, 16, 16))
        >>> x, d = torch.zeros(5, 3), torch.tensor([[0.0, 0.0, 1.0]]).expand(5, 3)
        >>> f.density(x).shape, f.color(x, d).shape
        (torch.Size([5]), torch.Size([5, 3]))
    """

    def __init__(self, aabb: torch.Tensor, res, cfg: TensoRFConfig | None = None):
        super().__init__()
        cfg = TensoRFConfig() if cfg is None else dataclasses.replace(cfg)
        self.cfg = cfg
        self.register_buffer("aabb", aabb.clone().float())
        self.density_vol = VMVolume(cfg.density_comp, res, cfg.init_scale)
        self.app_vol = VMVolume(cfg.app_comp, res, cfg.init_scale)
        self.basis = nn.Linear(3 * cfg.app_comp, cfg.app_dim, bias=False)
        in_dim = cfg.app_dim + encoding_dim(cfg.app_dim, cfg.feat_freqs, False) + encoding_dim(3, cfg.view_freqs)
        self.mlp = nn.Sequential(
            nn.Linear(in_dim, cfg.hidden), nn.ReLU(inplace=True),
            nn.Linear(cfg.hidden, cfg.hidden), nn.ReLU(inplace=True),
            nn.Linear(cfg.hidden, 3),
        )
        nn.init.constant_(self.mlp[-1].bias, 0.0)
        self.feature_vol: VMVolume | None = None
        # Unbounded scenes: world points are contracted first and `aabb` is the contracted cube (see `normalize`).
        self.contraction: Contraction | None = None
        if cfg.feature_dim > 0:
            self.add_feature_volume(cfg.feature_dim, cfg.feature_comp)

    def add_feature_volume(self, dim: int, comp: int) -> None:
        """A fresh `dim`-wide feature volume of `comp` VM components at the current resolution (replaces any)."""
        # Its own volume: features must not share capacity (or gradients) with colour and density.
        device = self.aabb.device
        self.cfg = dataclasses.replace(self.cfg, feature_dim=dim, feature_comp=comp)
        self.feature_vol = VMVolume(comp, self.res, self.cfg.init_scale).to(device)
        self.feature_basis = nn.Linear(3 * comp, dim, bias=False).to(device)

    def drop_feature_volume(self) -> None:
        """Remove the feature volume and its basis."""
        self.cfg = dataclasses.replace(self.cfg, feature_dim=0)
        self.feature_vol = None
        if "feature_basis" in self._modules:
            del self.feature_basis

    @property
    def res(self) -> tuple[int, int, int]:
        """(X, Y, Z) resolution the volumes are currently sampled at."""
        return self.density_vol.res

    def normalize(self, x: torch.Tensor) -> torch.Tensor:
        """(N, 3) world points -> (N, 3) coordinates in the box, [0, 1] on each axis inside `aabb` (after the
        scene contraction, when the field has one: then every world point lands inside)."""
        if self.contraction is not None:
            x = self.contraction(x)
        return (x - self.aabb[0]) / (self.aabb[1] - self.aabb[0])

    def density(self, x: torch.Tensor) -> torch.Tensor:
        """(N, 3) world points -> (N,) densities: softplus(sum of density components + shift) * scale."""
        feat = self.density_vol(self.normalize(x)).sum(-1)
        return F.softplus(feat + self.cfg.density_shift) * self.cfg.density_scale

    def density_on_lattice(self, axes: list[torch.Tensor]) -> torch.Tensor:
        """Densities at every point of a lattice in box coordinates: axes are three 1D tensors in [0, 1] (lengths
        X, Y, Z, as `normalize` gives them) -> (X, Y, Z), what `density` gives at those points, at the cost of a few
        matrix products (`VMVolume.summed_on_lattice`)."""
        feat = self.density_vol.summed_on_lattice(axes)
        return F.softplus(feat + self.cfg.density_shift) * self.cfg.density_scale

    def app_features(self, x: torch.Tensor) -> torch.Tensor:
        """(N, 3) world points -> (N, app_dim) appearance features, the colour MLP's input."""
        return self.basis(self.app_vol(self.normalize(x)))

    def color(self, x: torch.Tensor, d: torch.Tensor) -> torch.Tensor:
        """(N, 3) world points, (N, 3) ray directions -> (N, 3) colours in [0, 1], from the MLP on the appearance
        features, their positional encoding and that of the direction."""
        f = self.app_features(x)
        h = torch.cat([f, positional_encoding(f, self.cfg.feat_freqs, False), positional_encoding(d, self.cfg.view_freqs)], -1)
        if bf16_matmul(h.device, self.cfg.mlp_precision):
            n = len(h)
            # Padded to a multiple of BF16_ROWS: oneDNN keeps a bf16 matmul primitive per input shape, and the
            # sample count changes every step (ragged shapes: peak RSS 3.2 GiB after 400 steps; padded: 0.95 GiB).
            h = F.pad(h, (0, 0, 0, -n % BF16_ROWS))
            with torch.autocast(h.device.type, dtype=torch.bfloat16):
                logits = self.mlp(h)
            return torch.sigmoid(logits[:n].float())
        return torch.sigmoid(self.mlp(h))

    def features(self, x: torch.Tensor) -> torch.Tensor:
        """Low-dimensional distilled features (N, feature_dim) at world points."""
        return self.feature_basis(self.feature_vol(self.normalize(x)))

    def volumes(self) -> list[VMVolume]:
        """The VM volumes: density, appearance and, when there is one, the feature volume."""
        return [v for v in (self.density_vol, self.app_vol, self.feature_vol) if v is not None]

    def grid_parameters(self) -> list[nn.Parameter]:
        """The planes and lines of every volume (the grid learning-rate group)."""
        return [p for v in self.volumes() for p in (v.planes, v.lines)]

    def network_parameters(self) -> list[nn.Parameter]:
        """The appearance basis, the colour MLP and the feature basis when there is one (the network group)."""
        extra = list(self.feature_basis.parameters()) if self.feature_vol is not None else []
        return list(self.basis.parameters()) + list(self.mlp.parameters()) + extra

    @torch.no_grad()
    def resize(self, res, aabb: torch.Tensor | None = None) -> None:
        """Resample the volumes at `res`, over a new (smaller) box if given."""
        if aabb is None:
            lo, hi = torch.zeros(3), torch.ones(3)
        else:
            lo, hi = self.normalize(aabb[0]).cpu(), self.normalize(aabb[1]).cpu()
        for vol in self.volumes():
            vol.crop(lo, hi, res)
        if aabb is not None:
            self.aabb.copy_(aabb)

    def l1_density(self) -> torch.Tensor:
        """Mean absolute density plane/line values: a sparsity prior that keeps empty space empty."""
        return self.density_vol.planes.abs().mean() + self.density_vol.lines.abs().mean()
