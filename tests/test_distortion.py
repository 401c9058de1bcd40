"""Camera models with lens distortion: hand-computed projections for each COLMAP model, the inverse, the choice of
the undistorted pinhole camera, images undistorted by remapping, and the COLMAP reader undistorting on load."""

import json
import math

import numpy as np
import pytest
import torch
from PIL import Image
from test_readers import _colmap_model, _write_text

from dfield.data import load_dataset
from dfield.data.distortion import (
    distort,
    lens_camera,
    undistort_image,
    undistort_points,
    undistorted_intrinsics,
    undistortion_grid,
)
from dfield.data.images import read_image
from dfield.errors import DataError

# (model, params, the normalised point (x, y), its pixel worked out by hand from COLMAP's equations)
HAND_MADE = [
    # f=100, c=(32, 24): pixel = f x + c
    ("SIMPLE_PINHOLE", [100.0, 32.0, 24.0], (0.2, 0.1), (52.0, 34.0)),
    ("PINHOLE", [100.0, 120.0, 32.0, 24.0], (0.2, 0.1), (52.0, 36.0)),
    # r2 = 0.05, k = 0.1: factor 1 + 0.005 -> (0.201, 0.1005)
    ("SIMPLE_RADIAL", [100.0, 32.0, 24.0, 0.1], (0.2, 0.1), (52.1, 34.05)),
    # k1 = -0.2, k2 = 0.4: factor 1 - 0.01 + 0.001 = 0.991 -> (0.1982, 0.0991)
    ("RADIAL", [100.0, 32.0, 24.0, -0.2, 0.4], (0.2, 0.1), (51.82, 33.91)),
    # k1 = 0.1, k2 = 0, p1 = 0.01, p2 = -0.02, fx = 100, fy = 120, r2 = 0.05, xy = 0.02:
    # x_d = 0.2 * 1.005 + 2 * 0.01 * 0.02 - 0.02 * (0.05 + 0.08) = 0.201 + 0.0004 - 0.0026 = 0.1988
    # y_d = 0.1 * 1.005 + 2 * -0.02 * 0.02 + 0.01 * (0.05 + 0.02) = 0.1005 - 0.0008 + 0.0007 = 0.1004
    ("OPENCV", [100.0, 120.0, 32.0, 24.0, 0.1, 0.0, 0.01, -0.02], (0.2, 0.1), (51.88, 36.048)),
    # FULL_OPENCV, k3 = 2 (r2^3 = 1.25e-4) and k4 = 1 below: radial = (1 + 0.005 + 0.00025) / (1 + 0.05) = 0.95738...
    ("FULL_OPENCV", [100.0, 100.0, 32.0, 24.0, 0.1, 0, 0, 0, 2.0, 1.0, 0, 0], (0.2, 0.1),
     (32 + 20 * 1.00525 / 1.05, 24 + 10 * 1.00525 / 1.05)),
]


@pytest.mark.parametrize("model, params, point, pixel", HAND_MADE, ids=[m[0] for m in HAND_MADE])
def test_projection_of_each_model_matches_hand_computation(model, params, point, pixel):
    cam = lens_camera(model, params, 64, 48)
    xd, yd = distort(np.array([point[0]]), np.array([point[1]]), cam.coeffs)
    assert (cam.fx * xd[0] + cam.cx, cam.fy * yd[0] + cam.cy) == pytest.approx(pixel, abs=1e-9)
    # and back: the inverse lands on the same normalised point
    x, y = undistort_points(xd, yd, cam.coeffs)
    assert (x[0], y[0]) == pytest.approx(point, abs=1e-10)


def test_inverse_over_the_whole_image():
    cam = lens_camera("OPENCV", [50.0, 52.0, 33.0, 23.0, -0.25, 0.08, 0.002, -0.001], 64, 48)
    u, v = np.meshgrid(np.arange(64) + 0.5, np.arange(48) + 0.5)
    xd, yd = (u - cam.cx) / cam.fx, (v - cam.cy) / cam.fy
    x, y = undistort_points(xd, yd, cam.coeffs)
    rx, ry = distort(x, y, cam.coeffs)
    assert np.abs(rx - xd).max() < 1e-10 and np.abs(ry - yd).max() < 1e-10


@pytest.mark.parametrize("k1", [-0.3, -0.05, 0.05, 0.3])
def test_undistorted_camera_has_no_blank_pixels_and_is_tight(k1):
    cam = lens_camera("SIMPLE_RADIAL", [60.0, 32.0, 24.0, k1], 64, 48)
    fx, fy, cx, cy = undistorted_intrinsics(cam)
    assert (cx, cy) == (32.0, 24.0) and fx == pytest.approx(fy)
    grid = undistortion_grid(cam, (fx, fy, cx, cy))
    assert grid[..., 0].min() >= 0.5 - 1e-3 and grid[..., 0].max() <= 63.5 + 1e-3  # sampled per border pixel
    assert grid[..., 1].min() >= 0.5 - 1e-3 and grid[..., 1].max() <= 47.5 + 1e-3
    # Tight: some output pixel reaches the photo's border (within a hundredth of a pixel).
    gap = min(grid[..., 0].min() - 0.5, 63.5 - grid[..., 0].max(), grid[..., 1].min() - 0.5, 47.5 - grid[..., 1].max())
    assert gap < 0.01
    # Barrel distortion (k1 < 0) squeezes the edges: undoing it needs a wider view, so a shorter focal length.
    assert (fx < 60) == (k1 < 0)


def test_centred_principal_point():
    cam = lens_camera("PINHOLE", [50.0, 50.0, 30.0, 25.0], 64, 48)
    assert undistorted_intrinsics(cam) == (50.0, 50.0, 30.0, 25.0)
    fx, fy, cx, cy = undistorted_intrinsics(cam, centre=True)
    assert (cx, cy) == (32.0, 24.0) and fx == fy > 50  # zoomed in so the shifted view stays inside the photo
    grid = undistortion_grid(cam, (fx, fy, cx, cy))
    assert grid[..., 0].min() >= 0.5 - 1e-9 and grid[..., 0].max() <= 63.5 + 1e-9


def _pattern(x, y):
    """A smooth test scene on the plane z = 1, as a function of normalised coordinates."""
    return 127.5 + 100 * np.sin(9 * x + 2) * np.cos(7 * y - 1)


@pytest.mark.parametrize("model, params", [(m, p) for m, p, _, _ in HAND_MADE], ids=[m[0] for m in HAND_MADE])
def test_undistorted_image_shows_the_scene_as_a_pinhole_camera_would(model, params):
    # The photo: each pixel sees the scene at the undistorted normalised point its distorted ray comes from.
    w, h = 128, 96
    cam = lens_camera(model, params, 64, 48).scaled(w, h)
    u, v = np.meshgrid(np.arange(w) + 0.5, np.arange(h) + 0.5)
    x, y = undistort_points((u - cam.cx) / cam.fx, (v - cam.cy) / cam.fy, cam.coeffs)
    photo = np.repeat(np.round(_pattern(x, y))[..., None], 3, -1).astype(np.uint8)
    out, (fx, fy, cx, cy) = undistort_image(photo, cam)
    assert out.shape == photo.shape and out.dtype == np.uint8
    # A pinhole camera with the returned intrinsics sees the pattern directly.
    expected = _pattern((u - cx) / fx, (v - cy) / fy)
    err = np.abs(out[..., 0].astype(float) - expected)
    assert err.mean() < 1.5 and np.percentile(err, 99) < 6  # bilinear resampling of a smooth pattern
    if model in ("SIMPLE_PINHOLE", "PINHOLE"):
        assert out is photo  # nothing to undo: not even resampled


def test_unsupported_and_bad_cameras():
    with pytest.raises(DataError, match="OPENCV_FISHEYE"):
        lens_camera("OPENCV_FISHEYE", [1, 1, 1, 1, 0, 0, 0, 0], 4, 4)
    with pytest.raises(DataError, match="takes 4 parameters"):
        lens_camera("SIMPLE_RADIAL", [1, 1, 1], 4, 4)
    with pytest.raises(DataError, match="bad parameters"):
        lens_camera("PINHOLE", [-1, 1, 1, 1], 4, 4)
    # So strong that the model folds over inside the image: no pinhole view of it exists.
    with pytest.raises(DataError, match="distortion"):
        undistorted_intrinsics(lens_camera("SIMPLE_RADIAL", [10.0, 32.0, 24.0, -0.5], 64, 48))


def test_colmap_reader_undistorts_each_image_with_its_own_camera(tmp_path):
    cams, images, points = _colmap_model(4)
    cams = {1: ("PINHOLE", 64, 48, [60.0, 62.0, 32.5, 23.5]),
            2: ("OPENCV", 64, 48, [55.0, 56.0, 31.0, 25.0, -0.2, 0.05, 0.001, 0.002])}
    _write_text(tmp_path / "s" / "sparse" / "0", cams, images, points)
    (tmp_path / "s" / "images").mkdir()
    rng = np.random.default_rng(0)
    photos = {}
    for _, _, cid, name, _ in images.values():
        photos[name] = rng.integers(0, 256, (48, 64, 3), dtype=np.uint8)
        Image.fromarray(photos[name]).save(tmp_path / "s" / "images" / name)
    ds = load_dataset(tmp_path / "s", "all")
    for i, path in enumerate(ds.image_paths):
        cid = next(c for _, _, c, n, _ in images.values() if n == path.name)
        model, w, h, params = cams[cid]
        expected, k = undistort_image(photos[path.name], lens_camera(model, params, w, h))
        assert torch.equal(ds.images[i], torch.from_numpy(expected))
        got = [getattr(ds.cameras, a)[i].item() for a in ("fx", "fy", "cx", "cy")]
        assert got == pytest.approx(k, rel=1e-6)
        if cid == 1:
            assert got == pytest.approx(params, rel=1e-6)  # PINHOLE: as it was
        else:
            assert got[2:] == pytest.approx([31.0, 25.0]) and got[0] / got[1] == pytest.approx(55 / 56)
    # Downscaled on load: the same camera at half the size, still undistorted (the zoom, fitted to the border's
    # pixel centres, differs by a fraction of a pixel between the two sizes).
    half = load_dataset(tmp_path / "s", "all", downscale=2)
    j = next(i for i, p in enumerate(ds.image_paths) if p.name == half.image_paths[0].name)
    assert half.cameras.fx[0].item() == pytest.approx(ds.cameras.fx[j].item() / 2, rel=5e-3)
    assert math.isclose(half.cameras.cx[0].item(), ds.cameras.cx[j].item() / 2, rel_tol=1e-6)


def test_nerfstudio_opencv_distortion_is_undone_on_load(make_blender):
    root = make_blender(n=3, width=32, height=24, splits=None, fl_x=30.0, fl_y=31.0, cx=16.5, cy=11.5,
                        camera_model="OPENCV", k1=-0.15, k2=0.02, p1=0.001, p2=-0.002)
    meta = json.loads((root / "transforms.json").read_text())
    del meta["camera_angle_x"]
    (root / "transforms.json").write_text(json.dumps(meta))
    ds = load_dataset(root, "all")
    lens = lens_camera("OPENCV", [30.0, 31.0, 16.5, 11.5, -0.15, 0.02, 0.001, -0.002], 32, 24)
    for i, path in enumerate(ds.image_paths):
        expected, k = undistort_image(read_image(path), lens)
        assert torch.equal(ds.images[i], torch.from_numpy(expected))
        assert [getattr(ds.cameras, a)[i].item() for a in ("fx", "fy", "cx", "cy")] == pytest.approx(k, rel=1e-6)
    assert ds.cameras.fx[0].item() < 30.0  # barrel distortion undone: a wider view
    # A fisheye model is not undone; the reader says so.
    meta["camera_model"] = "OPENCV_FISHEYE"
    (root / "transforms.json").write_text(json.dumps(meta))
    with pytest.warns(UserWarning, match="OPENCV_FISHEYE"):
        load_dataset(root, "all")
