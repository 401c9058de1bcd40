"""Volume rendering maths, ray marching, the occupancy grid and the VM volume, on small hand-made inputs."""

import copy
import dataclasses
import math

import pytest
import torch
import torch.nn.functional as F

from dfield.core.rays import Rays
from dfield.core.rendering import composite, composite_samples, render_field, scatter_samples, weights_from_density
from dfield.core.sampling import OccupancyGrid, march, ray_aabb
from dfield.fields import vm
from dfield.fields.tensorf import TensoRFConfig
from dfield.fields.vm import LINE_AXES, PLANE_AXES, VMVolume, _GatherRows, gather_rows
from dfield.models.grid import GridModel, GridModelConfig
from dfield.models.nerf import NeRFModel, NeRFModelConfig, _sample_pdf
from dfield.models.schedule import GridSchedule

torch.set_num_threads(1)

BOX = torch.tensor([[-1.0, -1.0, -1.0], [1.0, 1.0, 1.0]])


def _rays(origins, directions, normalize=True):
    o = torch.tensor(origins, dtype=torch.float32)
    d = torch.tensor(directions, dtype=torch.float32)
    return Rays(o, F.normalize(d, dim=-1) if normalize else d)


def _random_rays(n, seed=0, radius=3.0):
    """Rays from a sphere of `radius` aimed near the origin: most hit BOX, some graze or miss it."""
    g = torch.Generator().manual_seed(seed)
    o = F.normalize(torch.randn(n, 3, generator=g), dim=-1) * radius
    target = (torch.rand(n, 3, generator=g) * 2 - 1) * 1.6
    return Rays(o, F.normalize(target - o, dim=-1))


# ------------------------------------------------------------------------------ weights, compositing


def test_single_opaque_sample_takes_all_the_weight():
    w, trans = weights_from_density(torch.tensor([[1e4]]), torch.tensor([[1.0]]))
    assert w.item() == pytest.approx(1.0, abs=1e-6)
    assert trans.item() == pytest.approx(0.0, abs=1e-6)

    # An opaque sample in the middle of a ray: what is in front keeps its alpha, what is behind gets nothing.
    sigma = torch.tensor([[0.5, 1e4, 2.0, 3.0]])
    dt = torch.full_like(sigma, 0.2)
    w, trans = weights_from_density(sigma, dt)
    a0 = 1 - math.exp(-0.5 * 0.2)
    assert w[0, 0].item() == pytest.approx(a0, rel=1e-5)
    assert w[0, 1].item() == pytest.approx(1 - a0, rel=1e-4)
    assert w[0, 2:].abs().max().item() < 1e-6
    assert trans.item() < 1e-6


def test_zero_density_gives_zero_weights_and_full_transmittance():
    w, trans = weights_from_density(torch.zeros(3, 5), torch.full((3, 5), 0.1))
    assert torch.equal(w, torch.zeros(3, 5))
    assert torch.equal(trans, torch.ones(3))
    # No samples at all (every ray missed): still one transmittance per ray.
    w, trans = weights_from_density(torch.zeros(4, 0), torch.zeros(4, 0))
    assert w.shape == (4, 0) and torch.equal(trans, torch.ones(4))


def test_weights_and_transmittance_sum_to_one():
    g = torch.Generator().manual_seed(0)
    sigma = torch.rand(64, 32, generator=g) * torch.rand(64, 1, generator=g) * 20
    dt = torch.rand(64, 32, generator=g) * 0.1
    w, trans = weights_from_density(sigma, dt)
    assert (w >= 0).all()
    assert (w.sum(-1) <= 1 + 1e-6).all()
    torch.testing.assert_close(w.sum(-1) + trans, torch.ones(64), atol=1e-5, rtol=0)
    # Against the textbook alpha * cumprod(1 - alpha) form.
    alpha = 1 - torch.exp(-sigma * dt)
    t_excl = torch.cumprod(torch.cat([torch.ones(64, 1), 1 - alpha[:, :-1]], -1), -1)
    torch.testing.assert_close(w, alpha * t_excl, atol=1e-5, rtol=1e-4)


def test_huge_last_interval_keeps_transmittance():
    """NeRF closes every ray with an interval of 1e10: the last sample must still only get what is left.

    With the exclusive optical depth computed as cumsum(tau) - tau, the depth in front of that sample is
    lost to float32 rounding (C + 1e10 - 1e10 == 0), the sample gets weight 1 whatever came before, and
    the opacity of a ray can reach 2.
    """
    sigma = torch.tensor([[5.0, 5.0, 5.0, 1.0], [0.1, 0.1, 0.1, 1.0]])
    dt = torch.tensor([[0.5, 0.5, 0.5, 1e10]]).expand(2, 4)
    w, trans = weights_from_density(sigma, dt)
    w64, _ = weights_from_density(sigma.double(), dt.double())
    assert (w.sum(-1) <= 1 + 1e-6).all(), w
    torch.testing.assert_close(w, w64.float(), atol=1e-5, rtol=1e-4)
    assert torch.equal(trans, torch.zeros(2))


def test_composite_and_scatter():
    w = torch.tensor([[0.25, 0.5, 0.0], [1.0, 0.0, 0.0]])
    v = torch.arange(18, dtype=torch.float32).view(2, 3, 3)
    expected = torch.stack([0.25 * v[0, 0] + 0.5 * v[0, 1], v[1, 0]])
    torch.testing.assert_close(composite(w, v), expected)

    mask = torch.tensor([[True, False, True], [False, True, False]])
    out = scatter_samples(mask, torch.tensor([1.0, 2.0, 3.0]), fill=-1.0)
    assert torch.equal(out, torch.tensor([[1.0, -1.0, 2.0], [-1.0, 3.0, -1.0]]))


# ------------------------------------------------------------------------------ ray-box clipping


def test_ray_aabb_hits_and_misses():
    rays = _rays(
        [[-5, 0, 0], [-5, 3, 0], [0, 0, 0], [5, 0, 0], [-3, -3, -3], [0, 0, 4]],
        [[1, 0, 0], [1, 0, 0], [0, 1, 0], [1, 0, 0], [1, 1, 1], [0, 0, -1]],
    )
    t0, t1 = ray_aabb(rays, BOX)
    s3 = math.sqrt(3)
    torch.testing.assert_close(t0[[0, 2, 4, 5]], torch.tensor([4.0, -1.0, 2 * s3, 3.0]))
    torch.testing.assert_close(t1[[0, 2, 4, 5]], torch.tensor([6.0, 1.0, 4 * s3, 5.0]))
    assert t1[1] < t0[1]  # passes beside the box
    # Box behind the origin: the interval is negative, so clipping at `near` turns it into a miss.
    assert t1[3] < 0 and not (t1[3] > t0[3].clamp(min=0.1))


def test_ray_aabb_non_unit_directions():
    rays = _rays([[-5, 0.5, 0.5]], [[2, 0, 0]], normalize=False)
    t0, t1 = ray_aabb(rays, BOX)
    torch.testing.assert_close(torch.stack([t0, t1], -1), torch.tensor([[2.0, 3.0]]))


# ------------------------------------------------------------------------------ marching


def test_march_samples_lie_in_the_box_in_order():
    rays = _random_rays(200)
    step = 0.05
    for jitter in (None, torch.Generator().manual_seed(1)):
        s = march(rays, BOX, near=0.5, far=10.0, step=step, jitter=jitter)
        t_in, t_out = ray_aabb(rays, BOX)
        t_in = t_in.clamp(min=0.5)
        hit = t_out > t_in
        assert hit.any() and (~hit).any()
        assert not s.mask[~hit].any()
        assert (s.mask.sum(1)[hit & (t_out - t_in > step)] > 0).all()
        # Positions are exactly the masked samples, and they are inside the box.
        pos = rays.origins[s.ray_index] + rays.directions[s.ray_index] * s.t[s.mask][:, None]
        torch.testing.assert_close(s.positions, pos)
        assert ((s.positions >= BOX[0] - 1e-5) & (s.positions <= BOX[1] + 1e-5)).all()
        assert torch.equal(s.ray_index, s.mask.nonzero()[:, 0])
        # Ordered along each ray, evenly spaced, within the clipped interval.
        assert (s.t[:, 1:] > s.t[:, :-1]).all()
        torch.testing.assert_close(s.t[:, 1:] - s.t[:, :-1], torch.full((200, s.t.shape[1] - 1), step), atol=1e-4, rtol=0)
        tm = torch.where(s.mask, s.t, torch.full_like(s.t, float("nan")))
        assert (tm.nan_to_num(1e9) >= t_in[:, None]).all() and (tm.nan_to_num(-1e9) < t_out[:, None]).all()
        torch.testing.assert_close(s.dt, torch.full_like(s.t, step))
        # Enough samples to cover the longest chord through the box (plus the anchoring's partial step).
        chord = math.ceil(((t_out - t_in)[hit]).max().item() / step)
        assert chord <= s.t.shape[1] <= chord + 2


def test_march_samples_do_not_depend_on_the_box():
    """Anchored at the near plane: a larger box (an edit adding content) keeps every sample of the small box."""
    rays = _random_rays(200)
    small = march(rays, BOX, near=0.5, far=10.0, step=0.05)
    big = march(rays, torch.stack([BOX[0] - 0.7, BOX[1] + 0.3]), near=0.5, far=10.0, step=0.05)
    inside = ((big.positions >= BOX[0]) & (big.positions <= BOX[1])).all(-1)
    key = lambda s, keep: sorted(zip(s.ray_index[keep].tolist(), map(tuple, s.positions[keep].tolist())))
    in_small = ((small.positions >= BOX[0]) & (small.positions <= BOX[1])).all(-1)
    assert key(big, inside) == key(small, in_small)


def test_march_respects_occupancy_and_max_samples():
    rays = _random_rays(200, seed=2)
    grid = OccupancyGrid(BOX, 8)
    grid.occupied[:4] = False  # x < 0 is empty
    full = march(rays, BOX, 0.5, 10.0, 0.05)
    s = march(rays, BOX, 0.5, 10.0, 0.05, occupancy=grid)
    assert len(s.positions) and (s.positions[:, 0] >= -1e-5).all()
    assert grid.query(s.positions).all()
    # The occupancy mask removes exactly the samples in empty cells, nothing else.
    keep = torch.zeros_like(full.mask)
    keep[full.mask] = grid.query(full.positions)
    assert torch.equal(s.mask, keep)
    assert torch.equal(s.t, full.t)

    short = march(rays, BOX, 0.5, 10.0, 0.05, max_samples=7)
    assert short.t.shape[1] == 7


def test_march_all_rays_missing():
    rays = _rays([[-5, 3, 0], [5, 0, 0]], [[1, 0, 0], [1, 0, 0]])
    s = march(rays, BOX, 0.1, 10.0, 0.05)
    assert s.t.shape == (2, 1) and not s.mask.any() and s.positions.shape == (0, 3)


# ------------------------------------------------------------------------------ occupancy grid


def test_occupancy_update_marks_only_cells_near_a_ball():
    centre, radius = torch.tensor([0.3, -0.2, 0.1]), 0.3
    grid = OccupancyGrid(BOX, 16)
    h = 2.0 / 16

    def density(p):
        return torch.where((p - centre).norm(dim=-1) < radius, 100.0, 0.0)

    frac = grid.update(density, step=0.05)
    assert frac == pytest.approx(grid.occupied.float().mean().item())
    assert 0 < frac < 0.1
    centres = grid.cell_centers().view(16, 16, 16, 3)
    dist = (centres - centre).norm(dim=-1)
    assert grid.occupied[dist < radius].all()  # every cell with its centre in the ball
    # ...and only cells next to those (the mask is dilated by one cell).
    assert (dist[grid.occupied] <= radius + math.sqrt(3) * h + 1e-5).all()

    lo, hi = grid.occupied_aabb()
    assert (lo <= centre - radius + 1e-5).all() and (hi >= centre + radius - 1e-5).all()
    assert (lo >= centre - radius - 2 * h - 1e-5).all() and (hi <= centre + radius + 2 * h + 1e-5).all()
    # Points in the ball are occupied, points far from it are not.
    assert grid.query(centre[None]).all()
    assert not grid.query(torch.tensor([[-0.8, 0.8, -0.8], [0.9, 0.9, 0.9]])).any()

    grid.occupied.zero_()
    assert torch.equal(grid.occupied_aabb(), BOX)  # nothing occupied: keep the whole box


def test_occupancy_state_roundtrip():
    grid = OccupancyGrid(BOX, 4)
    grid.occupied[1, 2, 3] = False
    other = OccupancyGrid(torch.zeros(2, 3), 2)
    other.load(grid.state())
    assert other.resolution == 4 and torch.equal(other.occupied, grid.occupied) and torch.equal(other.aabb, BOX)


# ------------------------------------------------------------------------------ VM volume


def _reference_vm(vol: VMVolume, u: torch.Tensor) -> torch.Tensor:
    """The same volume read with grid_sample(align_corners=True) on the (C, ra, rb) planes and (C, rc) lines."""
    grids = vol.plane_grids()
    xy = u * 2 - 1
    outs = []
    for k, ((a, b), c) in enumerate(zip(PLANE_AXES, LINE_AXES)):
        g = torch.stack([xy[:, b], xy[:, a]], -1)[None, :, None]  # grid_sample x = width = second axis
        p = F.grid_sample(grids[k][None], g, align_corners=True, padding_mode="border")[0, :, :, 0]
        gl = torch.stack([torch.zeros_like(xy[:, c]), xy[:, c]], -1)[None, :, None]
        line = F.grid_sample(grids[3 + k][None, :, :, None], gl, align_corners=True, padding_mode="border")[0, :, :, 0]
        outs.append((p * line).t())
    return torch.cat(outs, -1)


def _points(n, seed=0):
    g = torch.Generator().manual_seed(seed)
    u = torch.rand(n, 3, generator=g)
    u[:6] = torch.tensor([[0.0, 0, 0], [1, 1, 1], [0, 1, 0.5], [1, 0, 1], [0.5, 0.5, 0.5], [1e-7, 1 - 1e-7, 0.25]])
    return u


def test_vm_volume_matches_grid_sample():
    torch.manual_seed(0)
    vol = VMVolume(3, (5, 7, 9))
    u = _points(300)
    out = vol(u)
    assert out.shape == (300, 9)
    torch.testing.assert_close(out, _reference_vm(vol, u), atol=1e-5, rtol=1e-4)

    # Gradients to the planes and lines (through the custom gather) agree with grid_sample's.
    g = torch.randn(300, 9)
    grads = torch.autograd.grad((out * g).sum(), [vol.planes, vol.lines])
    ref = torch.autograd.grad((_reference_vm(vol, u) * g).sum(), [vol.planes, vol.lines])
    for a, b in zip(grads, ref):
        torch.testing.assert_close(a, b, atol=1e-5, rtol=1e-4)


@pytest.mark.parametrize("kernel", ["index_add", "sparse"])
def test_gather_rows_gradient_matches_embedding_bag(kernel, monkeypatch):
    monkeypatch.setitem(vm._chosen, "cpu", kernel)
    g = torch.Generator().manual_seed(0)
    table = torch.randn(30, 5, generator=g)
    rows = torch.randint(0, 30, (40, 4), generator=g)
    rows[0] = torch.tensor([3, 3, 3, 7])  # repeated rows in a bag, and rows shared between bags
    rows[1] = torch.tensor([3, 7, 7, 29])
    w = torch.rand(40, 4, generator=g)
    grad_out = torch.randn(40, 5, generator=g)

    t1 = table.clone().requires_grad_()
    out1 = _GatherRows.apply(t1, rows, w)
    (out1 * grad_out).sum().backward()
    t2 = table.clone().requires_grad_()
    out2 = F.embedding_bag(rows, t2, per_sample_weights=w, mode="sum")
    (out2 * grad_out).sum().backward()
    torch.testing.assert_close(out1, out2)
    torch.testing.assert_close(t1.grad, t2.grad, atol=1e-6, rtol=1e-5)
    assert torch.autograd.gradcheck(lambda t: _GatherRows.apply(t, rows, w.double()), table.double().requires_grad_())

    # With weights that need gradients, gather_rows takes the stock op so the weights get theirs too.
    wg = w.clone().requires_grad_()
    gather_rows(table, rows, wg).sum().backward()
    assert wg.grad is not None and wg.grad.shape == w.shape


def test_gather_backward_is_chosen_once_and_can_be_forced(monkeypatch):
    monkeypatch.setattr(vm, "_chosen", {})
    monkeypatch.setenv("DFIELD_GATHER_BACKWARD", "sparse")
    assert vm.gather_backward() == "sparse"
    monkeypatch.setenv("DFIELD_GATHER_BACKWARD", "index_add")
    assert vm.gather_backward() == "sparse"  # chosen once per process: a run never switches kernels midway
    monkeypatch.setattr(vm, "_chosen", {})
    monkeypatch.setenv("DFIELD_GATHER_BACKWARD", "nope")
    with pytest.raises(ValueError, match="DFIELD_GATHER_BACKWARD"):
        vm.gather_backward()
    monkeypatch.setattr(vm, "_chosen", {})
    monkeypatch.delenv("DFIELD_GATHER_BACKWARD")
    assert vm.gather_backward() in vm.BACKWARDS  # timed here


def test_vm_resample_2x_minus_1_is_exact():
    torch.manual_seed(1)
    vol = VMVolume(2, (5, 7, 9))
    u = _points(400, seed=1)
    before = vol(u)
    vol.resample((9, 13, 17))  # every old node is a new node: bilinear is reproduced exactly
    assert vol.res == (9, 13, 17)
    assert vol.planes.shape == (9 * 13 + 9 * 17 + 13 * 17, 2) and vol.lines.shape == (17 + 13 + 9, 2)
    torch.testing.assert_close(vol(u), before, atol=1e-5, rtol=1e-4)


def test_vm_resample_keeps_values_at_new_nodes():
    torch.manual_seed(2)
    vol = VMVolume(2, (5, 6, 7))
    ref = copy.deepcopy(vol)
    new = (8, 11, 4)
    vol.resample(new)
    g = torch.Generator().manual_seed(3)
    idx = torch.stack([torch.randint(0, r, (200,), generator=g) for r in new], -1)
    u = idx.float() / (torch.tensor(new).float() - 1)
    torch.testing.assert_close(vol(u), ref(u), atol=1e-5, rtol=1e-4)


def test_vm_crop_keeps_values_inside_the_sub_box():
    torch.manual_seed(3)
    vol = VMVolume(2, (5, 7, 9))
    ref = copy.deepcopy(vol)
    # A sub-box on old grid nodes, at half the old spacing: exact everywhere inside.
    lo, hi = torch.tensor([0.25, 0.0, 0.5]), torch.tensor([0.75, 0.5, 1.0])
    vol.crop(lo, hi, (5, 7, 9))
    u = _points(300, seed=4)
    torch.testing.assert_close(vol(u), ref(lo + u * (hi - lo)), atol=1e-5, rtol=1e-4)

    # Any other sub-box: exact at the new nodes.
    vol = copy.deepcopy(ref)
    lo, hi = torch.tensor([0.1, 0.33, 0.2]), torch.tensor([0.8, 0.9, 0.55])
    new = (6, 5, 4)
    vol.crop(lo, hi, new)
    g = torch.Generator().manual_seed(5)
    idx = torch.stack([torch.randint(0, r, (200,), generator=g) for r in new], -1)
    u = idx.float() / (torch.tensor(new).float() - 1)
    torch.testing.assert_close(vol(u), ref(lo + u * (hi - lo)), atol=1e-5, rtol=1e-4)


# ------------------------------------------------------------------------------ models

TINY_FIELD = TensoRFConfig(density_comp=4, app_comp=4, app_dim=6, hidden=16, density_shift=0.0, density_scale=5.0)
BACKGROUND = (0.2, 0.4, 0.6)


def _tiny_grid_model():
    torch.manual_seed(0)
    cfg = GridModelConfig(field=TINY_FIELD, voxels_init=8**3, voxels_final=16**3, upsample_steps=(10,))
    return GridModel(BOX, 0.1, 10.0, BACKGROUND, cfg)


def test_grid_model_render_shapes_and_ranges():
    model = _tiny_grid_model()
    rays = _random_rays(100, seed=5)
    out = model.render_rays(rays, torch.Generator().manual_seed(0))
    assert out["rgb"].shape == (100, 3) and out["depth"].shape == (100,) and out["acc"].shape == (100,)
    for k in ("rgb", "depth", "acc"):
        assert torch.isfinite(out[k]).all()
    assert (out["rgb"] >= 0).all() and (out["rgb"] <= 1 + 1e-6).all()
    assert (out["acc"] >= 0).all() and (out["acc"] <= 1 + 1e-6).all()
    assert out["acc"].max() > 0.1  # density_shift 0: the box is far from empty
    # Depth of an opaque-ish ray lies within the box along it.
    t0, t1 = ray_aabb(rays, BOX)
    seen = out["acc"] > 0.5
    assert seen.any()
    d = out["depth"][seen] / out["acc"][seen]
    assert (d >= t0[seen] - 1e-4).all() and (d <= t1[seen] + 1e-4).all()
    # Deterministic without a generator; gradients reach the grid.
    a, b = model.render_rays(rays), model.render_rays(rays)
    assert torch.equal(a["rgb"], b["rgb"])
    a["rgb"].sum().backward()
    assert model.field.density_vol.planes.grad is not None and model.field.app_vol.planes.grad.abs().sum() > 0


def test_grid_model_rays_that_miss_see_exactly_the_background():
    model = _tiny_grid_model()
    miss = _rays([[-5, 3, 0], [5, 0, 0], [0, 0, 5]], [[1, 0, 0], [1, 0, 0], [0, 1, 0]])
    hit = _rays([[-5, 0, 0]], [[1, 0, 0]])
    both = Rays(torch.cat([miss.origins, hit.origins]), torch.cat([miss.directions, hit.directions]))
    for rays in (miss, both):  # all missing (no samples at all), and mixed with a ray that has samples
        out = model.render_rays(rays)
        bg = torch.tensor(BACKGROUND).expand(3, 3)
        assert torch.equal(out["rgb"][:3], bg)
        assert torch.equal(out["acc"][:3], torch.zeros(3))
        assert torch.equal(out["depth"][:3], torch.zeros(3))
    assert out["acc"][3] > 0


def _on_lattice(density, aabb, axes):
    """`density` (of world points) at the lattice of box coordinates `axes`, as density_on_lattice gives it."""
    u = torch.stack(torch.meshgrid(*axes, indexing="ij"), -1)
    return density((aabb[0] + u * (aabb[1] - aabb[0])).reshape(-1, 3)).view(u.shape[:3])


@pytest.mark.parametrize("contracted", [False, True])
def test_occupancy_from_the_lattice_matches_reading_the_field_by_points(contracted):
    from dfield.core.contraction import Contraction

    torch.manual_seed(0)
    cfg = GridModelConfig(field=dataclasses.replace(TINY_FIELD, density_shift=-12.0, init_scale=1.5), voxels_init=12**3)
    model = GridModel(BOX, 0.1, 10.0, BACKGROUND, cfg, contraction=Contraction("inf") if contracted else None)
    model.field.resize((9, 13, 11))  # not a cube: each axis its own resolution
    model.update_occupancy()
    lattice = model.occupancy
    points = OccupancyGrid(model.field.aabb, lattice.resolution, model.contraction)
    points.update(model.field.density, model.step, cfg.occupancy_threshold)
    assert 0.05 < lattice.occupied.float().mean() < 0.95  # a mixed grid, so the comparison means something
    assert torch.equal(lattice.occupied, points.occupied)
    sigma = model.field.density_on_lattice(lattice.lattice_axes()).reshape(-1)
    torch.testing.assert_close(sigma, model.field.density(lattice.cell_centers()), atol=1e-4, rtol=1e-4)


def test_grid_model_schedule_upsamples_and_shrinks():
    model = _tiny_grid_model()
    model.cfg.occupancy_start, model.cfg.occupancy_every, model.cfg.shrink_step = 2, 2, 4
    res0 = model.field.res
    # Density only in a ball, so the box has somewhere to shrink to (read by points and on lattices alike).
    model.field.density = lambda x: 50.0 * ((x - 0.2).norm(dim=-1) < 0.3).float()
    model.field.density_on_lattice = lambda axes: _on_lattice(model.field.density, model.field.aabb, axes)
    steps = [model.schedule.before_step(model, s) for s in range(12)]
    changed = [c.reshaped for c in steps]
    assert changed[4] and changed[10]  # shrink at 4, upsample at 10: the optimiser must be rebuilt
    assert not any(changed[s] for s in (0, 1, 2, 3, 5, 6, 7, 8, 9, 11))
    assert [s for s, c in enumerate(steps) if c.shrunk] == [4]  # only the shrink lets the trainer skip missed rays
    assert model.shrunk and model.occupancy is not None
    size = model.field.aabb[1] - model.field.aabb[0]
    assert (size < 2.0).all()
    assert (model.field.aabb[0] <= 0.2 - 0.3 + 1e-5).all() and (model.field.aabb[1] >= 0.2 + 0.3 - 1e-5).all()
    assert math.prod(model.field.res) > math.prod(res0)


def test_a_threshold_above_the_early_one_is_capped_at_the_grids_mean_opacity():
    torch.manual_seed(0)
    cfg = GridModelConfig(field=dataclasses.replace(TINY_FIELD, density_shift=-12.0, init_scale=1.5), voxels_init=12**3)
    model = GridModel(BOX, 0.1, 10.0, BACKGROUND, cfg)
    res = model.field.res[0]
    sigma = model.field.density_on_lattice(OccupancyGrid(BOX, res).lattice_axes())
    mean = float((1 - torch.exp(-sigma * model.step)).mean())
    assert cfg.occupancy_threshold < mean < 0.5
    for asked, used in ((0.5, mean), (mean / 2, mean / 2), (1e-6, 1e-6)):
        model.update_occupancy(threshold=asked)  # a faint scene keeps its cells whatever the late threshold says
        expected = OccupancyGrid(BOX, res)
        expected.mark(sigma, model.step, used)
        assert torch.equal(model.occupancy.occupied, expected.occupied), asked


def test_empty_space_is_marked_at_the_late_threshold_from_the_box_shrink():
    cfg = GridModelConfig(upsample_steps=(6, 10), shrink_step=4, occupancy_start=2, occupancy_every=2,
                          occupancy_threshold=1e-4, occupancy_threshold_late=1e-2)
    marked = {}

    class Model:
        shrunk = False

        def update_occupancy(self, shrink=False, threshold=None):
            marked[step] = threshold
            self.shrunk |= shrink
            return 0.5

        def resize_grid(self, n_voxels):
            pass

    schedule, model = GridSchedule(cfg), Model()
    for step in range(16):
        schedule.before_step(model, step)
    assert marked == {2: 1e-4} | {s: 1e-2 for s in (4, 6, 8, 10, 12, 14)}
    cfg.occupancy_late_step = 10  # or from a step of one's own
    marked.clear()
    for step in range(16):
        schedule.before_step(model, step)
    assert marked == {s: 1e-4 for s in (2, 4, 6, 8)} | {s: 1e-2 for s in (10, 12, 14)}


def test_nerf_model_shapes():
    torch.manual_seed(0)
    model = NeRFModel(0.5, 6.0, BACKGROUND, NeRFModelConfig(depth=2, width=16, n_coarse=8, n_fine=8))
    rays = _random_rays(10, seed=6)
    out = model.render_rays(rays, torch.Generator().manual_seed(0))
    assert out["rgb"].shape == (10, 3) and out["rgb_coarse"].shape == (10, 3)
    assert out["depth"].shape == (10,) and out["acc"].shape == (10,)
    for v in out.values():
        assert torch.isfinite(v).all()
    assert (out["rgb"] >= 0).all() and (out["rgb"] <= 1 + 1e-6).all()
    assert (out["acc"] >= 0).all() and (out["acc"] <= 1 + 1e-6).all()
    a, b = model.render_rays(rays), model.render_rays(rays)
    assert torch.equal(a["rgb"], b["rgb"])
    chunked = model.render_chunked(rays, chunk=3)
    torch.testing.assert_close(chunked["rgb"], a["rgb"])


def test_nerf_model_opacity_stays_at_most_one():
    """Density everywhere (the last, 1e10-long interval included): each ray is opaque, not twice opaque."""
    torch.manual_seed(0)
    model = NeRFModel(0.5, 6.0, BACKGROUND, NeRFModelConfig(depth=2, width=16, n_coarse=8, n_fine=8))
    with torch.no_grad():
        for mlp in (model.coarse, model.fine):
            mlp.sigma.bias.fill_(0.5)
    out = model.render_rays(_random_rays(10, seed=7))
    torch.testing.assert_close(out["acc"], torch.ones(10), atol=1e-5, rtol=0)
    assert (out["rgb"] >= 0).all() and (out["rgb"] <= 1 + 1e-6).all()


def test_sample_pdf_follows_the_weights():
    bins = torch.linspace(0, 8, 9).expand(2, 9)
    w = torch.zeros(2, 8)
    w[0, 3] = 1.0
    w[1, 6] = 1.0
    for det, gen in ((True, None), (False, torch.Generator().manual_seed(0))):
        t = _sample_pdf(bins, w, 32, det, gen)
        assert t.shape == (2, 32)
        # Nearly all samples fall in the one heavy bin (the 1e-5 floor leaves the rest a tiny share).
        assert ((t[0] >= 3) & (t[0] <= 4)).float().mean() > 0.9
        assert ((t[1] >= 6) & (t[1] <= 7)).float().mean() > 0.9
        assert (t >= 0).all() and (t <= 8).all()


@pytest.mark.parametrize("n", [1, 4095, 4097])
def test_bf16_colour_mlp_matches_float32_at_any_sample_count(n):
    """The bf16 colour MLP pads its rows to a fixed multiple (memory, see TensoRFField.color): every row still gets
    its own colour, within bf16 rounding of the float32 one, and padding rows never leak into the output."""
    from dfield.fields.tensorf import TensoRFField

    torch.manual_seed(0)
    aabb = torch.tensor([[-1.0] * 3, [1.0] * 3])
    f32 = TensoRFField(aabb, (8, 8, 8), dataclasses.replace(TINY_FIELD, mlp_precision="float32"))
    with torch.no_grad():
        for v in f32.volumes():
            v.planes.normal_(0, 0.5), v.lines.normal_(0, 0.5)
    bf = copy.deepcopy(f32)
    bf.cfg = dataclasses.replace(f32.cfg, mlp_precision="bfloat16")
    x, d = torch.rand(n, 3) * 2 - 1, F.normalize(torch.randn(n, 3), dim=-1)
    ref, out = f32.color(x, d), bf.color(x, d)
    assert out.shape == (n, 3) and out.dtype == torch.float32
    assert (out - ref).abs().max() < 2e-2 and (out - ref).abs().max() > 0  # rounded, not silently float32
    out.sum().backward()  # gradients flow through the padded bf16 path
    assert all(p.grad is not None and torch.isfinite(p.grad).all() for p in bf.mlp.parameters())


def test_render_without_gradients_matches_the_one_pass_render():
    """Inference renders (no gradients) march in windows, stop rays behind opaque surfaces and colour every visible
    sample in one call; they give what the one-pass training render gives, features and channels included, and
    zeros of the right width where nothing is visible."""
    model = _tiny_grid_model()
    model.add_feature_field(5, 7)
    rays = _random_rays(300, seed=11)
    field, s = model.as_field(), model.render_settings()
    s = dataclasses.replace(s, stop_transmittance=0.0)  # no early stop: the two must then agree to rounding
    channels = {"height": lambda p: p[:, 2], "both": lambda p: p[:, :2]}
    one_pass = render_field(field, rays, s, None, features=True, channels=channels)  # gradients on: one pass
    with torch.no_grad():
        windowed = render_field(field, rays, s, None, features=True, channels=channels)
    assert set(windowed) == set(one_pass)
    for k, v in one_pass.items():
        assert windowed[k].shape == v.shape, k
        torch.testing.assert_close(windowed[k], v.detach(), atol=1e-5, rtol=1e-4)
    miss = _rays([[-5, 3, 0]], [[1, 0, 0]])
    with torch.no_grad():
        empty = render_field(field, miss, s, None, features=True, channels=channels)
    assert empty["feature"].shape == (1, 5) and empty["both"].shape == (1, 2) and empty["height"].shape == (1,)
    assert torch.equal(empty["rgb"], torch.tensor([BACKGROUND]))


def test_features_composited_from_kept_samples_match_a_render_with_features():
    """A render that keeps its visible samples (`visible=True`; the viewer shows colour first) gives, through
    `composite_samples`, the features a render with features gives, on both render paths; its colour is the same."""
    model = _tiny_grid_model()
    model.add_feature_field(5, 7)
    rays = _random_rays(300, seed=12)
    field, s = model.as_field(), model.render_settings()
    for grad in (True, False):
        with torch.set_grad_enabled(grad):
            whole = render_field(field, rays, s, None, features=True)
            kept = render_field(field, rays, s, None, visible=True)
        seen = kept["visible"]
        assert "feature" not in kept and len(seen.ray) > 100 and seen.ray.max() < len(rays)
        torch.testing.assert_close(kept["rgb"], whole["rgb"])
        with torch.no_grad():
            later = composite_samples(field.features, rays, seen)
        torch.testing.assert_close(later, whole["feature"].detach(), atol=1e-5, rtol=1e-4)


def test_compiled_read_kernels_match_the_eager_reads(monkeypatch):
    """`compile_kernels` (torch.compile of the VM read arithmetic, for the viewer) reads what the eager ops read,
    is used only without gradients, and a compiler failure leaves the eager reads in place with the reason."""
    import dfield.fields.vm as vm

    monkeypatch.setattr(vm, "_compiled", None)  # whatever this test compiles is gone afterwards
    torch.manual_seed(0)
    vols = [VMVolume(4, (20, 16, 12)), VMVolume(6, 24)]
    u = torch.rand(777, 3) * 1.2 - 0.1  # some outside [0, 1]: clamped the same way
    with torch.no_grad():
        eager = [v(u) for v in vols]
    assert vm.compile_kernels(vols, sizes=(64, 67)) is None and vm._compiled is not None
    with torch.no_grad():
        for v, e in zip(vols, eager):
            torch.testing.assert_close(v(u), e, atol=1e-6, rtol=1e-5)
    out = vols[0](u)  # gradients on: the eager ops, which autograd knows
    assert out.requires_grad and out.grad_fn is not None and "Compiled" not in type(out.grad_fn).__name__
    vm.use_eager_kernels()
    assert vm._compiled is None

    def no_compiler(*a, **k):
        raise RuntimeError("no C compiler found\nmore detail")

    monkeypatch.setattr(torch, "compile", no_compiler)
    assert vm.compile_kernels(vols) == "RuntimeError: no C compiler found" and vm._compiled is None
