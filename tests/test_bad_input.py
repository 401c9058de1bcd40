"""Bad scene data: each case is a DataError whose message names the offending file."""

import json
import struct

import numpy as np
import pytest
from PIL import Image

from dfield.data import DataError, load_dataset

# The tiny COLMAP models here have no 3D points; the fallback bounds warn about it, which is expected.
pytestmark = pytest.mark.filterwarnings("ignore:COLMAP model has")


def _edit_json(path, change):
    meta = json.loads(path.read_text())
    change(meta)
    path.write_text(json.dumps(meta))


def _fails(path, match, **kwargs):
    with pytest.raises(DataError) as err:
        load_dataset(path, **kwargs)
    assert match in str(err.value), str(err.value)
    return str(err.value)


# ---------------------------------------------------------------- images

def test_missing_image(make_blender):
    root = make_blender()
    (root / "train" / "r_1.png").unlink()
    _fails(root, "r_1")


def test_corrupt_png(make_blender):
    root = make_blender()
    (root / "train" / "r_2.png").write_bytes(np.random.default_rng(0).bytes(300))
    _fails(root, "r_2.png")


def test_truncated_png(make_blender):
    root = make_blender(width=32, height=32)
    png = root / "train" / "r_0.png"
    png.write_bytes(png.read_bytes()[:len(png.read_bytes()) // 2])
    _fails(root, "r_0.png")


def test_empty_png_file(make_blender):
    root = make_blender()
    (root / "train" / "r_0.png").write_bytes(b"")
    _fails(root, "r_0.png")


def test_mismatched_image_sizes(make_blender):
    root = make_blender(width=8, height=6)
    Image.fromarray(np.zeros((5, 7, 4), np.uint8)).save(root / "train" / "r_2.png")
    msg = _fails(root, "r_2.png")
    assert "7x5" in msg and "8x6" in msg and "r_0.png" in msg


def test_missing_id_map(make_blender):
    root = make_blender(splits=("train",))
    _edit_json(root / "transforms_train.json",
               lambda m: [f.update(id_path=f"./train/id_{i}.png") for i, f in enumerate(m["frames"])])
    _fails(root, "id_0.png")


def test_id_map_of_the_wrong_kind(make_blender):
    root = make_blender(n=1, splits=("train",), aabb=[[-1] * 3, [1] * 3], near=1, far=5)
    Image.fromarray(np.zeros((6, 8, 3), np.uint8)).save(root / "train" / "id_0.png")
    _edit_json(root / "transforms_train.json", lambda m: m["frames"][0].update(id_path="./train/id_0.png"))
    _fails(root, "id_0.png")


# ---------------------------------------------------------------- blender json

@pytest.mark.parametrize("matrix", [np.eye(3).tolist(), [[1, 0, 0, float("nan")], [0, 1, 0, 0], [0, 0, 1, 0]],
                                    [[1, 0, 0, 0], [0, 1, 0]], "identity"])
def test_bad_transform_matrix(make_blender, matrix):
    root = make_blender()
    _edit_json(root / "transforms_val.json", lambda m: m["frames"][1].update(transform_matrix=matrix))
    msg = _fails(root, "transforms_val.json", split="val")
    assert "frame 1" in msg and "r_1" in msg


def test_empty_frames(make_blender):
    root = make_blender()
    _edit_json(root / "transforms_test.json", lambda m: m.update(frames=[]))
    _fails(root, "transforms_test.json", split="test")


def test_no_focal_length(make_blender):
    root = make_blender(splits=None)
    _edit_json(root / "transforms.json", lambda m: m.pop("camera_angle_x"))
    assert "camera_angle_x" in _fails(root, "transforms.json")


def test_frame_without_file_path(make_blender):
    root = make_blender(splits=None)
    _edit_json(root / "transforms.json", lambda m: m["frames"][2].pop("file_path"))
    assert "frame 2" in _fails(root, "transforms.json")


def test_invalid_json(make_blender):
    root = make_blender()
    (root / "transforms_train.json").write_text('{"frames": [')
    _fails(root, "transforms_train.json")


def test_bad_aabb(make_blender):
    root = make_blender(aabb=[[1, 1, 1], [-1, -1, -1]])
    _fails(root, "transforms_train.json")


def test_bad_objects_json(make_blender):
    root = make_blender()
    (root / "objects.json").write_text('{"objects": [{"name": "no id"}]}')
    _fails(root, "objects.json")


# ---------------------------------------------------------------- folders

def test_empty_folder(tmp_path):
    (tmp_path / "empty").mkdir()
    assert "empty" in _fails(tmp_path / "empty", str(tmp_path / "empty"))


def test_missing_folder(tmp_path):
    _fails(tmp_path / "nowhere", "nowhere")


def test_unknown_format(tmp_path):
    root = tmp_path / "mystery"
    root.mkdir()
    (root / "notes.txt").write_text("hello")
    (root / "data.bin").write_bytes(np.random.default_rng(0).bytes(64))
    msg = _fails(root, str(root))
    assert "notes.txt" in msg


# ---------------------------------------------------------------- llff

@pytest.mark.parametrize("shape", [(9, 15), (9, 17, 1), (0, 17)])
def test_poses_bounds_wrong_shape(make_llff, shape):
    root = make_llff()
    np.save(root / "poses_bounds.npy", np.ones(shape))
    assert str(shape) in _fails(root, "poses_bounds.npy", downscale=4)


def test_poses_bounds_not_an_array(make_llff):
    root = make_llff()
    (root / "poses_bounds.npy").write_bytes(b"not numpy")
    _fails(root, "poses_bounds.npy", downscale=4)


def test_image_count_mismatch(make_llff):
    root = make_llff(n=9)
    (root / "images_4" / "im004.png").unlink()
    msg = _fails(root, "images_4", downscale=4)
    assert "8 images" in msg and "9 poses" in msg


def test_llff_without_images(make_llff):
    root = make_llff()
    (root / "images_4").rename(root / "pictures")
    _fails(root, str(root), downscale=4)


# ---------------------------------------------------------------- colmap

def _colmap(root, images_txt):
    (root / "sparse" / "0").mkdir(parents=True)
    (root / "sparse" / "0" / "cameras.txt").write_text("1 PINHOLE 8 6 10 10 4 3\n")
    (root / "sparse" / "0" / "images.txt").write_text(images_txt)
    (root / "images").mkdir()
    Image.fromarray(np.zeros((6, 8, 3), np.uint8)).save(root / "images" / "a.png")
    return root


def test_colmap_bad_text_line(tmp_path):
    root = _colmap(tmp_path / "c", "1 1 0 0 zero 0 0 0 1 a.png\n\n")
    assert "images.txt:1" in _fails(root, "images.txt")


def test_colmap_truncated_binary(tmp_path):
    root = _colmap(tmp_path / "c", "1 1 0 0 0 0 0 0 1 a.png\n\n")
    (root / "sparse" / "0" / "cameras.bin").write_bytes(struct.pack("<QiiQQ", 1, 1, 1, 8, 6) + b"\0" * 10)
    _fails(root, "cameras.bin")


def test_colmap_missing_image(tmp_path):
    root = _colmap(tmp_path / "c", "1 1 0 0 0 0 0 0 1 a.png\n\n2 1 0 0 0 1 0 0 1 b.png\n\n")
    _fails(root, "b.png", split="all")


def test_colmap_unsupported_camera(tmp_path):
    root = _colmap(tmp_path / "c", "1 1 0 0 0 0 0 0 1 a.png\n\n")
    (root / "sparse" / "0" / "cameras.txt").write_text("1 OPENCV_FISHEYE 8 6 10 10 4 3 0 0 0 0\n")
    assert "OPENCV_FISHEYE" in _fails(root, "cameras.txt", split="all")
