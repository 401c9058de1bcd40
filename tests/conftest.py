"""Tiny scene writers shared by the reader tests (a few pixels per image, so every test runs in milliseconds)."""

import json

import numpy as np
import pytest
from PIL import Image


def look_at(eye, target=(0.0, 0.0, 0.0), up=(0.0, 0.0, 1.0)) -> np.ndarray:
    """4x4 OpenGL camera-to-world looking from `eye` at `target`."""
    eye, target, up = (np.asarray(v, float) for v in (eye, target, up))
    back = (eye - target) / np.linalg.norm(eye - target)
    right = np.cross(up, back)
    right /= np.linalg.norm(right)
    m = np.eye(4)
    m[:3, :4] = np.stack([right, np.cross(back, right), back, eye], 1)
    return m


@pytest.fixture
def make_blender(tmp_path):
    """Factory: a Blender scene of random RGBA images, cameras on a circle of radius 4 around the origin.

    `splits` names the transforms_{split}.json files to write, or None for one transforms.json.
    Returns the scene folder; frame i of each file is `{split}/r_{i}.png`.
    """

    def make(n=3, width=8, height=6, splits=("train", "val", "test"), name="scene", **meta):
        root = tmp_path / name
        rng = np.random.default_rng(0)
        for split in splits or ("",):
            folder = root / (split or "images")
            folder.mkdir(parents=True, exist_ok=True)
            frames = []
            for i in range(n):
                rgba = rng.integers(0, 256, (height, width, 4), dtype=np.uint8)
                Image.fromarray(rgba, "RGBA").save(folder / f"r_{i}.png")
                a = 2 * np.pi * i / n
                eye = (4 * np.cos(a), 4 * np.sin(a), 1.0)
                frames.append({"file_path": f"./{folder.name}/r_{i}", "transform_matrix": look_at(eye).tolist()})
            body = {"camera_angle_x": 0.9, **meta, "frames": frames}
            (root / (f"transforms_{split}.json" if split else "transforms.json")).write_text(json.dumps(body))
        return root

    return make


@pytest.fixture
def make_llff(tmp_path):
    """Factory: an LLFF scene with full-size hwf (24, 32, 40) and its images in `images_4/` (8x6).

    Cameras share the LLFF rotation [down, right, back] = [-y, +x, +z] (identity in OpenGL axes) and
    sit on a small grid in the z = 0 plane; bounds are (2, 10) for every view.
    """

    def make(n=9, folder="images_4", width=8, height=6, name="llff"):
        root = tmp_path / name
        (root / folder).mkdir(parents=True)
        rng = np.random.default_rng(1)
        rows = []
        for i in range(n):
            pose = np.zeros((3, 5))
            pose[:, 0], pose[:, 1], pose[:, 2] = (0, -1, 0), (1, 0, 0), (0, 0, 1)
            pose[:, 3] = (i % 3 - 1.0, i // 3 - 1.0, 0.0)
            pose[:, 4] = (24, 32, 40)
            rows.append(np.concatenate([pose.ravel(), [2.0, 10.0]]))
            rgb = rng.integers(0, 256, (height, width, 3), dtype=np.uint8)
            Image.fromarray(rgb).save(root / folder / f"im{i:03d}.png")
        np.save(root / "poses_bounds.npy", np.array(rows))
        return root

    return make


@pytest.fixture(autouse=True, scope="session")
def _image_store(tmp_path_factory):
    """Decoded images of the tests' scenes go to a folder of the session, not the user's cache."""
    import os

    old = os.environ.get("DFIELD_IMAGE_STORE")
    os.environ["DFIELD_IMAGE_STORE"] = str(tmp_path_factory.mktemp("image_store"))
    yield
    if old is None:
        os.environ.pop("DFIELD_IMAGE_STORE", None)
    else:
        os.environ["DFIELD_IMAGE_STORE"] = old


@pytest.fixture(autouse=True, scope="session")
def _one_torch_thread():
    """Every test runs PyTorch on one thread: the suite shares a small machine with timing benchmarks."""
    import torch

    torch.set_num_threads(1)
    yield


TINY_SCENE_SPEC = dict(seed=0, width=20, height=20, n_train=8, n_test=2, supersample=1)


@pytest.fixture(scope="session")
def tiny_scene(tmp_path_factory):
    """A generated Blender-format scene of 8 train + 2 test views at 20x20 px (read-only: copy before editing)."""
    from dfield.data.generate import SceneSpec, generate_scene

    return generate_scene(tmp_path_factory.mktemp("tiny_scene"), SceneSpec(**TINY_SCENE_SPEC))


@pytest.fixture(scope="session")
def tiny_train_config():
    """Factory: a TrainConfig small enough to train a few dozen steps in about a second, that still crosses
    every schedule event (occupancy updates from step 5, grid upsamples at 10 and 20, box shrink at 15)."""
    from pathlib import Path

    from dfield.config import TrainConfig

    def make(scene, **overrides):
        cfg = TrainConfig(iterations=40, batch_rays=256, checkpoint_every=10, log_every=5)
        cfg.data.path = Path(scene)
        g = cfg.grid
        g.voxels_init, g.voxels_final, g.upsample_steps = 8**3, 16**3, (10, 20)
        g.occupancy_start, g.occupancy_every, g.shrink_step = 5, 5, 15
        for k, v in overrides.items():
            setattr(cfg, k, v)
        return cfg

    return make


@pytest.fixture(scope="session")
def teacher_cache(tmp_path_factory):
    """Teacher feature cache shared by the tests that train with a teacher."""
    return tmp_path_factory.mktemp("teacher_cache")


@pytest.fixture(scope="session")
def feature_run(tiny_scene, tiny_train_config, tmp_path_factory, teacher_cache):
    """A tiny run with a synthetic-teacher feature field, trained once for the query and edit tests
    (read-only: copy it before writing)."""
    from dfield.training.trainer import Trainer

    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("DFIELD_CACHE_DIR", str(teacher_cache))
        cfg = tiny_train_config(tiny_scene, iterations=60)
        cfg.features.teacher = "synthetic"
        cfg.features.dim = 8
        # Raw targets: these tests are about queries and edits. At 20 px the synthetic teacher's cells (4 px) are as
        # large as the objects, and the default bilateral smoothing spreads each cell's mix of object and ground over
        # the whole object (test_smoothing covers smoothing; the text query test lost its margin with it).
        cfg.features.smooth = "none"
        run = tmp_path_factory.mktemp("qrun") / "run"
        Trainer.create(cfg, run).train()
        yield run
