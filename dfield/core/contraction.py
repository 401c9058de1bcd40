"""Scene contraction for unbounded scenes: all of space squeezed into a cube a grid can cover, and where to put
samples along rays so they are spread evenly in that contracted space.

mip-NeRF 360's contraction keeps the unit ball as it is and maps everything outside into the shell up to radius 2:

.. math::
    C(x) = x \\ \\text{if} \\ \\|x\\| \\le 1, \\qquad C(x) = \\left(2 - \\frac{1}{\\|x\\|}\\right) \\frac{x}{\\|x\\|}
    \\ \\text{otherwise}

With the infinity norm (the default; as nerfstudio's `SceneContraction(order=inf)`) the "unit ball" is the cube
[-1, 1]^3 and the image of all space is the cube [-2, 2]^3, so a factorised grid over that cube uses every cell, and
far content (a sky, distant walls) lands on the cube's faces, which are planes: exactly what a VM factorisation
stores cheaply. With the L2 norm (mip-NeRF 360's) far content lands on a sphere.

Samples along a ray are uniform in a warped distance `s` (`warp`): equal to the ray distance t up to the ray's
*knee* (where it leaves the unit ball, or passes closest to it when it misses), and beyond it growing like the
contracted radius of a ray leaving the ball radially, s = knee + L - L^2 / (t - knee + L) with L the ray
parameter of one world unit, so the infinite rest of the ray takes only L of s.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

NORMS = ("inf", "l2")


@dataclass(frozen=True)
class Contraction:
    """The scene contraction with the `norm` "inf" (the unit cube stays, all space maps into [-2, 2]^3) or "l2"
    (the unit ball stays, all space maps into the ball of radius 2).

    Example:
        >>> c = Contraction("l2")
        >>> c(torch.tensor([[0.5, 0.0, 0.0], [4.0, 0.0, 0.0]])).tolist()  # inside: unchanged; r = 4 -> 2 - 1/4
        [[0.5, 0.0, 0.0], [1.75, 0.0, 0.0]]
        >>> c.inverse(torch.tensor([[1.75, 0.0, 0.0]])).tolist()
        [[4.0, 0.0, 0.0]]
    """

    norm: str = "inf"

    def __post_init__(self):
        if self.norm not in NORMS:
            raise ValueError(f"contraction norm must be one of {NORMS}, got {self.norm!r}")

    def size(self, x: torch.Tensor) -> torch.Tensor:
        """(..., 3) -> (...) the norm the contraction uses (max |x_i| or the Euclidean length)."""
        return x.abs().amax(-1) if self.norm == "inf" else x.norm(dim=-1)

    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        """(..., 3) world points -> (..., 3) contracted points, inside the radius-2 ball of the norm."""
        n = self.size(x)[..., None]
        nc = n.clamp(min=1.0)  # both branches stay finite, so gradients and where() never see a 0/0
        return torch.where(n <= 1.0, x, (2.0 - 1.0 / nc) * (x / nc))

    def inverse(self, y: torch.Tensor) -> torch.Tensor:
        """(..., 3) contracted points -> (..., 3) world points, the inverse of `__call__`. Points on or beyond the
        radius-2 boundary (the image of infinity) are pulled just inside it, to about 10^6 world units."""
        m = self.size(y)[..., None]
        mc = m.clamp(min=1.0, max=2.0 - 1e-6)
        return torch.where(m <= 1.0, y, y * (mc / m.clamp(min=1e-12)) / (mc * (2.0 - mc)))

    def knee(self, origins: torch.Tensor, directions: torch.Tensor, near: float) -> torch.Tensor:
        """(R,) ray parameter t where each ray leaves the unit ball of the norm for good; for a ray that misses it,
        where it passes closest to the centre. Never less than `near`."""
        d2 = (directions * directions).sum(-1).clamp(min=1e-12)
        closest = -(origins * directions).sum(-1) / d2
        if self.norm == "l2":
            b = (origins * directions).sum(-1) / d2
            c = ((origins * origins).sum(-1) - 1.0) / d2
            disc = b * b - c
            exit_t = -b + disc.clamp(min=0).sqrt()
            hit = disc > 0
        else:
            d = torch.where(directions.abs() < 1e-9, torch.full_like(directions, 1e-9), directions)
            t0, t1 = (-1.0 - origins) / d, (1.0 - origins) / d
            t_in, exit_t = torch.minimum(t0, t1).amax(-1), torch.maximum(t0, t1).amin(-1)
            hit = exit_t > t_in
        return torch.where(hit, exit_t, closest).clamp(min=near)


def warp(t: torch.Tensor, knee: torch.Tensor, unit: torch.Tensor) -> torch.Tensor:
    """Ray distance t -> warped distance s: s = t up to `knee`, then s = knee + L - L^2 / (t - knee + L) with
    L = `unit` (the ray parameter of one world unit, 1 / |d|). Continuous with slope 1 at the knee; s < knee + L
    for every finite t. Shapes broadcast (t (R, S), knee and unit (R, 1)).

    Example:
        >>> warp(torch.tensor([1.0, 2.0, 3.0, 1e9]), torch.tensor(2.0), torch.tensor(1.0)).tolist()
        [1.0, 2.0, 2.5, 3.0]
    """
    beyond = (t - knee).clamp(min=0.0)
    return torch.where(t <= knee, t, knee + unit - unit * unit / (beyond + unit))


def unwarp(s: torch.Tensor, knee: torch.Tensor, unit: torch.Tensor) -> torch.Tensor:
    """The inverse of `warp`: warped distance s (< knee + unit) -> ray distance t.

    Example:
        >>> unwarp(torch.tensor([1.0, 2.0, 2.5]), torch.tensor(2.0), torch.tensor(1.0)).tolist()
        [1.0, 2.0, 3.0]
    """
    left = (knee + unit - s).clamp(min=unit * 1e-7)
    return torch.where(s <= knee, s, knee - unit + unit * unit / left)
