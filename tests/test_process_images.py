"""dfield process-images: structure from motion on a small textured generated scene recovers its cameras, the
written scene loads, video frames are picked by sharpness, and every bad input stops with one clear line."""

import json
import shutil

import imageio.v2 as imageio
import numpy as np
import pytest
from PIL import Image

from dfield.app.cli import main
from dfield.data import load_dataset
from dfield.data.alignment import pose_errors, up_rotation
from dfield.data.generate import SceneSpec, generate_scene
from dfield.errors import DataError
from dfield.io.capture import CaptureOptions, process_images
from dfield.io.frames import extract_frames, sharpness
from dfield.io.scene_writer import rotation_to_qvec
from dfield.io.sfm import image_pairs

pytest.importorskip("pycolmap")

N_VIEWS = 16


def _photos(scene, out):
    """The generated views as opaque photos (on white), named so that sorting keeps their order."""
    out.mkdir()
    for i in range(N_VIEWS):
        rgba = Image.open(scene / "train" / f"r_{i}.png")
        photo = Image.new("RGB", rgba.size, (255, 255, 255))
        photo.paste(rgba, mask=rgba.split()[3])
        photo.save(out / f"view_{i:02d}.png")
    return out


@pytest.fixture(scope="module")
def textured(tmp_path_factory):
    """A textured scene, 16 views at 320x240 on a band of elevations (neighbours about 20 degrees apart), its
    photos and their ground truth. At 160x120 SIFT finds too few features (~200 per view) to start a model."""
    root = tmp_path_factory.mktemp("sfm")
    spec = SceneSpec(seed=1, n_train=N_VIEWS, n_test=0, width=320, height=240, texture=1.0, n_objects=4,
                     elevation_min_deg=25, elevation_max_deg=45)
    scene = generate_scene(root / "gen", spec)
    meta = json.loads((scene / "transforms_train.json").read_text())
    gt = np.array([f["transform_matrix"] for f in meta["frames"]])[:, :3]
    return root, _photos(scene, root / "photos"), gt


@pytest.fixture(scope="module")
def processed(textured):
    root, photos, gt = textured
    calls = []
    summary = process_images(photos, root / "scene", progress=lambda *a: calls.append(a[:3]))
    return root / "scene", summary, gt, calls


def test_sfm_recovers_the_generated_cameras(processed):
    scene, s, gt, calls = processed
    assert s["registered"] == N_VIEWS and s["failed"] == []
    assert s["mean_reprojection_error_px"] < 1.0
    ds = load_dataset(scene, "all")
    assert len(ds) == N_VIEWS and [p.name for p in ds.image_paths] == [f"view_{i:02d}.png" for i in range(N_VIEWS)]
    e = pose_errors(ds.cameras.c2w.double().numpy(), gt)
    assert e["rotation_error_deg"].max() < 1.0, e["rotation_error_deg"]
    assert e["position_error_rel"].max() < 0.02, e["position_error_rel"]
    # Upright: the processed scene's +z is the generated scene's +z (its cameras circle the objects, their mean up
    # is +z there too), up to how far the mean camera up is from the true vertical.
    tilt = np.degrees(np.arccos(up_rotation(gt)[1] @ [0, 0, 1]))
    assert np.degrees(np.arccos(e["rotation"][:, 2] @ [0, 0, 1])) < tilt + 1.0
    # Progress came for every stage and ended complete.
    last = {label: (done, total) for label, done, total in calls}
    assert {"features", "matching", "mapping", "undistort"} <= set(last)
    assert all(done == total for done, total in last.values())


def test_written_scene(processed):
    scene, s, _, _ = processed
    # An orbit around objects is not forward-facing: nerfstudio transforms.json, with the points' box as aabb.
    assert s["scene_type"] == "object/360" and s["format"] == "nerfstudio"
    meta = json.loads((scene / "transforms.json").read_text())
    assert meta["camera_model"] == "PINHOLE" and meta["cx"] == 160 and meta["cy"] == 120
    assert np.abs(np.array(meta["aabb"])).max() == pytest.approx(1.0)
    assert (scene / "sparse" / "0" / "points3D.txt").is_file() and (scene / "points.ply").is_file()
    assert json.loads((scene / "sfm.json").read_text())["registered"] == N_VIEWS
    # The COLMAP model written beside it is the same scene: the COLMAP reader gives the same cameras.
    shutil.copytree(scene / "sparse", scene.parent / "as_colmap" / "sparse")
    shutil.copytree(scene / "images", scene.parent / "as_colmap" / "images")
    a, b = load_dataset(scene, "all"), load_dataset(scene.parent / "as_colmap", "all")
    assert b.format == "colmap"
    np.testing.assert_allclose(a.cameras.c2w.numpy(), b.cameras.c2w.numpy(), atol=2e-4)
    np.testing.assert_allclose(a.cameras.fx.numpy(), b.cameras.fx.numpy(), rtol=1e-6)
    # A forward-facing selection of the same photos (views within 35 degrees) is written as LLFF.
    assert s["view_spread_deg"] > 35


def test_cli_writes_llff_when_asked(textured, tmp_path, capsys):
    root, photos, gt = textured
    view = -gt[:, :, 2]
    close = np.argsort(-(view @ view[0]))[:6]  # view 0 and the five that look most like it
    few = tmp_path / "few"
    few.mkdir()
    for i in close:
        shutil.copy(photos / f"view_{i:02d}.png", few)
    assert main(["process-images", str(few), "--out", str(tmp_path / "scene"), "--format", "llff"]) == 0
    out = capsys.readouterr().out
    s = json.loads((tmp_path / "scene" / "sfm.json").read_text())
    assert f"registered       {s['registered']} of 6 images" in out and "written as llff" in out
    assert s["format"] == "llff" and s["registered"] >= 5
    ds = load_dataset(tmp_path / "scene", "all", scene_type="forward")  # six views of an orbit: auto may say object
    assert ds.format == "llff" and ds.ndc and len(ds) == s["registered"]


def test_pairs_and_quaternions():
    names = [f"{i:03d}" for i in range(40)]
    seq = image_pairs(names, sequential=True, overlap=5)
    assert len(set(seq)) == len(seq) and all(a < b for a, b in seq)
    assert ("000", "001") in seq and ("000", "005") in seq and ("000", "016") in seq  # neighbours, 2^k
    assert ("005", "035") in seq and ("000", "039") in seq  # keyframes close loops
    assert len(seq) < len(image_pairs(names, sequential=False)) == 40 * 39 // 2
    for angle in (0.3, 2.0, 3.1):
        axis = np.array([1.0, -2.0, 0.5]) / np.linalg.norm([1.0, -2.0, 0.5])
        q = rotation_to_qvec(_rotation(axis, angle))
        np.testing.assert_allclose(q, np.r_[np.cos(angle / 2), np.sin(angle / 2) * axis], atol=1e-9)


def _rotation(axis, angle):
    k = np.array([[0, -axis[2], axis[1]], [axis[2], 0, -axis[0]], [-axis[1], axis[0], 0]])
    return np.eye(3) + np.sin(angle) * k + (1 - np.cos(angle)) * k @ k


# ---------------------------------------------------------------- video frames


def _video(path, frames, fps=10):
    imageio.mimsave(path, frames, fps=fps, macro_block_size=1)
    return path


def test_video_frames_pick_the_sharpest_and_skip_blur(tmp_path):
    rng = np.random.default_rng(0)
    sharp = rng.integers(0, 256, (48, 64, 3), dtype=np.uint8).repeat(2, 0).repeat(2, 1)  # 96x128 blocks
    blurred = np.asarray(Image.fromarray(sharp).resize((16, 12)).resize((128, 96), Image.BILINEAR))
    # 30 frames, windows of 5: in each the sharp frame is the 3rd; the last window has only blurred frames.
    frames = [sharp if i % 5 == 2 and i < 25 else blurred for i in range(30)]
    video = _video(tmp_path / "v.mp4", frames)
    assert sharpness(sharp) > 5 * sharpness(blurred)
    got = extract_frames(video, tmp_path / "out", every=5, blur_threshold=0.3)
    assert got.video_frames == 30 and got.window == 5
    assert got.indices == [2, 7, 12, 17, 22] and got.blurry == [25]
    assert sorted(p.name for p in (tmp_path / "out").iterdir()) == [f"frame_{i:05d}.jpg" for i in got.indices]
    # A target count sets the window instead; max_size shrinks the frames.
    got = extract_frames(video, tmp_path / "out2", count=10, max_size=64, blur_threshold=0)
    assert got.window == 3 and len(got.names) == 10
    assert Image.open(tmp_path / "out2" / got.names[0]).size == (64, 48)


# ---------------------------------------------------------------- bad input: one clear line each


def _fails(argv, capsys, *expected):
    """The command exits 2 and its one message line (after any progress bars) names the problem."""
    assert main(argv) == 2
    lines = capsys.readouterr().err.strip().splitlines()
    said = [ln for ln in lines if ln.startswith("dfield: ")]
    assert len(said) == 1 and lines[-1] == said[0] and not any("Traceback" in ln for ln in lines), lines
    err = said[0]
    for e in expected:
        assert e in err, err
    return err


def test_empty_folder(tmp_path, capsys):
    (tmp_path / "empty").mkdir()
    _fails(["process-images", str(tmp_path / "empty"), "--out", str(tmp_path / "s")], capsys, "empty", "empty")
    assert not (tmp_path / "s").exists()  # nothing written
    (tmp_path / "notes").mkdir()
    (tmp_path / "notes" / "a.txt").write_text("x")
    _fails(["process-images", str(tmp_path / "notes"), "--out", str(tmp_path / "s")], capsys, "holds no photos")
    _fails(["process-images", str(tmp_path / "missing"), "--out", str(tmp_path / "s")], capsys, "no such")


def test_unreadable_video(tmp_path, capsys):
    (tmp_path / "clip.mp4").write_bytes(b"not a video at all" * 10)
    _fails(["process-images", str(tmp_path / "clip.mp4"), "--out", str(tmp_path / "s")], capsys,
           "clip.mp4", "cannot read video")


def test_too_few_images(tmp_path, capsys):
    (tmp_path / "two").mkdir()
    for i in range(2):
        Image.fromarray(np.full((40, 40, 3), 100, np.uint8)).save(tmp_path / "two" / f"{i}.png")
    _fails(["process-images", str(tmp_path / "two"), "--out", str(tmp_path / "s")], capsys, "at least 3 images, got 2")


def test_sfm_failure_without_matches(tmp_path, capsys):
    # Independent noise: features everywhere, but no two images show the same thing.
    (tmp_path / "noise").mkdir()
    rng = np.random.default_rng(3)
    for i in range(4):
        Image.fromarray(rng.integers(0, 256, (90, 120, 3), dtype=np.uint8)).save(tmp_path / "noise" / f"{i}.png")
    _fails(["process-images", str(tmp_path / "noise"), "--out", str(tmp_path / "s")], capsys,
           "structure from motion failed")


def test_too_few_views_register(textured, tmp_path, capsys):
    # The scene's views and three unrelated noise images: 16 of 19 (84 %) can register, fewer than 90 %.
    _, photos, _ = textured
    mixed = tmp_path / "mixed"
    shutil.copytree(photos, mixed)
    rng = np.random.default_rng(5)
    for i in range(3):
        Image.fromarray(rng.integers(0, 256, (240, 320, 3), dtype=np.uint8)).save(mixed / f"noise_{i}.png")
    _fails(["process-images", str(mixed), "--out", str(tmp_path / "s"), "--min-registered", "0.9"], capsys,
           "registered only", "of 19 images (need 18", "noise_0.png, noise_1.png, noise_2.png")
    s = json.loads((tmp_path / "s" / "sfm.json").read_text())
    assert "registered only" in s["error"] and {"noise_0.png", "noise_1.png", "noise_2.png"} <= set(s["failed"])
    assert s["registered"] >= N_VIEWS - 1


def test_existing_scene_needs_overwrite(processed, tmp_path, capsys):
    scene, _, _, _ = processed
    _fails(["process-images", str(scene.parent / "photos"), "--out", str(scene)], capsys, "--overwrite")


def test_images_of_different_sizes(tmp_path, capsys):
    (tmp_path / "mixed").mkdir()
    for i, size in enumerate([(40, 30), (40, 30), (30, 40)]):
        Image.fromarray(np.full((size[1], size[0], 3), 9, np.uint8)).save(tmp_path / "mixed" / f"{i}.png")
    _fails(["process-images", str(tmp_path / "mixed"), "--out", str(tmp_path / "s")], capsys, "different sizes")


def test_process_images_rejects_bad_options(tmp_path):
    with pytest.raises(ValueError):
        process_images(tmp_path, tmp_path / "s", CaptureOptions(format="ply"))
    with pytest.raises(DataError):
        process_images(tmp_path / "nothing", tmp_path / "s")


def test_video_to_scene(textured, tmp_path):
    # The views as the frames of a video (with a blurred copy after each): the sharp ones are picked, posed, written.
    _, photos, gt = textured
    frames = []
    for i in range(N_VIEWS):
        sharp = Image.open(photos / f"view_{i:02d}.png")
        frames += [np.asarray(sharp), np.asarray(sharp.resize((80, 60)).resize((320, 240), Image.BILINEAR))]
    video = _video(tmp_path / "orbit.mp4", frames, fps=8)
    s = process_images(video, tmp_path / "scene", CaptureOptions(every=2))
    assert s["kind"] == "video" and s["video"]["frames"] == 2 * N_VIEWS
    assert s["registered"] >= N_VIEWS - 1 and s["matching"] == "exhaustive"
    ds = load_dataset(tmp_path / "scene", "all")
    picked = [int(p.stem.split("_")[1]) for p in ds.image_paths]
    assert all(f % 2 == 0 for f in picked)  # never the blurred copy
    e = pose_errors(ds.cameras.c2w.double().numpy(), gt[[f // 2 for f in picked]])
    assert e["rotation_error_deg"].max() < 1.0
