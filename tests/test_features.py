"""Feature field: stop-gradient, decoder shapes, training with a teacher, lifting and features-second distillation."""

from __future__ import annotations

import copy

import numpy as np
import pytest
import torch

from dfield.core.rays import RayBatcher, Rays
from dfield.data import load_dataset
from dfield.features.fitting import SamplePool, fit_features, render_features
from dfield.features.lifting import lift_features
from dfield.features.segmentation import nearest_label, segmentation_eval
from dfield.features.teachers import Teacher, registry
from dfield.features.teachers.cache import FeatureMaps
from dfield.fields.tensorf import TensoRFConfig
from dfield.models.grid import GridModel, GridModelConfig
from dfield.training.trainer import Trainer


def _model(feature_dim=8, teacher_dim=12):
    cfg = GridModelConfig(field=TensoRFConfig(density_comp=4, app_comp=4, app_dim=6, hidden=16, feature_dim=feature_dim, feature_comp=4),
                          voxels_init=12**3)
    aabb = torch.tensor([[-1.0, -1, -1], [1, 1, 1]])
    m = GridModel(aabb, 0.1, 10.0, (1.0, 1.0, 1.0), cfg, teacher_dim=teacher_dim)
    with torch.no_grad():  # some density so rays have weight to composite with
        m.field.density_vol.planes.add_(0.5)
        m.field.density_vol.lines.add_(0.5)
    return m


def _rays(n=64, seed=0):
    g = torch.Generator().manual_seed(seed)
    o = torch.tensor([0.0, 0.0, -3.0]).expand(n, 3).clone()
    d = torch.nn.functional.normalize(torch.randn(n, 3, generator=g) * 0.2 + torch.tensor([0, 0, 1.0]), dim=-1)
    return Rays(o, d)


def test_feature_loss_never_reaches_density():
    m = _model()
    out = m.render_rays(_rays(), None, features=True)
    assert out["feature"].shape == (64, 8)
    decoded = m.decode(out["feature"])
    assert decoded.shape == (64, 12)
    decoded.square().mean().backward()
    for p in (m.field.density_vol.planes, m.field.density_vol.lines):
        assert p.grad is None or torch.count_nonzero(p.grad) == 0
    assert torch.count_nonzero(m.field.feature_vol.planes.grad) > 0
    assert m.decoder.weight.grad is not None


def test_rgb_loss_still_reaches_density():
    m = _model()
    out = m.render_rays(_rays(), None, features=True)
    out["rgb"].mean().backward()
    assert torch.count_nonzero(m.field.density_vol.planes.grad) > 0


def test_features_follow_resize_and_shrink():
    m = _model()
    x = torch.rand(50, 3) * 0.5 - 0.25
    before = m.field.features(x)
    m.field.resize((23, 23, 23))  # 2x-1 refinement keeps trilinear values
    assert torch.allclose(m.field.features(x), before, atol=1e-5)


def test_nearest_label_picks_most_similar():
    emb = torch.eye(3)
    f = torch.tensor([[0.9, 0.1, 0.0], [0.0, 0.2, 5.0]])
    assert nearest_label(f, emb, torch.arange(3)).tolist() == [0, 2]


class _OneHotTeacher(Teacher):
    """A noise-free teacher: the one-hot of the ground-truth id at every pixel."""

    name, dim, uses_object_ids = "onehot", 8, True

    def encode(self, images, object_ids=None):
        return torch.nn.functional.one_hot(object_ids.long(), 8).float()

    def object_embeddings(self):
        return torch.eye(8)


def _register_onehot(mp: pytest.MonkeyPatch, cache) -> None:
    """The one-hot teacher under the name "onehot" (what a user's register_teacher does), with its own cache."""
    mp.setitem(registry._REGISTRY, "onehot", _OneHotTeacher)
    mp.setenv("DFIELD_CACHE_DIR", str(cache))


@pytest.fixture(scope="module")
def trained(tiny_scene, tiny_train_config, tmp_path_factory):
    """150 steps with a noise-free one-hot teacher (40 steps give PSNR ~11 dB: too early to judge features)."""
    with pytest.MonkeyPatch.context() as mp:
        _register_onehot(mp, tmp_path_factory.mktemp("onehot_cache"))
        cfg = tiny_train_config(tiny_scene, iterations=150)
        cfg.features.teacher, cfg.features.dim = "onehot", 8
        tr = Trainer.create(cfg, tmp_path_factory.mktemp("feat") / "run")
        tr.train()
    return tr


def test_training_with_a_teacher_learns_features(trained, tiny_scene):
    assert trained.cfg.features.teacher_dim == 8
    assert "feature_loss" in trained.last
    seg = segmentation_eval(trained.model.eval(), load_dataset(tiny_scene, "test"), _OneHotTeacher())
    assert seg["teacher_miou"] > 0.99
    assert seg["field_miou"] > 0.4  # measured 0.6: the field learns the objects, not just the background


def test_lifting_and_distillation_on_a_trained_field(trained, tiny_scene):
    train = trained.data
    maps = FeatureMaps(_OneHotTeacher().encode(train.images, train.object_ids).numpy().astype(np.float16), (train.width, train.height))
    model = copy.deepcopy(trained.model).eval()
    model.decoder = None
    frozen = {k: v.clone() for k, v in model.state_dict().items()}

    lifted = lift_features(model, train, maps, n_voxels=16**3)
    assert lifted.teacher_dim == 8 and torch.isfinite(lifted.grid).all()
    full = lift_features(model, train, maps, n_voxels=16**3, energy=None)  # every teacher channel kept
    assert full.basis is None and full.grid.shape[1] == 8
    x = torch.rand(500, 3) * (full.aabb[1] - full.aabb[0]) + full.aabb[0]
    # Compressed or not (one-hot averages of a few objects have low rank), they decode to the same features.
    assert torch.allclose(lifted.decode(lifted(x)), full(x), atol=0.05)
    model.lifted = lifted
    seg_l = segmentation_eval(model, load_dataset(tiny_scene, "test"), _OneHotTeacher())
    assert seg_l["field_miou"] > 0.4
    model.lifted = None

    model.add_feature_field(8, 8, comp=4)
    fit = fit_features(model, train, maps, iterations=30, batch_rays=256)
    assert np.isfinite(fit["loss"])
    after = model.state_dict()  # features second: density and colour untouched, bit for bit
    for k, v in frozen.items():
        if not k.startswith(("field.feature", "decoder")):
            assert torch.equal(after[k], v), k


def test_sample_pool_renders_what_the_renderer_renders(trained):
    """Features second looks visible samples up instead of marching: same features, and gradients, per pixel."""
    model = copy.deepcopy(trained.model).eval()
    model.add_feature_field(8, 8, comp=4)
    pool = SamplePool(model, trained.data, chunk=512)  # several chunks
    assert pool.offsets[-1] == len(pool.t) > 0
    rays, _, ids = RayBatcher(trained.data, 300, seed=3).sample()
    direct = render_features(model, rays)
    pooled = pool.render(model, rays, ids)
    assert (direct.abs().sum(1) > 0).sum() > 100  # rays that see the scene
    assert torch.allclose(pooled, direct, atol=1e-5, rtol=1e-4)
    g_direct = torch.autograd.grad(direct.square().sum(), model.field.feature_vol.planes)[0]
    g_pooled = torch.autograd.grad(pool.render(model, rays, ids).square().sum(), model.field.feature_vol.planes)[0]
    assert torch.allclose(g_pooled, g_direct, atol=1e-4, rtol=1e-3)


def test_teacher_spec_settings():
    from dfield.features.teachers import TeacherError, make_teacher

    t = make_teacher("synthetic:noise=0.8,dim=16")
    assert t.dim == 16 and "noise=0.8" in t.name
    with pytest.raises(TeacherError, match="bogus"):
        make_teacher("synthetic:bogus=1")
    with pytest.raises(TeacherError, match="unknown teacher"):
        make_teacher("nope")


def test_radiance_first_features_get_their_own_schedule_and_background(tiny_scene, tiny_train_config, tmp_path):
    """Features from step 20 of 40: their learning rate starts full at step 20 (not already decayed), and rays
    that miss the shrunk box still teach the decoder what background looks like."""
    with pytest.MonkeyPatch.context() as mp:
        _register_onehot(mp, tmp_path / "cache")
        cfg = tiny_train_config(tiny_scene, iterations=40)
        cfg.features.teacher, cfg.features.dim, cfg.features.start_step = "onehot", 8, 20
        tr = Trainer.create(cfg, tmp_path / "run")
        while tr.step < 20:
            tr.train_step()
        tr._set_lr()
        lrs = {g["name"]: g["lr"] / g["initial_lr"] for g in tr.optimizer.param_groups}
        assert lrs["feature_grid"] == 1.0 and lrs["feature_network"] == 1.0 and lrs["grid"] < 1.0
        assert tr.batcher.pool is not None  # the box has shrunk (step 15): the batcher draws only rays that hit it
        miss = tr._missed_rays_feature_loss(64)
        assert miss is not None and 0 < miss[1] < 1 and miss[0].requires_grad
