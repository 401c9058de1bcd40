"""A 3D attention field (LENeRF): a soft mask in [0, 1] over a box, saying where an edit may act.

The mask is a dense grid of logits read by trilinear interpolation of their sigmoids, so it is smooth, exactly
zero outside its box, and cheap to regularise: `sparsity` (the mean of the mask, an L1 prior that keeps it
small) and `total_variation` (squared differences of neighbouring cells, which keeps it in one piece).

The value read at a point is that interpolated sigmoid v rescaled so both ends are exact,
A = clamp((v - floor) / (1 - 2 floor), 0, 1): below `floor` it is exactly zero, so an edit gated by the mask
leaves every point outside it bit for bit as it was (and the edit's own fields are never evaluated there); above
1 - floor it is exactly one, so inside the region an edit can act fully: removing an opaque object needs
A rho_sigma within about 1e-3 of one, which a sigmoid alone reaches only at logits no distillation produces.
"""

from __future__ import annotations

import torch
import torch.nn as nn
import torch.nn.functional as F

from dfield.core.grids import cell_centers


class AttentionField(nn.Module):
    """A soft mask over the box `aabb` (2, 3), `res` cells per axis, initialised from `init` (a (X, Y, Z) grid of
    probabilities in [0, 1], default 0.5 everywhere).

    Example:
        >>> a = AttentionField(torch.tensor([[0.0] * 3, [1.0] * 3]), (4, 4, 4), torch.ones(4, 4, 4) * 0.5)
        >>> a(torch.tensor([[0.5, 0.5, 0.5], [2.0, 0.0, 0.0]])).tolist()  # inside the box, then outside it
        [0.5, 0.0]
    """

    def __init__(self, aabb: torch.Tensor, res, init: torch.Tensor | None = None, floor: float = 0.02):
        super().__init__()
        res = tuple(int(r) for r in res)
        self.register_buffer("aabb", aabb.detach().clone().float())
        p = torch.full(res, 0.5) if init is None else init.detach().float().reshape(res)
        self.logits = nn.Parameter(torch.logit(p.clamp(1e-3, 1 - 1e-3)))
        self.floor = float(floor)

    @property
    def res(self) -> tuple[int, int, int]:
        """Cells per axis (X, Y, Z)."""
        return tuple(self.logits.shape)

    def grid(self) -> torch.Tensor:
        """(X, Y, Z) mask values at the cell centres."""
        return torch.sigmoid(self.logits)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """(N, 3) world points -> (N,) mask in [0, 1]: trilinear in the cell-centre values, rescaled to be exactly
        zero below `floor` (and outside the box) and exactly one above 1 - floor."""
        if len(x) == 0:
            return x.new_zeros(0)
        aabb = self.aabb.to(x)
        u = (x - aabb[0]) / (aabb[1] - aabb[0])
        inside = ((u >= 0) & (u <= 1)).all(-1)
        # Cell centres sit at (i + 0.5) / res: map to grid_sample's [-1, 1] with align_corners=False.
        g = (u * 2 - 1)[:, [2, 1, 0]].reshape(1, -1, 1, 1, 3)  # grid_sample wants (W, H, D) = (z, y, x) order
        v = F.grid_sample(self.grid()[None, None].to(x), g, mode="bilinear", padding_mode="border",
                          align_corners=False).reshape(-1)
        a = ((v - self.floor) / (1 - 2 * self.floor)).clamp(0, 1)
        return torch.where(inside & (v >= self.floor), a, torch.zeros_like(v))

    def support(self, points: torch.Tensor) -> torch.Tensor:
        """(N, 3) -> (N,) bool: where the mask is not zero."""
        return self(points) > 0

    def sparsity(self) -> torch.Tensor:
        """Mean mask value over the grid (an L1 prior: the mask covers no more than it must)."""
        return self.grid().mean()

    def total_variation(self) -> torch.Tensor:
        """Mean squared difference of neighbouring cells along each axis (the mask stays in smooth pieces)."""
        g = self.grid()
        return sum((g.diff(dim=k) ** 2).mean() for k in range(3))

    @torch.no_grad()
    def cell_centers(self) -> torch.Tensor:
        """(X * Y * Z, 3) world positions of the cell centres, in the grid's x-major order."""
        return cell_centers(self.aabb, self.res)

    @torch.no_grad()
    def support_box(self) -> torch.Tensor:
        """(2, 3) box around the cells whose value reaches `floor` (the field's own box when none does)."""
        idx = (self.grid() >= self.floor).nonzero()
        if len(idx) == 0:
            return self.aabb.clone()
        cell = (self.aabb[1] - self.aabb[0]) / torch.tensor(self.res, device=self.aabb.device)
        lo = self.aabb[0] + (idx.amin(0).float() - 0.5).clamp(min=0) * cell
        hi = self.aabb[0] + (idx.amax(0).float() + 1.5) * cell
        return torch.stack([lo, torch.minimum(hi, self.aabb[1])])


def regularizers(attention: AttentionField) -> dict[str, torch.Tensor]:
    """The attention field's priors by name: `sparsity` and `tv` (see AttentionField)."""
    return {"sparsity": attention.sparsity(), "tv": attention.total_variation()}
