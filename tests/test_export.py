
import numpy as np
import pytest
import torch
from PIL import Image

from dfield.core.camera_paths import estimate_up, look_at_centre, orbit_path, spiral_path
from dfield.data.dataset import Cameras
from dfield.io.export import colorize_depth, save_mesh_ply, save_ply, save_png, save_video, to_uint8


def test_to_uint8_and_png_roundtrip(tmp_path):
    img = torch.rand(7, 5, 3)
    u8 = to_uint8(img)
    assert u8.dtype == np.uint8 and u8.shape == (7, 5, 3)
    assert np.abs(u8 / 255.0 - img.numpy()).max() <= 0.5 / 255 + 1e-6
    assert to_uint8(np.array([[-1.0, 2.0]])).tolist() == [[0, 255]]
    assert to_uint8(np.zeros((2, 2))).shape == (2, 2)

    path = tmp_path / "sub" / "a.png"
    save_png(path, img)
    assert np.array_equal(np.asarray(Image.open(path)), u8)
    save_png(path, u8[..., 0])  # grey, overwrite in place
    assert np.array_equal(np.asarray(Image.open(path)), u8[..., 0])
    assert sorted(p.name for p in path.parent.iterdir()) == ["a.png"]  # no temp files left behind


@pytest.mark.parametrize("name", ["v.mp4", "v.gif"])
def test_save_video_odd_size(tmp_path, name):
    import imageio.v2 as imageio

    frames = [np.full((33, 47, 3), i / 5, dtype=np.float32) for i in range(6)]
    path = save_video(tmp_path / name, frames, fps=10)
    assert path.stat().st_size > 0
    read = imageio.mimread(path, memtest=False)
    assert len(read) == 6
    h, w = read[0].shape[:2]
    assert (h, w) == ((34, 48) if name.endswith(".mp4") else (33, 47))
    assert abs(float(read[3][..., :3].mean()) - 0.6 * 255) < 6


def test_colorize_depth():
    depth = np.tile(np.linspace(1.0, 3.0, 16), (4, 1))
    acc = np.ones_like(depth)
    acc[0] = 0.0
    rgb = colorize_depth(depth, acc)
    assert rgb.shape == (4, 16, 3) and rgb.dtype == np.float32
    assert rgb.min() >= 0 and rgb.max() <= 1
    assert np.allclose(rgb[0], 1.0)  # transparent -> white
    assert rgb[1, 3, 2] > rgb[1, 3, 0] and rgb[1, -1, 0] > rgb[1, -1, 2]  # near blue, far red
    assert not np.allclose(rgb[1, 0], rgb[1, -1])
    depth[2, 3] = np.nan  # invalid depths must not poison the range
    assert np.isfinite(colorize_depth(torch.from_numpy(depth), None, near=1, far=3)).all()


def _read_ply(path):
    data = path.read_bytes()
    end = data.index(b"end_header\n") + len(b"end_header\n")
    header = data[:end].decode("ascii").splitlines()
    return header, data[end:]


def test_ply_points_roundtrip(tmp_path):
    pts = np.random.default_rng(0).normal(size=(10, 3)).astype(np.float32)
    cols = np.random.default_rng(1).integers(0, 256, size=(10, 3)).astype(np.uint8)
    save_ply(tmp_path / "p.ply", torch.from_numpy(pts), cols)
    header, body = _read_ply(tmp_path / "p.ply")
    assert header[:3] == ["ply", "format binary_little_endian 1.0", "element vertex 10"]
    assert header[3:9] == [f"property float {c}" for c in "xyz"] + [f"property uchar {c}" for c in ("red", "green", "blue")]
    v = np.frombuffer(body, dtype=[("p", "<f4", (3,)), ("c", "u1", (3,))])
    assert np.array_equal(v["p"], pts) and np.array_equal(v["c"], cols)

    save_ply(tmp_path / "q.ply", pts, cols / 255.0)  # float colours
    _, body = _read_ply(tmp_path / "q.ply")
    assert np.array_equal(np.frombuffer(body, dtype=[("p", "<f4", (3,)), ("c", "u1", (3,))])["c"], cols)

    save_ply(tmp_path / "r.ply", pts)
    header, body = _read_ply(tmp_path / "r.ply")
    assert not any("uchar" in h for h in header) and len(body) == 10 * 12


def test_mesh_ply_roundtrip(tmp_path):
    verts = np.array([[0, 0, 0], [1, 0, 0], [0, 1, 0], [0, 0, 1]], dtype=np.float32)
    faces = np.array([[0, 1, 2], [0, 1, 3], [0, 2, 3], [1, 2, 3]])
    save_mesh_ply(tmp_path / "m.ply", verts, faces)
    header, body = _read_ply(tmp_path / "m.ply")
    assert "element face 4" in header and "property list uchar int vertex_indices" in header
    v = np.frombuffer(body[: 4 * 12], dtype="<f4").reshape(4, 3)
    f = np.frombuffer(body[4 * 12 :], dtype=[("n", "u1"), ("i", "<i4", (3,))])
    assert np.array_equal(v, verts) and (f["n"] == 3).all() and np.array_equal(f["i"], faces)


# ------------------------------------------------------------------------------------ camera paths


def _look_at(eye, target, up):
    f = (target - eye) / np.linalg.norm(target - eye)
    r = np.cross(f, up)
    r /= np.linalg.norm(r)
    return np.stack([r, np.cross(-f, r), -f, eye], 1)


def _cams(c2w):
    n = len(c2w)
    c2w = torch.tensor(np.stack(c2w), dtype=torch.float32)
    ones = torch.ones(n)
    return Cameras(c2w=c2w, fx=ones * 50, fy=ones * 51, cx=ones * 20, cy=ones * 15, width=40, height=30)


def _blender_like(centre=np.array([0.3, -0.2, 0.5])):
    # cameras on a sphere around `centre`, all above it, world z up, like Blender synthetic scenes
    rng = np.random.default_rng(0)
    c2w = []
    for az, el in zip(rng.uniform(0, 2 * np.pi, 20), rng.uniform(0.2, 1.0, 20)):
        eye = centre + 4.0 * np.array([np.cos(el) * np.cos(az), np.cos(el) * np.sin(az), np.sin(el)])
        c2w.append(_look_at(eye, centre, np.array([0.0, 0.0, 1.0])))
    return _cams(c2w), centre


def _check_rotations(c2w):
    r = c2w[:, :, :3].double()
    assert torch.allclose(r.transpose(1, 2) @ r, torch.eye(3, dtype=torch.float64).expand_as(r), atol=1e-5)
    assert torch.allclose(torch.linalg.det(r), torch.ones(len(r), dtype=torch.float64), atol=1e-5)


def test_orbit_path_looks_at_centre():
    cams, centre = _blender_like()
    assert np.allclose(look_at_centre(cams).numpy(), centre, atol=1e-4)
    path = orbit_path(cams, n_frames=24)
    assert len(path) == 24 and (path.width, path.height) == (40, 30)
    assert torch.all(path.fx == 50) and torch.all(path.cy == 15)
    c2w = path.c2w.double()
    _check_rotations(c2w)
    c = torch.tensor(centre)
    to_centre = c - c2w[:, :, 3]
    dist = to_centre.norm(dim=-1)
    assert torch.allclose(dist, torch.full_like(dist, 4.0), atol=1e-4)
    assert torch.allclose((-c2w[:, :, 2] * to_centre).sum(-1) / dist, torch.ones(24, dtype=torch.float64), atol=1e-5)
    # elevation is the cameras' mean, around world up; camera "up" stays on the upper side
    z = c2w[:, 2, 3] - centre[2]
    assert torch.allclose(z, z[0].expand(24), atol=1e-4) and z[0] > 0
    assert (c2w[:, 2, 1] > 0).all()
    # an explicit elevation of 0 puts the orbit in the horizontal plane through the centre
    flat = orbit_path(cams, n_frames=8, elevation=0.0).c2w
    assert torch.allclose(flat[:, 2, 3], torch.full((8,), centre[2], dtype=torch.float32), atol=1e-4)


def test_spiral_path_forward_facing():
    # LLFF-like: cameras on a small grid, all looking down -z at a scene ~5 units away
    c2w = [np.concatenate([np.eye(3), [[x], [y], [0.0]]], 1) for x in (-0.2, 0.0, 0.2) for y in (-0.1, 0.1)]
    cams = _cams(c2w)
    assert torch.allclose(estimate_up(cams), torch.tensor([0.0, 1.0, 0.0], dtype=torch.float64))
    path = spiral_path(cams, n_frames=30, near=2.0, far=10.0)
    assert len(path) == 30
    c2w = path.c2w.double()
    _check_rotations(c2w)
    assert (c2w[:, 2, 2] > 0.95).all()  # still facing roughly down -z
    assert c2w[:, 0, 3].abs().max() <= 0.2 + 1e-5 and c2w[:, 1, 3].abs().max() <= 0.1 + 1e-5
    # all views aim at one focus point on the mean axis: NeRF's blend of the bounds
    focus = 1.0 / (0.25 / 1.8 + 0.75 / 50.0)
    target = torch.tensor([0.0, 0.0, -focus], dtype=torch.float64)
    to_t = target - c2w[:, :, 3]
    cos = (-c2w[:, :, 2] * to_t).sum(-1) / to_t.norm(dim=-1)
    assert torch.allclose(cos, torch.ones(30, dtype=torch.float64), atol=1e-6)
    # without bounds it still produces a valid path
    _check_rotations(spiral_path(cams, n_frames=5).c2w.double())
    _check_rotations(spiral_path(cams, n_frames=5, near=0.0, far=1.0).c2w.double())  # NDC bounds ignored
