import json
import math
from dataclasses import replace

import numpy as np
import pytest
from PIL import Image

from dfield.data.generate import SceneSpec, generate_scene

SPEC = SceneSpec(seed=3, n_train=8, n_test=3, width=32, height=32)


@pytest.fixture(scope="module")
def scene(tmp_path_factory):
    return generate_scene(tmp_path_factory.mktemp("scene"), SPEC)


def _frames(root):
    for split in ("train", "test"):
        meta = json.loads((root / f"transforms_{split}.json").read_text())
        for frame in meta["frames"]:
            rgba = np.asarray(Image.open(root / (frame["file_path"] + ".png")))
            ids = np.asarray(Image.open(root / frame["id_path"]))
            yield meta, frame, rgba, ids


def _objects(root):
    return json.loads((root / "objects.json").read_text())["objects"]


def test_layout_and_metadata(scene):
    assert not (scene / "transforms_val.json").exists()
    for split, n in (("train", SPEC.n_train), ("test", SPEC.n_test)):
        meta = json.loads((scene / f"transforms_{split}.json").read_text())
        assert len(meta["frames"]) == n
        assert meta["aabb"] == [[-1.5] * 3, [1.5] * 3]
        assert 0 < meta["near"] < meta["far"]
        assert meta["frames"][0]["file_path"] == f"./{split}/r_0"
        assert np.asarray(meta["frames"][0]["transform_matrix"]).shape == (4, 4)
    objects = _objects(scene)
    assert [o["id"] for o in objects] == list(range(1, SPEC.n_objects + 2))
    assert objects[0]["name"] == "ground"
    names = [o["name"] for o in objects[1:]]
    assert len(set(names)) == len(names)
    assert {o["shape"] for o in objects[1:]} == {"sphere", "box", "cylinder", "cone", "torus"}
    for o in objects[1:]:
        lo, hi = np.asarray(o["bbox"])
        assert np.all(lo >= -1.5) and np.all(hi <= 1.5) and hi[2] <= 0.85


def test_images_and_ids(scene):
    seen = set()
    for _, _, rgba, ids in _frames(scene):
        assert rgba.shape == (32, 32, 4) and rgba.dtype == np.uint8 and ids.shape == (32, 32)
        seen |= set(np.unique(ids).tolist())
        # Away from silhouettes (and the image border) every sub-sample hits what the centre ray hits.
        pad = np.pad(ids.astype(int), 1, constant_values=-1)
        window = np.stack([pad[i : i + 32, j : j + 32] for i in range(3) for j in range(3)])
        alpha = rgba[..., 3]
        assert np.all(alpha[(window == 0).all(0)] == 0)
        assert np.all(alpha[(window > 0).all(0)] == 255)
        assert rgba[..., :3][alpha == 255].std(0).min() > 10  # textured, shaded, not flat
    assert seen == set(range(SPEC.n_objects + 2))  # background, ground and every object show up


def test_cameras_follow_opengl_convention(scene):
    """Objects' inner points, projected with c2w as OpenGL cameras, land on pixels of that object."""
    probes = {}
    for o in _objects(scene)[1:]:
        # The torus's centre is in its hole, so probe the middle of its tube instead.
        offset = [o["major_radius"], 0, 0] if o["shape"] == "torus" else [0, 0, 0]
        probes[o["id"]] = np.asarray(o["center"]) + offset
    hits, total, found = 0, 0, set()
    for meta, frame, _, ids in _frames(scene):
        c2w = np.asarray(frame["transform_matrix"])
        focal = 0.5 * 32 / math.tan(0.5 * meta["camera_angle_x"])
        for oid, p in probes.items():
            x, y, z = c2w[:3, :3].T @ (p - c2w[:3, 3])
            assert z < 0  # in front of the camera: it looks down -z
            u, v = focal * x / -z + 16, -focal * y / -z + 16
            if 0 <= u < 32 and 0 <= v < 32:
                total += 1
                if ids[int(v), int(u)] == oid:
                    hits += 1
                    found.add(oid)
    assert total > 0 and hits / total > 0.8  # the rest are occluded; a flipped y axis gives < 0.5
    assert found == set(probes)


def test_deterministic_and_seeded(tmp_path):
    spec = SceneSpec(seed=5, n_train=2, n_test=1, width=24, height=16, n_objects=3, n_val=1)
    a = generate_scene(tmp_path / "a", spec)
    b = generate_scene(tmp_path / "b", spec)
    c = generate_scene(tmp_path / "c", replace(spec, seed=6))
    files = sorted(p.relative_to(a) for p in a.rglob("*") if p.is_file())
    assert len(files) == 4 * 2 + 3 + 1  # image and id map per view, 3 transforms files, objects.json
    assert np.asarray(Image.open(a / "val" / "r_0.png")).shape == (16, 24, 4)
    assert files == sorted(p.relative_to(b) for p in b.rglob("*") if p.is_file())
    assert all((a / f).read_bytes() == (b / f).read_bytes() for f in files)
    assert (a / "objects.json").read_text() != (c / "objects.json").read_text()
    assert (a / "train" / "r_0.png").read_bytes() != (c / "train" / "r_0.png").read_bytes()


def test_rejects_bad_spec(tmp_path):
    with pytest.raises(ValueError):
        generate_scene(tmp_path, SceneSpec(n_objects=0))
    with pytest.raises(ValueError):
        generate_scene(tmp_path, SceneSpec(n_objects=10))
    with pytest.raises(ValueError, match="shared_colors"):
        generate_scene(tmp_path, SceneSpec(n_objects=3, shared_colors=3))


def test_shared_colors_give_objects_one_colour_and_keep_the_layout(tmp_path):
    spec = SceneSpec(seed=1, n_train=1, n_test=1, width=16, height=16)
    plain = _objects(generate_scene(tmp_path / "a", spec))
    shared = _objects(generate_scene(tmp_path / "b", replace(spec, shared_colors=1)))
    assert shared[1]["color"] == shared[2]["color"] != shared[3]["color"]
    assert shared[1]["shape"] != shared[2]["shape"]
    assert [o.get("bbox") for o in shared] == [o.get("bbox") for o in plain]  # only the colour changed
    assert [o.get("center") for o in shared] == [o.get("center") for o in plain]
    assert len({o["name"] for o in shared}) == len(shared)
