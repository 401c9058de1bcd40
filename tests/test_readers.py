"""Scene readers on tiny synthetic files: shapes, intrinsics, poses, compositing, splits, ground truth."""

import json
import math
import struct

import numpy as np
import pytest
import torch
from conftest import look_at
from PIL import Image

from dfield.data import load_dataset
from dfield.data.blender import estimate_bounds
from dfield.data.colmap import c2w_opengl
from dfield.data.images import read_ids, read_image
from dfield.data.load import detect_format

# ---------------------------------------------------------------- images


def test_rgba_box_downscale_is_premultiplied_then_composited(tmp_path):
    px = np.array([[[255, 0, 0, 255], [0, 255, 0, 0]],  # opaque red, fully transparent green
                   [[0, 0, 255, 128], [255, 255, 255, 255]]], np.uint8)  # half blue, opaque white
    Image.fromarray(np.tile(px, (2, 2, 1)), "RGBA").save(tmp_path / "a.png")
    a = px[..., 3:] / 255.0
    premult, alpha = (px[..., :3] / 255.0 * a).mean((0, 1)), a.mean()
    for bg in [(1.0, 1.0, 1.0), (0.0, 0.0, 0.0)]:
        out = read_image(tmp_path / "a.png", 2, bg)
        assert out.shape == (2, 2, 3) and out.dtype == np.uint8
        expected = np.rint((premult + (1 - alpha) * np.array(bg)) * 255)
        np.testing.assert_allclose(out[0, 0], expected, atol=1)
        assert (out == out[0, 0]).all()
    # The transparent green pixel must not leak into the average (it would with straight alpha).
    assert read_image(tmp_path / "a.png", 2, (0, 0, 0))[0, 0, 1] == round(255 / 4)


def test_full_size_rgba_composites_per_pixel(tmp_path):
    Image.fromarray(np.array([[[200, 100, 0, 0], [200, 100, 0, 255]]], np.uint8), "RGBA").save(tmp_path / "a.png")
    assert read_image(tmp_path / "a.png", 1, (1, 1, 1)).tolist() == [[[255, 255, 255], [200, 100, 0]]]
    assert read_image(tmp_path / "a.png", 1, (0, 0, 0)).tolist() == [[[0, 0, 0], [200, 100, 0]]]


def test_non_integer_downscale(tmp_path):
    Image.fromarray(np.full((6, 9, 3), 77, np.uint8)).save(tmp_path / "c.png")
    out = read_image(tmp_path / "c.png", 1.5)
    assert out.shape == (4, 6, 3) and (out == 77).all()
    ramp = np.repeat(np.arange(0, 240, 40, dtype=np.uint8)[None, :, None], 3, 2).repeat(3, 0)  # (3, 6, 3)
    Image.fromarray(ramp).save(tmp_path / "r.png")
    assert read_image(tmp_path / "r.png", 3)[0, :, 0].tolist() == [40, 160]  # exact block means


def test_read_ids_takes_block_centres_and_keeps_16_bit(tmp_path):
    ids = np.arange(64, dtype=np.uint16).reshape(8, 8) * 500  # up to 31500: needs 16 bits
    Image.fromarray(ids).save(tmp_path / "id.png")
    assert read_ids(tmp_path / "id.png").tolist() == ids.tolist()
    small = read_ids(tmp_path / "id.png", 4)
    assert small.dtype == np.int16 and small.tolist() == ids[2::4, 2::4].tolist()


# ---------------------------------------------------------------- blender

def test_blender_split_files(make_blender):
    root = make_blender(n=3, width=8, height=6)
    ds = load_dataset(root, "train")
    assert ds.format == "blender" and ds.split == "train" and ds.source == str(root)
    assert ds.images.shape == (3, 6, 8, 3) and ds.images.dtype == torch.uint8
    assert (ds.width, ds.height) == (8, 6)
    f = 0.5 * 8 / math.tan(0.45)
    torch.testing.assert_close(ds.cameras.fx, torch.full((3,), f))
    torch.testing.assert_close(ds.cameras.fy, torch.full((3,), f))
    assert ds.cameras.cx.tolist() == [4.0] * 3 and ds.cameras.cy.tolist() == [3.0] * 3
    frame = json.loads((root / "transforms_train.json").read_text())["frames"][1]
    torch.testing.assert_close(ds.cameras.c2w[1], torch.tensor(frame["transform_matrix"][:3], dtype=torch.float32))
    assert [p.name for p in ds.image_paths] == ["r_0.png", "r_1.png", "r_2.png"]
    assert ds.image_paths[0].parent.name == "train"
    assert ds.object_ids is None and ds.object_names == {}
    assert ds.background == (1.0, 1.0, 1.0)
    assert load_dataset(root, "test").image_paths[0].parent.name == "test"
    assert len(load_dataset(root, "all")) == 9


def test_blender_downscale_scales_intrinsics(make_blender):
    root = make_blender(n=3, width=8, height=4, splits=("train",))
    full, half = load_dataset(root), load_dataset(root, downscale=2)
    assert half.images.shape == (3, 2, 4, 3)
    torch.testing.assert_close(half.cameras.fx, full.cameras.fx / 2)
    assert half.cameras.cx.tolist() == [2.0] * 3 and half.cameras.cy.tolist() == [1.0] * 3


def test_blender_val_falls_back_to_test(make_blender):
    root = make_blender(splits=("train", "test"))
    assert load_dataset(root, "val").image_paths[0].parent.name == "test"


def test_blender_single_file_holdout_and_nerfstudio_intrinsics(make_blender):
    root = make_blender(n=10, width=8, height=6, splits=None, fl_x=20.0, fl_y=22.0, cx=4.5, cy=2.5, w=16, h=12,
                        camera_model="OPENCV", k1=0.0)
    meta = json.loads((root / "transforms.json").read_text())
    del meta["camera_angle_x"]
    meta["frames"][3]["fl_x"] = 30.0  # per-frame intrinsics win over the top-level ones
    (root / "transforms.json").write_text(json.dumps(meta))
    train = load_dataset(root, "train", holdout_every=4)
    test = load_dataset(root, "test", holdout_every=4)
    everything = load_dataset(root, "all", holdout_every=4)
    assert [p.stem for p in test.image_paths] == ["r_0", "r_4", "r_8"]
    assert [p.stem for p in train.image_paths] == ["r_1", "r_2", "r_3", "r_5", "r_6", "r_7", "r_9"]
    assert len(everything) == 10
    # w/h = 16x12 while the images are 8x6: intrinsics halve with the image.
    assert train.cameras.fx.tolist() == [10.0, 10.0, 15.0, 10.0, 10.0, 10.0, 10.0]
    assert (train.cameras.fy[0].item(), train.cameras.cx[0].item(), train.cameras.cy[0].item()) == (11.0, 2.25, 1.25)


def test_blender_json_bounds_and_object_ids(make_blender):
    root = make_blender(n=2, width=8, height=8, splits=("train",), aabb=[[-1, -2, -3], [1, 2, 3]], near=0.5, far=7)
    meta = json.loads((root / "transforms_train.json").read_text())
    ids = np.zeros((8, 8), np.uint8)
    ids[:, 4:] = 2
    ids[6, 2] = 1
    for i, fr in enumerate(meta["frames"]):
        Image.fromarray(ids).save(root / "train" / f"id_{i}.png")
        fr["id_path"] = f"./train/id_{i}.png"
    (root / "transforms_train.json").write_text(json.dumps(meta))
    (root / "objects.json").write_text(json.dumps({"objects": [{"id": 1, "name": "red sphere"},
                                                               {"id": 2, "name": "ground", "shape": "disk"}]}))
    ds = load_dataset(root)
    assert ds.aabb.tolist() == [[-1, -2, -3], [1, 2, 3]] and (ds.near, ds.far) == (0.5, 7.0)
    assert ds.object_ids.shape == (2, 8, 8) and ds.object_ids.dtype == torch.int16
    assert ds.object_ids[0].tolist() == ids.tolist()
    assert ds.object_names == {1: "red sphere", 2: "ground"}
    small = load_dataset(root, downscale=4)
    assert small.object_ids.shape == (2, 2, 2) and small.object_ids[0].tolist() == [[0, 2], [1, 2]]
    assert len(small.subset([1]).object_ids) == 1


def test_estimated_bounds_match_the_lego_protocol():
    # Lego-like: cameras on a sphere of radius 4.03 around the origin, looking at it.
    rng = np.random.default_rng(0)
    dirs = rng.normal(size=(50, 3))
    dirs[:, 2] = np.abs(dirs[:, 2])
    eyes = 4.03 * dirs / np.linalg.norm(dirs, axis=1, keepdims=True)
    aabb, near, far = estimate_bounds(np.stack([look_at(e)[:3] for e in eyes]))
    np.testing.assert_allclose(aabb, [[-1.51] * 3, [1.51] * 3], atol=0.01)
    assert abs(near - 2.0) < 0.05 and abs(far - 6.0) < 0.1
    # Off-centre rigs keep their box on the point the cameras look at.
    target = np.array([5.0, -3.0, 2.0])
    aabb, _, _ = estimate_bounds(np.stack([look_at(e + target, target)[:3] for e in eyes]))
    np.testing.assert_allclose(aabb.mean(0), target, atol=1e-6)


# ---------------------------------------------------------------- llff

def _nerf_reference(poses_bounds: np.ndarray):
    """The original NeRF load_llff_data pose path (bd_factor 0.75, recenter), written out independently."""
    poses = poses_bounds[:, :15].reshape(-1, 3, 5)
    bds = poses_bounds[:, 15:]
    poses = np.concatenate([poses[:, :, 1:2], -poses[:, :, 0:1], poses[:, :, 2:]], -1)
    sc = 1.0 / (bds.min() * 0.75)
    poses[:, :3, 3] *= sc
    center = poses[:, :3, 3].mean(0)
    z = poses[:, :3, 2].sum(0)
    z /= np.linalg.norm(z)
    x = np.cross(poses[:, :3, 1].sum(0), z)
    x /= np.linalg.norm(x)
    avg = np.eye(4)
    avg[:3, :4] = np.stack([x, np.cross(z, x), z, center], 1)
    bottom = np.tile([[[0, 0, 0, 1.0]]], (len(poses), 1, 1))
    return (np.linalg.inv(avg) @ np.concatenate([poses[:, :3, :4], bottom], 1))[:, :3]


def test_llff_known_pose_axes_and_ndc(make_llff):
    root = make_llff(n=9)
    ds = load_dataset(root, "all", downscale=4)
    assert ds.format == "llff" and ds.ndc and (ds.near, ds.far) == (0.0, 1.0)
    assert ds.images.shape == (9, 6, 8, 3)
    # LLFF [down, right, back] = [-y, +x, +z] is the identity in OpenGL axes, and stays so after recentring.
    torch.testing.assert_close(ds.cameras.c2w[:, :, :3], torch.eye(3).expand(9, 3, 3))
    sc = 1 / (2.0 * 0.75)
    expected = torch.tensor([[(i % 3 - 1.0) * sc, (i // 3 - 1.0) * sc, 0.0] for i in range(9)])
    torch.testing.assert_close(ds.cameras.c2w[:, :, 3], expected)
    assert ds.cameras.fx.tolist() == [10.0] * 9 and ds.cameras.cx[0].item() == 4.0  # focal 40 at 32 px -> 10 at 8
    assert ds.ndc_focal == 10.0 and ds.ndc_size == (8, 6)
    torch.testing.assert_close(ds.aabb, torch.tensor([[-1.5, -1.67, -1], [1.5, 1.67, 1]]))


def test_llff_matches_the_nerf_loader_on_rotated_poses(make_llff):
    root = make_llff(n=5)
    arr = np.load(root / "poses_bounds.npy")
    rng = np.random.default_rng(3)
    for row in arr:
        q, _ = np.linalg.qr(np.eye(3) + 0.3 * rng.normal(size=(3, 3)))
        pose = row[:15].reshape(3, 5)
        pose[:, :3] = q
        pose[:, 3] = rng.normal(size=3)
        row[:15] = pose.ravel()
        row[15:] = rng.uniform(1, 20, 2)
    np.save(root / "poses_bounds.npy", arr)
    ds = load_dataset(root, "all", downscale=4, llff_mode="ndc")  # random views: auto would not call them forward
    np.testing.assert_allclose(ds.cameras.c2w.numpy(), _nerf_reference(arr.copy()), atol=1e-5)


def test_llff_splits_folders_and_world_box(make_llff):
    root = make_llff(n=10)
    train, test = load_dataset(root, "train", 4), load_dataset(root, "test", 4)
    assert [p.name for p in test.image_paths] == ["im000.png", "im008.png"] and len(train) == 8
    # No images_8/: images_4/ is reduced twice more, and the focal follows the actual width.
    small = load_dataset(root, "train", 8)
    assert small.images.shape == (8, 3, 4, 3) and small.cameras.fx[0].item() == 5.0 and small.ndc_size == (4, 3)
    c = load_dataset(root, "train", 4, scene_type="object")  # world space in a box (llff-mode contract: unbounded)
    assert not c.ndc and c.aabb.tolist() == [[-2] * 3, [2] * 3]
    assert c.near == pytest.approx(0.9 * 2 / 1.5) and c.far == pytest.approx(1.1 * 10 / 1.5)


def test_llff_picks_the_matching_folder(make_llff):
    root = make_llff(n=3, folder="images_4")
    make_llff(n=3, folder="images", width=32, height=24)  # same scene, adds the full-size images/
    assert load_dataset(root, "all", 4).image_paths[0].parent.name == "images_4"
    full = load_dataset(root, "all", 1)
    assert full.image_paths[0].parent.name == "images" and full.cameras.fx[0].item() == 40.0
    assert load_dataset(root, "all", 2).images.shape[1:3] == (12, 16)


# ---------------------------------------------------------------- colmap

def _qvec(axis, angle):
    axis = np.asarray(axis, float) / np.linalg.norm(axis)
    return np.r_[math.cos(angle / 2), math.sin(angle / 2) * axis]


def _colmap_model(n=9):
    cams = {1: ("PINHOLE", 16, 12, [20.0, 22.0, 8.5, 6.5]), 2: ("SIMPLE_RADIAL", 16, 12, [18.0, 8.0, 6.0, 0.01])}
    rng = np.random.default_rng(2)
    images = {}
    for i in range(n):
        q = _qvec(rng.normal(size=3), rng.uniform(0, 0.5)) if i else _qvec((0, 0, 1), math.pi / 2)
        images[i + 1] = (q, np.array([0.1 * i, -0.2, 3.0]), 1 + i % 2, f"img{n - i:02d}.png",
                         [(1.5, 2.5, pid) for pid in range(1, 40, 3)] + [(0.0, 0.0, -1)])
    points = {pid: rng.uniform(-1, 1, 3) * [2, 1, 0.5] + [1, 0, 0] for pid in range(1, 41)}
    return cams, images, points


def _fmt(values):
    return " ".join(f"{float(v):.17g}" for v in values)


def _write_text(folder, cams, images, points):
    folder.mkdir(parents=True)
    (folder / "cameras.txt").write_text("# Camera list\n" + "".join(
        f"{cid} {m} {w} {h} {_fmt(p)}\n" for cid, (m, w, h, p) in cams.items()))
    lines = ["# Image list", "#   IMAGE_ID, QW, QX, QY, QZ, TX, TY, TZ, CAMERA_ID, NAME"]
    for iid, (q, t, cid, name, obs) in images.items():
        lines.append(f"{iid} {_fmt(q)} {_fmt(t)} {cid} {name}")
        lines.append(" ".join(f"{x} {y} {pid}" for x, y, pid in obs) if iid % 3 else "")  # some with none
    (folder / "images.txt").write_text("\n".join(lines) + "\n")
    (folder / "points3D.txt").write_text("".join(
        f"{pid} {_fmt(xyz)} 10 20 30 0.5 1 0 2 1\n" for pid, xyz in points.items()))


def _write_binary(folder, cams, images, points):
    model_ids = {"SIMPLE_PINHOLE": 0, "PINHOLE": 1, "SIMPLE_RADIAL": 2}
    folder.mkdir(parents=True)
    b = struct.pack("<Q", len(cams))
    for cid, (m, w, h, p) in cams.items():
        b += struct.pack("<iiQQ", cid, model_ids[m], w, h) + struct.pack(f"<{len(p)}d", *p)
    (folder / "cameras.bin").write_bytes(b)
    b = struct.pack("<Q", len(images))
    for iid, (q, t, cid, name, obs) in images.items():
        obs = obs if iid % 3 else []
        b += struct.pack("<i7di", iid, *q, *t, cid) + name.encode() + b"\0" + struct.pack("<Q", len(obs))
        b += b"".join(struct.pack("<ddq", x, y, pid) for x, y, pid in obs)
    (folder / "images.bin").write_bytes(b)
    b = struct.pack("<Q", len(points))
    for pid, xyz in points.items():
        b += struct.pack("<Q3d3Bd", pid, *xyz, 10, 20, 30, 0.5) + struct.pack("<Q", 2) + struct.pack("<4i", 1, 0, 2, 1)
    (folder / "points3D.bin").write_bytes(b)


def _colmap_scene(root, writer, n=9):
    cams, images, points = _colmap_model(n)
    writer(root / "sparse" / "0", cams, images, points)
    (root / "images").mkdir()
    rng = np.random.default_rng(4)
    for _, _, _, name, _ in images.values():
        Image.fromarray(rng.integers(0, 256, (12, 16, 3), dtype=np.uint8)).save(root / "images" / name)
    return root


def test_colmap_text_and_binary_agree(tmp_path):
    text = _colmap_scene(tmp_path / "text", _write_text)
    binary = _colmap_scene(tmp_path / "bin", _write_binary)
    assert detect_format(text) == detect_format(binary) == "colmap"
    a, b = load_dataset(text, "all"), load_dataset(binary, "all")
    assert a.format == "colmap" and a.images.shape == (9, 12, 16, 3)
    torch.testing.assert_close(a.cameras.c2w, b.cameras.c2w)
    for k in ("fx", "fy", "cx", "cy"):
        torch.testing.assert_close(getattr(a.cameras, k), getattr(b.cameras, k))
    torch.testing.assert_close(a.aabb, b.aabb)
    assert (a.near, a.far) == pytest.approx((b.near, b.far))
    assert torch.equal(a.images, b.images)


def test_colmap_poses_intrinsics_normalisation_and_splits(tmp_path):
    root = _colmap_scene(tmp_path / "s", _write_text)
    cams, images, points = _colmap_model()
    # The reader's normalisation, as an object scene (these cameras look one way: auto would model them in NDC).
    ds = load_dataset(root, "all", scene_type="object")
    test, train = load_dataset(root, "test", scene_type="object"), load_dataset(root, "train", scene_type="object")
    names = sorted(im[3] for im in images.values())
    assert [p.name for p in ds.image_paths] == names
    assert [p.name for p in test.image_paths] == [names[0], names[8]] and len(train) == 7
    xyz = np.stack(list(points.values()))
    lo, hi = np.percentile(xyz, 1, 0), np.percentile(xyz, 99, 0)
    centre, scale = (lo + hi) / 2, 2 / (hi - lo).max()
    np.testing.assert_allclose(ds.aabb.numpy(), np.stack([lo - centre, hi - centre]) * scale, atol=1e-6)
    assert ds.aabb.abs().max().item() == pytest.approx(1.0)
    assert 0 < ds.near < ds.far
    # Image id 1 (img09.png) has qvec = 90 degrees about z and tvec (0, -0.2, 3).
    q, t, *_ = images[1]
    pose = ds.cameras.c2w[names.index("img09.png")].double().numpy()
    r = np.array([[0, -1, 0], [1, 0, 0], [0, 0, 1.0]])  # world-to-camera rotation of that qvec
    np.testing.assert_allclose(pose[:, :3], r.T @ np.diag([1, -1, -1]), atol=1e-6)
    np.testing.assert_allclose(pose[:, 3], (-r.T @ t - centre) * scale, atol=1e-5)
    # PINHOLE on odd image ids, SIMPLE_RADIAL on even; img09 is image id 1 -> PINHOLE.
    i = names.index("img09.png")
    assert [ds.cameras.fx[i].item(), ds.cameras.fy[i].item(), ds.cameras.cx[i].item()] == [20.0, 22.0, 8.5]
    j = names.index("img08.png")  # SIMPLE_RADIAL, k = 0.01: undistorted on load, focal zoomed a little
    assert ds.cameras.fx[j].item() == ds.cameras.fy[j].item() == pytest.approx(18.0, rel=0.02)
    assert ds.cameras.fx[j].item() != 18.0 and ds.cameras.cy[j].item() == 6.0


def test_colmap_c2w_looks_down_minus_z():
    # A camera at the origin with the identity rotation looks down +z in OpenCV, so -z in OpenGL points to +z.
    c2w = c2w_opengl(np.array([1.0, 0, 0, 0]), np.zeros(3))
    np.testing.assert_allclose(-c2w[:, 2], [0, 0, 1])
    np.testing.assert_allclose(c2w[:, 1], [0, -1, 0])  # OpenCV y is down


def test_colmap_downscaled_folder(tmp_path):
    root = _colmap_scene(tmp_path / "s", _write_binary)
    (root / "images_2").mkdir()
    for p in (root / "images").iterdir():
        Image.open(p).resize((8, 6)).save(root / "images_2" / p.name)
    ds = load_dataset(root, "all", 2)
    assert ds.image_paths[0].parent.name == "images_2" and ds.images.shape[1:3] == (6, 8)
    i = [p.name for p in ds.image_paths].index("img09.png")  # PINHOLE fx 20 at 16 px wide
    assert (ds.cameras.fx[i].item(), ds.cameras.cx[i].item()) == (10.0, 4.25)


# ---------------------------------------------------------------- detect_format / options

def test_detect_format(tmp_path, make_blender, make_llff):
    assert detect_format(make_blender(splits=None)) == "blender"
    assert detect_format(make_blender(name="b2")) == "blender"
    llff = make_llff()
    assert detect_format(llff) == "llff"
    _write_text(llff / "sparse" / "0", *_colmap_model(2))  # LLFF scenes often ship their COLMAP model too
    assert detect_format(llff) == "llff"
    assert load_dataset(llff / "poses_bounds.npy", downscale=4).format == "llff"


def test_options_are_checked(make_blender):
    root = make_blender(n=3, splits=("train",))
    for kwargs in [dict(split="everything"), dict(downscale=0.5), dict(background="random"),
                   dict(llff_mode="sphere"), dict(holdout_every=0), dict(format="nerf")]:
        with pytest.raises(ValueError):
            load_dataset(root, **kwargs)
    assert load_dataset(root, background="black").background == (0.0, 0.0, 0.0)
