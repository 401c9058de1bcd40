"""Edits as field wrappers: each wraps a field (dfield.core.rendering.Field) and changes it only where its selection is.

Outside the selection a wrapper returns its inner field's values untouched, bit for bit (values pass
through `torch.where`, never through arithmetic), so locality holds by construction and wrappers stack.
Where content is moved or inserted, densities add and colours/features are density-weighted means, the
DFF paper's composition rule. Every wrapper also reports `touched(x)`: the points whose values it may
change, which evaluation uses to score locality on everything else.
"""

from __future__ import annotations

import math

import torch

from dfield.edit.colors import ColorFn
from dfield.edit.selection import Selection


class Wrapper:
    """Passes everything through to `inner`; subclasses override what they change."""

    selection: Selection | None = None
    """What the edit acts on (None: an insertion of a whole other scene)."""

    def __init__(self, inner):
        self.inner = inner
        self.aabb = inner.aabb
        self.occupancy = inner.occupancy
        self.features = self._features if inner.features is not None else None

    def density(self, x):
        """(N, 3) points -> (N,) densities (here: the inner field's)."""
        return self.inner.density(x)

    def color(self, x, d):
        """(N, 3) points, (N, 3) directions -> (N, 3) colours in [0, 1] (here: the inner field's)."""
        return self.inner.color(x, d)

    def _features(self, x):
        return self.inner.features(x)

    def touched(self, x) -> torch.Tensor:
        """(N, 3) points -> (N,) bool: where this edit may change density, colour or features (the inner field's
        own edits not included). Everywhere else its values are the inner field's, bit for bit."""
        raise NotImplementedError


class Extract(Wrapper):
    """Keep only the selection: density elsewhere becomes zero."""

    def __init__(self, inner, selection: Selection):
        super().__init__(inner)
        self.selection = selection

    def density(self, x):
        """(N, 3) points -> (N,) densities: the inner field's inside the selection, zero outside."""
        sigma = self.inner.density(x)
        return torch.where(self.selection.mask(x), sigma, torch.zeros_like(sigma))

    def touched(self, x):
        """Everything outside the selection (where density is zeroed)."""
        return ~self.selection.mask(x)


class Delete(Wrapper):
    """Remove the selection; what lies behind it is whatever the field holds there."""

    def __init__(self, inner, selection: Selection):
        super().__init__(inner)
        self.selection = selection

    def density(self, x):
        """(N, 3) points -> (N,) densities: zero inside the selection, the inner field's outside."""
        sigma = self.inner.density(x)
        return torch.where(self.selection.mask(x), torch.zeros_like(sigma), sigma)

    def touched(self, x):
        """The selection."""
        return self.selection.mask(x)


class Recolor(Wrapper):
    """Change the colour of the selection with `fn` (N, 3) -> (N, 3); density untouched."""

    def __init__(self, inner, selection: Selection, fn: ColorFn):
        super().__init__(inner)
        self.selection, self.fn = selection, fn

    def color(self, x, d):
        """(N, 3) points, (N, 3) directions -> (N, 3) colours: `fn` of the inner colour (clamped to [0, 1]) inside
        the selection, the inner colour outside."""
        c = self.inner.color(x, d)
        m = self.selection.mask(x)
        if not m.any():
            return c
        out = c.clone()
        out[m] = self.fn(c[m]).clamp(0, 1).to(c.dtype)
        return out

    def touched(self, x):
        """The selection."""
        return self.selection.mask(x)


def affine(translate=(0.0, 0.0, 0.0), rotate_deg=(0.0, 0.0, 0.0), scale: float = 1.0, pivot=(0.0, 0.0, 0.0)) -> torch.Tensor:
    """4x4 matrix: scale and rotate (x, then y, then z Euler angles, degrees) about `pivot`, then translate."""
    rx, ry, rz = (math.radians(a) for a in rotate_deg)
    cx, sx, cy, sy, cz, sz = math.cos(rx), math.sin(rx), math.cos(ry), math.sin(ry), math.cos(rz), math.sin(rz)
    Rx = torch.tensor([[1, 0, 0], [0, cx, -sx], [0, sx, cx]], dtype=torch.float64)
    Ry = torch.tensor([[cy, 0, sy], [0, 1, 0], [-sy, 0, cy]], dtype=torch.float64)
    Rz = torch.tensor([[cz, -sz, 0], [sz, cz, 0], [0, 0, 1]], dtype=torch.float64)
    A = (Rz @ Ry @ Rx) * scale
    p = torch.tensor(pivot, dtype=torch.float64)
    M = torch.eye(4, dtype=torch.float64)
    M[:3, :3] = A
    M[:3, 3] = p - A @ p + torch.tensor(translate, dtype=torch.float64)
    return M


def box_corners(aabb: torch.Tensor) -> torch.Tensor:
    """(2, 3) box (min corner, max corner) -> (8, 3) corners; corner i takes the max on axis k where bit k of i is set.

    Example:
        >>> box_corners(torch.tensor([[0.0, 0, 0], [1.0, 2, 3]]))[[0, 1, 7]].tolist()
        [[0.0, 0.0, 0.0], [1.0, 0.0, 0.0], [1.0, 2.0, 3.0]]
    """
    lo, hi = aabb[0], aabb[1]
    return torch.stack([torch.stack([(hi if i & 1 else lo)[0], (hi if i & 2 else lo)[1], (hi if i & 4 else lo)[2]])
                        for i in range(8)])


def union_box(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """The smallest (2, 3) box holding both (2, 3) boxes `a` and `b`."""
    return torch.stack([torch.minimum(a[0], b[0]), torch.maximum(a[1], b[1])])


class _Placed:
    """Content of `source` (restricted to `selection`) moved by the affine `matrix`; a helper for both
    Transform and Composite. Points x map back to y = matrix^-1 x in the source's own frame."""

    def __init__(self, source, selection: Selection | None, matrix: torch.Tensor, box: torch.Tensor):
        self.source, self.selection = source, selection
        inv = torch.linalg.inv(matrix)
        self.inv_A, self.inv_t = inv[:3, :3].float(), inv[:3, 3].float()
        lin = matrix[:3, :3]
        self.scale = float(torch.linalg.det(lin).abs() ** (1 / 3))
        # Directions map with the rotation only (the scale would change their length, not where they point).
        self.inv_R = (inv[:3, :3] * self.scale).float()
        corners = box_corners(box.double()) @ lin.T + matrix[:3, 3]
        self.aabb = torch.stack([corners.amin(0), corners.amax(0)]).float()

    def back(self, x):
        return x @ self.inv_A.to(x).T + self.inv_t.to(x)

    def present(self, x):
        """Which points x receive moved content, and where they come from (y)."""
        y = self.back(x)
        src = self.source.aabb.to(x)
        m = ((y >= src[0]) & (y <= src[1])).all(-1)
        if self.selection is not None:
            m = m & self.selection.mask(y)
        return m, y

    def density(self, x):
        m, y = self.present(x)
        out = x.new_zeros(len(x))
        if m.any():
            # A shape scaled up by s keeps its look when its density is divided by s (same opacity per surface).
            out[m] = self.source.density(y[m]) / self.scale
        return out, m, y

    def occupied(self, x):
        m, y = self.present(x)
        occ = self.source.occupancy
        return m if occ is None else m & occ.query(y)


def _mix(base_sigma, base_value, part_sigma, part_mask, part_value_fn):
    """Density-weighted mean of the base and the placed part; the base value passes through where no part is."""
    if not part_mask.any():
        return base_value
    out = base_value.clone()
    pv = part_value_fn(part_mask)
    ws, wb = part_sigma[part_mask, None], base_sigma[part_mask, None]
    total = ws + wb
    mixed = torch.where(total > 0, (wb * base_value[part_mask] + ws * pv) / total.clamp(min=1e-12), pv)
    out[part_mask] = mixed.to(out.dtype)
    return out


class _Union:
    def __init__(self, a, b):
        self.a, self.b = a, b

    def query(self, x):
        qa = torch.ones(len(x), dtype=torch.bool, device=x.device) if self.a is None else self.a.query(x)
        return qa | self.b(x)


class Place(Wrapper):
    """`inner` plus the content of `source` (inside `selection`, or all of it) placed by `matrix`.
    With `remove=True` the selection also leaves its old place: a move. Otherwise it is an insertion."""

    def __init__(self, inner, source, selection: Selection | None, matrix: torch.Tensor, source_box: torch.Tensor,
                 remove: bool = False):
        super().__init__(inner)
        self.placed = _Placed(source, selection, matrix, source_box)
        self.remove = remove
        self.selection = selection
        self.aabb = union_box(inner.aabb, self.placed.aabb.to(inner.aabb))
        self.occupancy = _Union(inner.occupancy, self.placed.occupied)
        if inner.features is None or source.features is None:
            self.features = None

    def _base(self, x):
        sigma = self.inner.density(x)
        if self.remove:
            sigma = torch.where(self.selection.mask(x), torch.zeros_like(sigma), sigma)
        return sigma

    def density(self, x):
        """(N, 3) points -> (N,) densities: the inner field's (zero in the selection when moving), plus, where placed
        content is present, the source's density there divided by the placement's scale."""
        base = self._base(x)
        part, m, _ = self.placed.density(x)
        return torch.where(m, base + part, base)

    def color(self, x, d):
        """(N, 3) points, (N, 3) directions -> (N, 3) colours: where placed content is present, the density-weighted
        mean of the inner colour and the source's (seen along the direction rotated back); elsewhere the inner's."""
        base_sigma, base = self._base(x), self.inner.color(x, d)
        part, m, y = self.placed.density(x)
        dirs = d @ self.placed.inv_R.to(d).T
        return _mix(base_sigma, base, part, m, lambda k: self.placed.source.color(y[k], dirs[k]))

    def _features(self, x):
        base_sigma, base = self._base(x), self.inner.features(x)
        part, m, y = self.placed.density(x)
        return _mix(base_sigma, base, part, m, lambda k: self.placed.source.features(y[k]))

    def touched(self, x):
        """Where placed content is present, and also the selection's old place when moving (`remove`)."""
        m, _ = self.placed.present(x)
        return m | self.selection.mask(x) if self.remove else m
