"""Scene types: the contraction maths, marching in contracted space, scene-type detection and normalisation, and a
tiny unbounded training run end to end."""

import json
import math
from dataclasses import replace
from pathlib import Path

import numpy as np
import pytest
import torch

from dfield.core.contraction import Contraction, unwarp, warp
from dfield.core.rays import Rays
from dfield.core.sampling import OccupancyGrid, march
from dfield.data import load_dataset
from dfield.data.dataset import Cameras, DataError, Dataset
from dfield.data.generate import SceneSpec, generate_scene, render_view
from dfield.data.poses import look_at
from dfield.data.scene_type import apply_scene_type, detect_scene_type

NORMS = ("inf", "l2")


# ---------------------------------------------------------------- contraction maths


@pytest.mark.parametrize("norm", NORMS)
def test_contraction_is_identity_inside_continuous_at_the_ball_and_bounded(norm):
    c = Contraction(norm)
    g = torch.Generator().manual_seed(0)
    inside = torch.rand(500, 3, generator=g) * 2 - 1
    inside = inside / c.size(inside)[:, None].clamp(min=1) * 0.999
    torch.testing.assert_close(c(inside), inside)
    # Continuity across the unit sphere of the norm: points just inside and just outside map next to each other.
    dirs = torch.randn(500, 3, generator=g, dtype=torch.float64)
    on = dirs / c.size(dirs)[:, None]
    for eps in (1e-3, 1e-6):
        gap = (c(on * (1 + eps)) - c(on * (1 - eps))).norm(dim=-1)
        assert gap.max() < 4 * eps * on.norm(dim=-1).max()
    far = dirs * 10.0 ** torch.rand(500, 1, generator=g, dtype=torch.float64) * 8
    size = c.size(c(far))
    assert (size < 2).all() and (size >= 0).all()
    # Radially monotone: farther along a direction, farther out in contracted space, approaching 2.
    r = torch.tensor([0.5, 1.0, 2.0, 10.0, 1e4], dtype=torch.float64)[:, None]
    sizes = c.size(c(on[:1] * r))
    assert (sizes.diff() > 0).all() and sizes[-1] > 1.999


@pytest.mark.parametrize("norm", NORMS)
def test_contraction_inverse(norm):
    c = Contraction(norm)
    g = torch.Generator().manual_seed(1)
    x = torch.randn(1000, 3, generator=g, dtype=torch.float64) * 10.0 ** (torch.rand(1000, 1, generator=g) * 4 - 1)
    torch.testing.assert_close(c.inverse(c(x)), x, rtol=1e-9, atol=1e-9)
    y = (torch.rand(1000, 3, generator=g, dtype=torch.float64) * 2 - 1) * 1.99
    y = y[c.size(y) < 1.99]
    torch.testing.assert_close(c(c.inverse(y)), y)
    assert torch.isfinite(c.inverse(torch.tensor([[2.0, 2.0, 2.0], [4.0, 0.0, 0.0]]))).all()  # the boundary is inf


def test_warp_is_continuous_with_slope_one_at_the_knee_and_inverts():
    knee, unit = torch.tensor([[1.5], [3.0]]), torch.tensor([[1.0], [0.5]])
    t = torch.linspace(0.01, 1e4, 20001, dtype=torch.float64)[None].expand(2, -1)
    s = warp(t, knee, unit)
    assert (s.diff(dim=1) > 0).all() and (s < knee + unit).all()
    torch.testing.assert_close(unwarp(s, knee, unit), t, rtol=1e-6, atol=1e-6)
    h = 1e-6
    for k, u in ((1.5, 1.0), (3.0, 0.5)):
        kt, ut = torch.tensor(k, dtype=torch.float64), torch.tensor(u, dtype=torch.float64)
        left, right = warp(kt - h, kt, ut), warp(kt + h, kt, ut)
        assert abs((right - left) / (2 * h) - 1) < 1e-4  # slope 1 on both sides


def test_knee_is_where_a_ray_leaves_the_ball():
    o = torch.tensor([[0.0, 0.0, -3.0], [0.0, 0.0, 0.0], [0.0, 2.0, -3.0]])
    d = torch.tensor([[0.0, 0.0, 1.0], [1.0, 0.0, 0.0], [0.0, 0.0, 2.0]])
    torch.testing.assert_close(Contraction("l2").knee(o, d, 0.1), torch.tensor([4.0, 1.0, 1.5]))  # last: misses
    torch.testing.assert_close(Contraction("inf").knee(o, d, 0.1), torch.tensor([4.0, 1.0, 1.5]))
    assert Contraction("l2").knee(o, d, 5.0).tolist() == [5.0, 5.0, 5.0]


@pytest.mark.parametrize("norm", NORMS)
def test_march_spreads_samples_evenly_in_contracted_space(norm):
    c = Contraction(norm)
    o = torch.tensor([[0.0, 0.0, -3.0], [0.3, -2.5, 1.0]])
    d = torch.nn.functional.normalize(torch.tensor([[0.0, 0.0, 1.0], [0.1, 1.0, -0.35]]), dim=-1)
    step = 0.01
    smp = march(Rays(o, d), None, 0.05, 1000.0, step, max_samples=4096, contraction=c)
    for r in range(2):
        t = smp.t[r][smp.mask[r]]
        assert t[0] < 0.06 and t[-1] > 50  # from near to far out (the last step before far is ~100)
        pts = c(o[r] + d[r] * t[:, None])
        gaps = (pts[1:] - pts[:-1]).norm(dim=-1)
        assert gaps.max() < 3.5 * step  # no sample far from the next in contracted space
        # The lengths are contracted chords: together they are the contracted length of the ray.
        dt = smp.dt[r][smp.mask[r]]
        assert abs(dt.sum() - gaps.sum()) < 3 * step
    # Unmasked (grid) samples: the occupancy grid over the contracted cube takes world points.
    grid = OccupancyGrid(torch.tensor([[-2.0] * 3, [2.0] * 3]), 8, c)
    grid.occupied[:] = False
    grid.occupied[7, :, :] = True  # the far +x face of the cube: everything with x >> 1
    assert grid.query(torch.tensor([[100.0, 0.0, 0.0], [0.5, 0.0, 0.0]])).tolist() == [True, False]
    centres = grid.aabb[0] + (torch.cartesian_prod(*[torch.arange(8.0)] * 3) + 0.5) * 0.5
    reachable = c.size(centres) < 1.99  # l2: the cube's corners lie beyond the image of all space (radius 2)
    assert reachable.all() if norm == "inf" else 0 < reachable.sum() < len(centres)
    torch.testing.assert_close(c(grid.cell_centers())[reachable], centres[reachable], rtol=1e-4, atol=1e-4)


def test_distortion_loss_matches_the_pairwise_sum_and_prefers_one_interval():
    from dfield.core.rendering import distortion_loss

    g = torch.Generator().manual_seed(0)
    w = torch.rand(5, 9, generator=g, dtype=torch.float64)
    s = torch.sort(torch.rand(5, 9, generator=g, dtype=torch.float64), -1).values
    ds = torch.full((5, 1), 0.03, dtype=torch.float64)
    pairs = (w[:, :, None] * w[:, None, :] * (s[:, :, None] - s[:, None, :]).abs()).sum((1, 2))
    torch.testing.assert_close(distortion_loss(w, s, ds), pairs + (w * w * ds).sum(-1) / 3)
    peaked, spread = torch.zeros(1, 9, dtype=torch.float64), torch.full((1, 9), 1 / 9, dtype=torch.float64)
    peaked[0, 4] = 1.0
    assert distortion_loss(peaked, s[:1], ds[:1]) < distortion_loss(spread, s[:1], ds[:1])


def test_contracted_march_gives_normalised_distances_for_the_distortion_loss():
    c = Contraction("inf")
    o, d = torch.tensor([[0.0, 0.0, -3.0]]), torch.tensor([[0.0, 0.0, 1.0]])
    smp = march(Rays(o, d), None, 0.05, 1000.0, 0.01, max_samples=4096, contraction=c)
    s = smp.s[smp.mask]
    assert s.min() >= 0 and s.max() < 1 and (s.diff() > 0).all()
    assert march(Rays(o, d), torch.tensor([[-1.0] * 3, [1.0] * 3]), 0.05, 10.0, 0.01).s is None


# ---------------------------------------------------------------- scene types


def _dataset(c2w: torch.Tensor, images: torch.Tensor, paths=()) -> Dataset:
    n = len(c2w)
    cams = Cameras(c2w.float(), torch.full((n,), 20.0), torch.full((n,), 20.0), torch.full((n,), 8.0),
                   torch.full((n,), 8.0), 16, 16)
    return Dataset(images=images, cameras=cams, image_paths=list(paths), aabb=torch.tensor([[-1.5] * 3, [1.5] * 3]),
                   near=0.5, far=8.0, scene_c2w=c2w.float(), format="blender")


def test_scene_type_detection_from_cameras_and_images():
    rng = np.random.default_rng(0)
    a = torch.linspace(0, 2 * math.pi, 13)[:-1]
    orbit = look_at(torch.stack([4 * a.cos(), 4 * a.sin(), torch.ones_like(a)], -1), torch.zeros(3),
                    torch.tensor([0.0, 0.0, 1.0]))
    xy = torch.cartesian_prod(torch.linspace(-1, 1, 3), torch.linspace(-0.5, 0.5, 3))
    eyes = torch.cat([xy, torch.full((9, 1), -4.0)], -1)[:, [0, 2, 1]]  # a 3x3 grid of cameras in the y = -4 plane
    forward = look_at(eyes, torch.tensor([0.0, 0.0, 0.0]), torch.tensor([0.0, 0.0, 1.0]))
    textured = torch.from_numpy(rng.integers(0, 256, (12, 16, 16, 3), dtype=np.uint8))
    plain = torch.full((12, 16, 16, 3), 255, dtype=torch.uint8)
    plain[:, 5:11, 5:11] = textured[:, 5:11, 5:11]  # an object in the middle, nothing at the borders
    assert detect_scene_type(_dataset(forward, textured[:9]))[0] == "forward"
    assert detect_scene_type(_dataset(orbit, plain))[0] == "object"
    kind, why = detect_scene_type(_dataset(orbit, textured))
    assert kind == "unbounded" and "surroundings" in why


def test_generated_scenes_are_detected_and_unbounded_ones_normalised(tmp_path):
    spec = SceneSpec(seed=2, n_train=6, n_test=2, width=24, height=24, supersample=1)
    obj = load_dataset(generate_scene(tmp_path / "obj", spec), "train")
    assert obj.scene_type == "object" and "transparent" in obj.scene_note
    root = generate_scene(tmp_path / "far", replace(spec, unbounded=True))
    train, test = load_dataset(root, "train"), load_dataset(root, "test")
    assert train.scene_type == test.scene_type == "unbounded"
    assert train.aabb.tolist() == [[-2.0] * 3, [2.0] * 3] and train.far >= 100 and 0 < train.near < 1
    # The objects' box [-1.5, 1.5]^3 becomes the unit cube around the cameras' focus (0, 0, 0.3): one similarity
    # for every split, recorded so ground truth can be compared.
    m = train.scene_from_source.double()
    torch.testing.assert_close(m, test.scene_from_source.double())
    torch.testing.assert_close(m[:3, :3], torch.eye(3, dtype=torch.float64) / 1.5, atol=1e-6, rtol=0)
    torch.testing.assert_close(m[:3, 3] * 1.5, torch.tensor([0.0, 0.0, -0.3], dtype=torch.float64), atol=1e-3, rtol=0)
    source = load_dataset(root, "train", scene_type="object")
    eye = source.cameras.c2w[:, :, 3].double()
    torch.testing.assert_close(train.cameras.c2w[:, :, 3].double(), eye @ m[:3, :3].T + m[:3, 3], atol=1e-5, rtol=0)
    torch.testing.assert_close(train.cameras.c2w[:, :, :3], source.cameras.c2w[:, :, :3])
    assert source.aabb.tolist() == [[-1.5] * 3, [1.5] * 3]
    # Every pixel is opaque and ground truth renders from any camera, depth included.
    view = render_view(replace(spec, unbounded=True), source.cameras.c2w[0].numpy())
    assert (view["rgba"][..., 3] == 255).all() and np.isfinite(view["depth"]).all()
    assert np.array_equal(view["rgba"][..., :3], train.images[0].numpy())


def test_llff_scene_types_and_llff_mode(make_llff):
    root = make_llff(n=9)
    fwd = load_dataset(root, "train", 4)
    assert fwd.scene_type == "forward" and fwd.ndc and fwd.near == 0.0 and fwd.far == 1.0
    assert load_dataset(root, "train", 4, llff_mode="ndc").ndc
    box = load_dataset(root, "train", 4, scene_type="object")
    assert not box.ndc and box.aabb.tolist() == [[-2.0] * 3, [2.0] * 3]
    assert box.near == pytest.approx(0.9 * 2 / 1.5) and box.far == pytest.approx(1.1 * 10 / 1.5)
    unb = load_dataset(root, "train", 4, llff_mode="contract")
    assert unb.scene_type == "unbounded" and not unb.ndc and unb.far >= 100
    with pytest.raises(DataError, match="llff-mode ndc"):
        load_dataset(root, "train", 4, llff_mode="ndc", scene_type="unbounded")


def test_forward_for_other_formats_recentres_and_scales_to_ndc():
    xy = torch.cartesian_prod(torch.linspace(-1, 1, 3), torch.linspace(-0.5, 0.5, 3))
    eyes = torch.cat([xy, torch.full((9, 1), -4.0)], -1)[:, [0, 2, 1]] + torch.tensor([3.0, 0.0, 1.0])
    c2w = look_at(eyes, torch.tensor([3.0, 0.0, 1.0]), torch.tensor([0.0, 0.0, 1.0]))
    data = _dataset(c2w, torch.zeros(9, 16, 16, 3, dtype=torch.uint8))
    fwd = apply_scene_type(data, "forward")
    assert fwd.ndc and fwd.ndc_focal == pytest.approx(float(data.cameras.fx[0]))
    assert fwd.aabb.tolist()[1][2] == 1.0 and (fwd.near, fwd.far) == (0.0, 1.0)
    # In the average pose's frame (cameras centred, looking down -z), scaled so the near bound is depth 1.
    positions = fwd.scene_c2w[:, :, 3]
    torch.testing.assert_close(positions.mean(0), torch.zeros(3), atol=1e-5, rtol=0)
    assert (fwd.scene_c2w[:, 2, 2] > 0.9).all()  # back axes along +z: every camera looks down -z
    scale = float(fwd.scene_from_source[:3, :3].norm(dim=0).mean())
    assert scale == pytest.approx(1 / data.near, rel=1e-5)
    torch.testing.assert_close(fwd.cameras.c2w, fwd.scene_c2w)


# ---------------------------------------------------------------- training


def test_tiny_unbounded_run_trains_renders_finite_images_and_reopens(tmp_path, tiny_train_config):
    from dfield.core.image_rendering import render_image
    from dfield.io.run import load_config, open_run
    from dfield.training.trainer import Trainer

    spec = SceneSpec(seed=1, n_train=6, n_test=2, width=16, height=16, supersample=1, n_objects=2, unbounded=True)
    scene = generate_scene(tmp_path / "scene", spec)
    cfg = tiny_train_config(scene, iterations=20)
    tr = Trainer.create(cfg, tmp_path / "run")
    assert tr.cfg.data.scene_type == "unbounded" and tr.model.contraction is not None
    assert tr.cfg.grid.weight_threshold == 1e-4 and tr.cfg.grid.random_background  # the unbounded scene defaults
    assert tr.model.scene_box() is None and tr.model.field.aabb.tolist() == [[-2.0] * 3, [2.0] * 3]
    tr.train()
    assert tr.model.occupancy is not None and tr.model.occupancy.contraction is not None
    saved = load_config(tmp_path / "run" / "config.json")
    assert saved.data.scene_type == "unbounded"
    run = open_run(tmp_path / "run")
    out = render_image(run.model, run.scene.train_cameras(), 0)
    assert all(torch.isfinite(v).all() for v in out.values())
    assert out["rgb"].shape == (16, 16, 3) and out["acc"].min() >= 0 and out["acc"].max() <= 1 + 1e-5
    tr.model.eval()
    again = render_image(tr.model, tr.data.cameras, 0)
    torch.testing.assert_close(out["rgb"], again["rgb"])  # the checkpoint holds the contracted occupancy grid too


def test_configs_saved_before_scene_types_keep_their_meaning(tmp_path):
    from dfield.io.run import load_config

    for ndc, mode, expected in ((True, "ndc", "forward"), (False, "contract", "object"), (False, "ndc", "object")):
        run = tmp_path / f"run_{ndc}_{mode}"
        run.mkdir()
        (run / "config.json").write_text(json.dumps({"data": {"path": "x", "llff_mode": mode}}))
        (run / "scene.json").write_text(json.dumps({"aabb": [[0, 0, 0], [1, 1, 1]], "near": 0, "far": 1,
                                                    "background": [1, 1, 1], "ndc": ndc}))
        cfg = load_config(run / "config.json")
        assert (cfg.data.scene_type, cfg.data.llff_mode) == (expected, "auto")
    assert Path(tmp_path).is_dir()


def test_scene_defaults_apply_to_forward_scenes_only_and_never_over_a_chosen_value(tmp_path, make_llff,
                                                                                   tiny_train_config):
    from dfield.config import SCENE_DEFAULTS, TrainConfig, apply_scene_defaults
    from dfield.training.trainer import Trainer

    forward = SCENE_DEFAULTS["forward"]
    assert forward and not SCENE_DEFAULTS["object"]
    cfg = TrainConfig()
    cfg.grid.field.view_freqs = 3  # chosen on purpose: kept
    changed = apply_scene_defaults(cfg, "forward")
    assert cfg.grid.field.view_freqs == 3 and "grid.field.view_freqs" not in changed
    assert cfg.grid.voxel_aspect == forward["grid.voxel_aspect"] and "grid.voxel_aspect" in changed
    root = make_llff(n=9)
    tr = Trainer.create(tiny_train_config(root), tmp_path / "fwd")
    assert tr.cfg.data.scene_type == "forward" and tr.cfg.grid.voxel_aspect == forward["grid.voxel_aspect"]
    res = tr.model.field.res
    assert res[2] < res[0] and res[2] < res[1]  # deeper voxels along NDC depth
    off = tiny_train_config(root, scene_defaults=False)
    assert Trainer.create(off, tmp_path / "off").cfg.grid.voxel_aspect == (1.0, 1.0, 1.0)
    obj = Trainer.create(tiny_train_config(root, data=replace(off.data, scene_type="object")), tmp_path / "obj")
    assert obj.cfg.grid.voxel_aspect == (1.0, 1.0, 1.0) and obj.cfg.grid.field == TrainConfig().grid.field


def test_random_background_only_behind_training_rays_of_unbounded_models():
    from dfield.models.grid import GridModel, GridModelConfig

    cfg = GridModelConfig(voxels_init=8**3, random_background=True, distortion_weight=0.01)
    box = torch.tensor([[-1.0] * 3, [1.0] * 3])
    rays = Rays(torch.tensor([[0.0, 0.0, -3.0]]).repeat(64, 1), torch.tensor([[0.0, 0.0, 1.0]]).repeat(64, 1))
    empty = GridModel(box, 0.1, 100.0, [1.0, 1.0, 1.0], cfg, contraction=Contraction("inf"))
    with torch.no_grad():
        for p in empty.field.density_vol.parameters():
            p.zero_()  # nothing anywhere: every ray shows its background
        train = empty.render_rays(rays, torch.Generator().manual_seed(0))
        test = empty.render_rays(rays)
    assert train["rgb"].std(0).min() > 0.1 and "distortion" in train
    torch.testing.assert_close(test["rgb"], torch.ones(64, 3), atol=1e-2, rtol=0)
    bounded = GridModel(box, 0.1, 100.0, [1.0, 1.0, 1.0], cfg)
    assert "distortion" not in bounded.render_rays(rays, torch.Generator().manual_seed(0))
