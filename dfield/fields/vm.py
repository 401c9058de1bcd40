"""Vector-matrix (TensoRF "VM") factorisation of a 3D feature volume, read by bilinear interpolation.

A volume of C channels is stored as three planes (XY, XZ, YZ) times three lines (Z, Y, X) of `n_comp`
components each; the value at a point is the per-component products of plane and line samples.

The planes are stored channels-last as one table of rows and read with `F.embedding_bag`: on a CPU its
forward is several times faster than `grid_sample`, and with the backward of `_GatherRows` the whole read is
1.3-3.9x faster than `grid_sample`'s (bench/gather_paths.py, 2 cores). That matters because interpolation
dominates training time.
"""

from __future__ import annotations

import os
import time

import torch
import torch.nn as nn
import torch.nn.functional as F

PLANE_AXES = ((0, 1), (0, 2), (1, 2))
LINE_AXES = (2, 1, 0)


def _sparse_backward(rows: torch.Tensor, weights: torch.Tensor, grad_out: torch.Tensor, n_rows: int) -> torch.Tensor:
    """Table gradient of `gather_rows` as one sparse (n_rows x N) by dense (N x C) product."""
    n, k = rows.shape
    cols = torch.arange(n, device=rows.device).repeat_interleave(k)
    sel = torch.sparse_coo_tensor(torch.stack([rows.reshape(-1), cols]), weights.reshape(-1), (n_rows, n), check_invariants=False)
    return torch.sparse.mm(sel, grad_out.contiguous())


def _index_add_backward(rows: torch.Tensor, weights: torch.Tensor, grad_out: torch.Tensor, n_rows: int) -> torch.Tensor:
    """Table gradient of `gather_rows` as one `index_add_` per corner of the weighted output gradients (no sort, no
    sparse tensor). Per corner rather than one call over all (N * K, C) weighted rows, which are then never made: half
    the time on a 2-core AMD EPYC at a late lego step's sizes (5k colour and 13k density samples: 7.5 -> 4.1 ms for
    the four reads)."""
    out = grad_out.new_zeros(n_rows, grad_out.shape[1])
    for k in range(rows.shape[1]):
        out.index_add_(0, rows[:, k], grad_out * weights[:, k, None])
    return out


BACKWARDS = {"index_add": _index_add_backward, "sparse": _sparse_backward}
_chosen: dict[str, str] = {}


def gather_backward() -> str:
    """Which table-gradient kernel `gather_rows` uses on a CPU: $DFIELD_GATHER_BACKWARD (index_add or sparse) if set,
    else the faster on this processor, timed once per process on a training-sized read (3 planes of 128^2 rows,
    30k points x 4 corners, 32 channels). index_add is kept unless the sparse product is clearly faster (1.5x), so
    noise cannot make two processes on one machine (a run and its resume) pick differently.

    Measured (bench/gather_paths.py, 2 threads): AMD EPYC, index_add 2-3x faster than the sparse product; the
    sparse product 1.6-1.9x faster than embedding_bag's own backward."""
    if "cpu" not in _chosen:
        forced = os.environ.get("DFIELD_GATHER_BACKWARD", "")
        if forced:
            if forced not in BACKWARDS:
                raise ValueError(f"DFIELD_GATHER_BACKWARD={forced!r}: expected one of {sorted(BACKWARDS)}")
            _chosen["cpu"] = forced
        else:
            g = torch.Generator().manual_seed(0)
            n_rows, n = 3 * 128 * 128, 30000
            rows = torch.randint(0, n_rows, (n, 4), generator=g)
            weights, grad = torch.rand(n, 4, generator=g), torch.randn(n, 32, generator=g)
            best = {}
            for name, fn in BACKWARDS.items():
                fn(rows, weights, grad, n_rows)  # warm-up
                times = []
                for _ in range(3):
                    t0 = time.perf_counter()
                    fn(rows, weights, grad, n_rows)
                    times.append(time.perf_counter() - t0)
                best[name] = min(times)
            _chosen["cpu"] = "sparse" if best["sparse"] * 1.5 < best["index_add"] else "index_add"
    return _chosen["cpu"]


class _GatherRows(torch.autograd.Function):
    """Weighted sum of table rows, `out[i] = sum_k w[i, k] * table[rows[i, k]]`.

    Forward is `embedding_bag`; backward is one `index_add_` (or one sparse-dense product, whichever
    `gather_backward` found faster here): both several times faster on a CPU than embedding_bag's own sort-based
    backward.
    """

    @staticmethod
    def forward(ctx, table, rows, weights):
        ctx.save_for_backward(rows, weights)
        ctx.n_rows = table.shape[0]
        return F.embedding_bag(rows, table, per_sample_weights=weights, mode="sum")

    @staticmethod
    def backward(ctx, grad_out):
        rows, weights = ctx.saved_tensors
        return BACKWARDS[gather_backward()](rows, weights, grad_out, ctx.n_rows), None, None


def gather_rows(table: torch.Tensor, rows: torch.Tensor, weights: torch.Tensor) -> torch.Tensor:
    """Weighted sums of table rows: table (T, C), rows (N, K) long, weights (N, K) -> (N, C).

    .. math::
        out_i = \\sum_k w_{ik} \\, table_{rows_{ik}}

    On a CPU without gradients to `weights` it uses the faster backward of `_GatherRows`.

    Example:
        >>> gather_rows(torch.eye(3), torch.tensor([[0, 2]]), torch.tensor([[0.25, 0.75]]))
        tensor([[0.2500, 0.0000, 0.7500]])
    """
    if weights.requires_grad or table.device.type != "cpu":
        # Gradients to the sample positions (deformation fields) or a GPU: the stock op handles both.
        return F.embedding_bag(rows, table, per_sample_weights=weights, mode="sum")
    return _GatherRows.apply(table, rows, weights)


def _bilinear_rows(u: torch.Tensor, ra: int, rb: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Corner row ids (N, 4) and weights (N, 4) into an ra x rb plane for coords u (N, 2) in [0, 1]."""
    size = u.new_tensor([ra - 1, rb - 1])
    p = u.clamp(0, 1) * size
    p0 = torch.minimum(p.floor(), size - 1)
    f = p - p0
    i0 = p0.long()
    base = i0[:, 0] * rb + i0[:, 1]
    rows = torch.stack([base, base + rb, base + 1, base + rb + 1], -1)
    fx, fy = f[:, 0], f[:, 1]
    w = torch.stack([(1 - fx) * (1 - fy), fx * (1 - fy), (1 - fx) * fy, fx * fy], -1)
    return rows, w


def _linear_rows(u: torch.Tensor, res: int) -> tuple[torch.Tensor, torch.Tensor]:
    p = u.clamp(0, 1) * (res - 1)
    p0 = p.floor().clamp(max=res - 2)
    f = p - p0
    i0 = p0.long()
    return torch.stack([i0, i0 + 1], -1), torch.stack([1 - f, f], -1)


def _interpolation_matrix(u: torch.Tensor, res: int) -> torch.Tensor:
    """(N, res) linear interpolation weights of coordinates u (N,) in [0, 1] on `res` nodes, as `_linear_rows`
    (and each axis of `_bilinear_rows`) reads them."""
    rows, w = _linear_rows(u, res)
    return u.new_zeros(len(u), res).scatter_add_(1, rows, w)


def _offsets(res: tuple[int, int, int]) -> tuple[list[int], list[int]]:
    """Where each plane's and each line's rows start in the shared tables."""
    plane_sizes = [res[a] * res[b] for a, b in PLANE_AXES]
    line_sizes = [res[c] for c in LINE_AXES]
    return [sum(plane_sizes[:k]) for k in range(4)], [sum(line_sizes[:k]) for k in range(4)]


def _corners(u: torch.Tensor, res: tuple[int, int, int]) -> tuple[torch.Tensor, ...]:
    """Table rows and weights of points u (N, 3) in a VM volume of resolution `res`: plane rows and weights
    (3 * N, 4), line rows and weights (3 * N, 2), stacked plane by plane (neighbouring samples then read
    neighbouring rows, which keeps the gather in cache)."""
    po, lo = _offsets(res)
    prow, pw, lrow, lw = [], [], [], []
    for k, ((a, b), c) in enumerate(zip(PLANE_AXES, LINE_AXES)):
        rows, w = _bilinear_rows(u[:, [a, b]], res[a], res[b])
        prow.append(rows + po[k])
        pw.append(w)
        rows, w = _linear_rows(u[:, c], res[c])
        lrow.append(rows + lo[k])
        lw.append(w)
    return torch.stack(prow).view(-1, 4), torch.stack(pw).view(-1, 4), torch.stack(lrow).view(-1, 2), torch.stack(lw).view(-1, 2)


def _products(planes: torch.Tensor, lines: torch.Tensor, n_comp: int) -> torch.Tensor:
    """Plane and line samples (3 * N, n_comp), plane by plane -> (N, 3 * n_comp) products, grouped by plane."""
    n = planes.shape[0] // 3
    return (planes * lines).view(3, n, n_comp).permute(1, 0, 2).reshape(n, 3 * n_comp)


_EAGER = (_corners, _products)
_compiled: tuple | None = None  # torch.compile'd (_corners, _products) for reads without gradients, once warmed up


def compile_kernels(volumes: list[VMVolume], sizes: tuple[int, ...] = (4096, 4099)) -> str | None:
    """Compile the volumes' read arithmetic (corner rows and weights, plane x line products) with torch.compile
    (inductor: fused C++ loops instead of some forty small tensor ops per read) and use it for every read made
    without gradients (rendering, queries); training keeps the eager ops, where it measured no faster.

    Compiling takes 5-15 s of CPU (less with inductor's disk cache warm), so callers run it in the background: it
    warms up on `volumes` (every resolution and width they have, at two sizes so the graphs are shape-generic)
    before any read uses it, and a read never waits for a compile. Returns None when the compiled kernels are
    in use, or why not (no C compiler, ...): reads then stay eager. Measured on a 2-core AMD EPYC: a 256x256
    frame of the demo's run 0.77-0.87 s against 0.97-1.20 s eager, in one process (bitwise the same image).

    Example:
        >>> compile_kernels([VMVolume(4, 16)])  # doctest: +SKIP
    """
    global _compiled
    try:
        corners, products = torch.compile(_corners, dynamic=True), torch.compile(_products, dynamic=True)
        with torch.no_grad():
            for vol in volumes:
                for n in sizes:
                    u = torch.rand(n, 3, device=vol.planes.device)
                    prow, pw, lrow, lw = corners(u, vol.res)
                    products(gather_rows(vol.planes, prow, pw), gather_rows(vol.lines, lrow, lw), vol.n_comp)
    except Exception as e:  # noqa: BLE001 (any failure of the compiler stack leaves the eager reads in place)
        return f"{type(e).__name__}: {str(e).strip().splitlines()[0] if str(e).strip() else ''}"
    _compiled = (corners, products)
    return None


def use_eager_kernels() -> None:
    """Go back to the eager read arithmetic (undoes `compile_kernels`)."""
    global _compiled
    _compiled = None


class VMVolume(nn.Module):
    """Three planes and three lines, each with `n_comp` channels, over the unit cube.

    `res` is per axis, so a box that is not a cube still gets cubic voxels.
    """

    def __init__(self, n_comp: int, res, init_scale: float = 0.1):
        super().__init__()
        self.n_comp = n_comp
        self.res = _as_res(res)
        po, lo = _offsets(self.res)
        self.planes = nn.Parameter(init_scale * torch.randn(po[3], n_comp))
        self.lines = nn.Parameter(init_scale * torch.randn(lo[3], n_comp))

    def forward(self, u: torch.Tensor) -> torch.Tensor:
        """u: (N, 3) in [0, 1]^3 -> (N, 3 * n_comp) plane x line products, grouped by plane."""
        corners, products = _compiled if _compiled is not None and not torch.is_grad_enabled() else _EAGER
        prow, pw, lrow, lw = corners(u, self.res)
        planes = gather_rows(self.planes, prow, pw)
        lines = gather_rows(self.lines, lrow, lw)
        return products(planes, lines, self.n_comp)

    def summed_on_lattice(self, axes: list[torch.Tensor]) -> torch.Tensor:
        """The sum of all channels at every point of a lattice: axes are three 1D coordinate tensors in [0, 1]
        (lengths X, Y, Z) -> (X, Y, Z), what `forward(u).sum(-1)` gives at the lattice's points.

        Why: a VM volume is separable, so a whole lattice costs three plane resamplings and three matrix
        products instead of one read per point (the occupancy grid of a 118^3 box: 0.8 s by points, a few ms so).

        .. math::
            s(x, y, z) = \\sum_c P^{xy}_c(x, y) L^z_c(z) + P^{xz}_c(x, z) L^y_c(y) + P^{yz}_c(y, z) L^x_c(x)

        Example:
            >>> vol = VMVolume(4, (5, 6, 7))
            >>> axes = [torch.linspace(0, 1, n) for n in (3, 4, 5)]
            >>> pts = torch.stack(torch.meshgrid(*axes, indexing="ij"), -1).reshape(-1, 3)
            >>> torch.allclose(vol.summed_on_lattice(axes).reshape(-1), vol(pts).sum(-1), atol=1e-5)
            True
        """
        weights = [_interpolation_matrix(ax, r) for ax, r in zip(axes, self.res)]
        n = [len(ax) for ax in axes]
        total = self.planes.new_zeros(n)
        grids = self.plane_grids()
        for k, ((a, b), c) in enumerate(zip(PLANE_AXES, LINE_AXES)):
            plane = torch.einsum("ia,cab,jb->ijc", weights[a], grids[k], weights[b])  # (n_a, n_b, C)
            line = weights[c] @ grids[3 + k].T  # (n_c, C)
            s = (plane.reshape(-1, self.n_comp) @ line.T).view(n[a], n[b], n[c])
            # Back to (x, y, z) order from (a, b, c).
            total = total + s.permute(*[(a, b, c).index(i) for i in range(3)])
        return total

    def plane_grids(self) -> list[torch.Tensor]:
        """The planes as (C, ra, rb) images and lines as (C, rc) signals, for resampling and regularisers."""
        po, lo = _offsets(self.res)
        planes = [self.planes[po[k] : po[k + 1]].view(self.res[a], self.res[b], -1).permute(2, 0, 1) for k, (a, b) in enumerate(PLANE_AXES)]
        lines = [self.lines[lo[k] : lo[k + 1]].permute(1, 0) for k in range(3)]
        return planes + lines

    def total_variation(self) -> torch.Tensor:
        """Mean squared difference of neighbouring plane and line cells: smooths sparse-view fits."""
        tv = 0.0
        for g in self.plane_grids():
            if g.dim() == 3:
                tv = tv + (g[:, 1:] - g[:, :-1]).square().mean() + (g[:, :, 1:] - g[:, :, :-1]).square().mean()
            else:
                tv = tv + (g[:, 1:] - g[:, :-1]).square().mean()
        return tv

    @torch.no_grad()
    def resample(self, res) -> None:
        """Change resolution, keeping the same region (coarse-to-fine training)."""
        self.crop(torch.zeros(3), torch.ones(3), res)

    @torch.no_grad()
    def crop(self, lo: torch.Tensor, hi: torch.Tensor, res) -> None:
        """Resample onto the sub-box [lo, hi] of the unit cube at `res` (used when the scene box shrinks)."""
        res = _as_res(res)
        grids = self.plane_grids()
        ax = [torch.linspace(float(lo[i]), float(hi[i]), res[i], device=self.planes.device) * 2 - 1 for i in range(3)]
        new_p, new_l = [], []
        for k, ((a, b), c) in enumerate(zip(PLANE_AXES, LINE_AXES)):
            # grid_sample's grid is (x, y) = (width, height) = (second, first) plane axis.
            gy, gx = torch.meshgrid(ax[a], ax[b], indexing="ij")
            p = F.grid_sample(grids[k][None], torch.stack([gx, gy], -1)[None], align_corners=True)[0]
            new_p.append(p.permute(1, 2, 0).reshape(-1, self.n_comp))
            g1 = torch.stack([torch.zeros_like(ax[c]), ax[c]], -1)[None, :, None]
            line = F.grid_sample(grids[3 + k][None, :, :, None], g1, align_corners=True)[0, :, :, 0]
            new_l.append(line.permute(1, 0))
        self.planes = nn.Parameter(torch.cat(new_p).contiguous())
        self.lines = nn.Parameter(torch.cat(new_l).contiguous())
        self.res = res


def _as_res(res) -> tuple[int, int, int]:
    if isinstance(res, int):
        return (res, res, res)
    return tuple(int(r) for r in res)
