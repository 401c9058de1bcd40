"""The original NeRF as a reference: positional-encoding MLPs, coarse stratified + fine importance sampling.

Paper-faithful defaults (8 x 256 layers, skip at layer 5, 64 coarse + 128 fine samples). It is about
13 s per 1024-ray step on a 2-core CPU, so it serves as a baseline, not as something to train here.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass

import torch
import torch.nn as nn
import torch.nn.functional as F

from dfield.core.rays import Rays
from dfield.core.rendering import composite, weights_from_density
from dfield.fields.encoding import encoding_dim, positional_encoding
from dfield.models.base import Model
from dfield.models.losses import photometric_loss


@dataclass
class NeRFModelConfig:
    """Settings of the NeRF baseline: MLP depth, width and skip layer, positional-encoding frequencies for
    positions and directions, coarse and fine samples per ray, and the learning rate."""

    depth: int = 8
    width: int = 256
    skip: int = 4
    pos_freqs: int = 10
    dir_freqs: int = 4
    n_coarse: int = 64
    n_fine: int = 128
    lr: float = 5e-4


class NeRFMLP(nn.Module):
    def __init__(self, cfg: NeRFModelConfig):
        super().__init__()
        self.cfg = cfg
        pin, din = encoding_dim(3, cfg.pos_freqs), encoding_dim(3, cfg.dir_freqs)
        layers = []
        for i in range(cfg.depth):
            n_in = pin if i == 0 else cfg.width + (pin if i == cfg.skip + 1 else 0)
            layers.append(nn.Linear(n_in, cfg.width))
        self.layers = nn.ModuleList(layers)
        self.sigma = nn.Linear(cfg.width, 1)
        self.feature = nn.Linear(cfg.width, cfg.width)
        self.rgb = nn.Sequential(nn.Linear(cfg.width + din, cfg.width // 2), nn.ReLU(), nn.Linear(cfg.width // 2, 3))

    def forward(self, x: torch.Tensor, d: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        ex = positional_encoding(x, self.cfg.pos_freqs)
        h = ex
        for i, layer in enumerate(self.layers):
            if i == self.cfg.skip + 1:
                h = torch.cat([h, ex], -1)
            h = F.relu(layer(h))
        sigma = F.relu(self.sigma(h)[:, 0])
        rgb = torch.sigmoid(self.rgb(torch.cat([self.feature(h), positional_encoding(d, self.cfg.dir_freqs)], -1)))
        return sigma, rgb


def _sample_pdf(bins: torch.Tensor, weights: torch.Tensor, n: int, det: bool, gen: torch.Generator | None) -> torch.Tensor:
    """Inverse-CDF samples from piecewise-constant weights over bins (R, S+1) -> (R, n)."""
    w = weights + 1e-5
    pdf = w / w.sum(-1, keepdim=True)
    cdf = torch.cat([torch.zeros_like(pdf[:, :1]), torch.cumsum(pdf, -1)], -1)
    if det:
        u = torch.linspace(0, 1, n, device=bins.device).expand(len(bins), n).contiguous()
    else:
        u = torch.rand(len(bins), n, generator=gen).to(bins.device)
    idx = torch.searchsorted(cdf, u, right=True).clamp(1, cdf.shape[-1] - 1)
    c0, c1 = cdf.gather(1, idx - 1), cdf.gather(1, idx)
    b0, b1 = bins.gather(1, idx - 1), bins.gather(1, idx)
    frac = ((u - c0) / (c1 - c0).clamp(min=1e-8)).clamp(0, 1)
    return b0 + frac * (b1 - b0)


class NeRFModel(Model):
    """Coarse and fine PE-MLPs; the coarse network's colour is trained too (its own photometric term)."""

    def __init__(self, near: float, far: float, background, cfg: NeRFModelConfig | None = None):
        super().__init__()
        self.cfg = NeRFModelConfig() if cfg is None else dataclasses.replace(cfg)
        self.near, self.far = float(near), float(far)
        self.register_buffer("background", torch.as_tensor(background, dtype=torch.float32))
        self.coarse = NeRFMLP(cfg)
        self.fine = NeRFMLP(cfg)

    def _render(self, mlp: NeRFMLP, rays: Rays, t: torch.Tensor) -> dict[str, torch.Tensor]:
        r, s = t.shape
        pts = rays.origins[:, None] + rays.directions[:, None] * t[..., None]
        dirs = rays.directions[:, None].expand(r, s, 3)
        sigma, rgb = mlp(pts.reshape(-1, 3), dirs.reshape(-1, 3))
        dt = torch.cat([t[:, 1:] - t[:, :-1], torch.full_like(t[:, :1], 1e10)], -1) * rays.directions.norm(dim=-1, keepdim=True)
        w, _ = weights_from_density(sigma.view(r, s), dt)
        acc = w.sum(-1)
        return {"rgb": composite(w, rgb.view(r, s, 3)) + (1 - acc)[:, None] * self.background,
                "depth": (w * t).sum(-1), "acc": acc, "weights": w}

    def render_rays(self, rays: Rays, generator: torch.Generator | None = None, features: bool = False,
                    visible: bool = False) -> dict[str, torch.Tensor]:
        """`features` and `visible` are accepted for the common signature; this model has no feature field and
        samples its own way, so neither is returned."""
        n, dev = self.cfg.n_coarse, rays.origins.device
        edges = torch.linspace(self.near, self.far, n + 1, device=dev).expand(len(rays), n + 1)
        if generator is not None:
            u = torch.rand(len(rays), n, generator=generator).to(dev)
        else:
            u = torch.full((len(rays), n), 0.5, device=dev)
        t_c = edges[:, :-1] + u * (edges[:, 1:] - edges[:, :-1])
        coarse = self._render(self.coarse, rays, t_c)
        mids = 0.5 * (t_c[:, 1:] + t_c[:, :-1])
        bins = torch.cat([edges[:, :1], mids, edges[:, -1:]], -1)
        t_f = _sample_pdf(bins, coarse["weights"].detach(), self.cfg.n_fine, generator is None, generator)
        t_all, _ = torch.sort(torch.cat([t_c, t_f.detach()], -1), -1)
        fine = self._render(self.fine, rays, t_all)
        return {"rgb": fine["rgb"], "depth": fine["depth"], "acc": fine["acc"], "rgb_coarse": coarse["rgb"]}

    def losses(self, out: dict[str, torch.Tensor], target_rgb: torch.Tensor) -> dict[str, torch.Tensor]:
        """MSE of the fine and of the coarse colour, as in the paper."""
        return {**super().losses(out, target_rgb), "rgb_coarse": photometric_loss(out["rgb_coarse"], target_rgb)}

    def param_groups(self, lr_scale: float = 1.0) -> list[dict]:
        return [{"params": list(self.parameters()), "lr": self.cfg.lr * lr_scale, "name": "network"}]
