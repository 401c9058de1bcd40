"""Blender / nerfstudio `transforms*.json` scenes (c2w already in the OpenGL convention)."""

from __future__ import annotations

import json
import math
import warnings
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from dfield.data.dataset import Cameras, DataError, Dataset
from dfield.data.distortion import LensCamera, undistorted_intrinsics
from dfield.data.images import find_image, image_size, read_id_stack, read_image_stack, scaled_size
from dfield.data.splits import holdout_indices

SPLIT_FILES = ("train", "val", "test")  # transforms_{split}.json
_INTRINSIC_KEYS = ("camera_angle_x", "camera_angle_y", "fl_x", "fl_y", "cx", "cy", "w", "h")
_DISTORTION_KEYS = ("k1", "k2", "k3", "k4", "p1", "p2")


@dataclass
class _Frame:
    json_path: Path
    index: int
    c2w: np.ndarray  # (3, 4)
    intrinsics: dict
    image: Path  # as written in the json; resolved (extension added) only for the frames loaded
    ids: Path | None


def _read_json(path: Path) -> dict:
    try:
        meta = json.loads(path.read_text())
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as e:
        raise DataError(f"{path}: cannot read JSON ({e})") from None
    if not isinstance(meta, dict) or not isinstance(meta.get("frames"), list):
        raise DataError(f"{path}: expected an object with a 'frames' list")
    if not meta["frames"]:
        raise DataError(f"{path}: 'frames' is empty")
    return meta


def scene_files(path: Path) -> tuple[Path, dict[str, Path]]:
    """The scene folder and its transforms files: {"train"/"val"/"test": path} or {"": transforms.json}."""
    path = Path(path)
    root = path.parent if path.is_file() else path
    split_files = {s: root / f"transforms_{s}.json" for s in SPLIT_FILES if (root / f"transforms_{s}.json").is_file()}
    if path.is_file() and path.name not in {f"transforms_{s}.json" for s in SPLIT_FILES}:
        return root, {"": path}  # one named file: treat it like transforms.json
    if split_files:
        return root, split_files
    if (root / "transforms.json").is_file():
        return root, {"": root / "transforms.json"}
    raise DataError(f"{root}: no transforms.json or transforms_{{train,val,test}}.json")


def _parse_frames(json_path: Path, meta: dict, root: Path) -> list[_Frame]:
    keys = _INTRINSIC_KEYS + _DISTORTION_KEYS
    top = {k: meta[k] for k in keys if k in meta}
    fisheye = "FISHEYE" in str(meta.get("camera_model", "OPENCV")).upper()
    distorted = any(meta.get(k) for k in _DISTORTION_KEYS)
    frames = []
    for i, fr in enumerate(meta["frames"]):
        where = f"{json_path}: frame {i}"
        if not isinstance(fr, dict) or not isinstance(fr.get("file_path"), str) or "transform_matrix" not in fr:
            raise DataError(f"{where}: needs a 'file_path' string and a 'transform_matrix'")
        where += f" ({fr['file_path']})"
        try:
            m = np.asarray(fr["transform_matrix"], dtype=np.float64)
        except (TypeError, ValueError):
            raise DataError(f"{where}: transform_matrix is not a matrix of numbers") from None
        if m.shape not in ((4, 4), (3, 4)):
            raise DataError(f"{where}: transform_matrix must be 4x4 or 3x4, got shape {m.shape}")
        if not np.isfinite(m).all():
            raise DataError(f"{where}: transform_matrix has non-finite values")
        distorted |= any(fr.get(k) for k in _DISTORTION_KEYS)
        ids = fr.get("id_path")
        frames.append(_Frame(json_path, i, m[:3], {**top, **{k: fr[k] for k in keys if k in fr}},
                             root / fr["file_path"], None if ids is None else root / str(ids)))
    if distorted and fisheye:
        warnings.warn(f"{json_path}: lens distortion ({meta.get('camera_model')}) is ignored", stacklevel=4)
    for f in frames:
        f.intrinsics["fisheye"] = fisheye
    return frames


def _intrinsics(f: _Frame, width: int, height: int) -> tuple[float, float, float, float]:
    """fx, fy, cx, cy in pixels of an image of the given (original) size."""
    k = f.intrinsics
    if "fl_x" not in k and "camera_angle_x" not in k:
        raise DataError(f"{f.json_path}: no focal length for frame {f.index}: needs camera_angle_x or fl_x "
                        "(top level or per frame)")
    try:
        # nerfstudio's w/h describe the images the intrinsics were calibrated on; rescale if ours differ.
        sx, sy = width / float(k.get("w", width)), height / float(k.get("h", height))
        if "fl_x" in k:
            fx = float(k["fl_x"]) * sx
        else:
            fx = 0.5 * width / math.tan(0.5 * float(k["camera_angle_x"]))
        if "fl_y" in k:
            fy = float(k["fl_y"]) * sy
        elif "camera_angle_y" in k:
            fy = 0.5 * height / math.tan(0.5 * float(k["camera_angle_y"]))
        else:
            fy = fx
        cx = float(k["cx"]) * sx if "cx" in k else width / 2
        cy = float(k["cy"]) * sy if "cy" in k else height / 2
    except (TypeError, ValueError, ZeroDivisionError):
        raise DataError(f"{f.json_path}: frame {f.index}: intrinsics are not numbers: {k}") from None
    if not all(math.isfinite(v) for v in (fx, fy, cx, cy)) or fx <= 0 or fy <= 0:
        raise DataError(f"{f.json_path}: frame {f.index}: bad intrinsics fx={fx} fy={fy} cx={cx} cy={cy}")
    return fx, fy, cx, cy


def _coefficients(f: _Frame) -> np.ndarray | None:
    """The OPENCV distortion of a frame as (k1, k2, p1, p2, k3, 0, 0, 0) for `dfield.data.distortion`, or None
    when it has none (or a fisheye model, which is not undone)."""
    k = f.intrinsics
    if k.get("fisheye") or not any(k.get(n) for n in _DISTORTION_KEYS):
        return None
    try:
        return np.array([float(k.get(n, 0.0)) for n in ("k1", "k2", "p1", "p2", "k3")] + [0.0] * 3)
    except (TypeError, ValueError):
        raise DataError(f"{f.json_path}: frame {f.index}: distortion coefficients are not numbers") from None


def estimate_bounds(c2w: np.ndarray) -> tuple[np.ndarray, float, float]:
    """aabb (2, 3), near, far for an object-centric capture: cameras around a point they all look at.

    The box is centred on the point closest to all optical axes, with half-size 0.375 x the median
    camera distance (lego: 4.03 -> 1.51). near/far bracket a sphere of radius 0.5 x that distance
    around it (lego: 2.02 / 6.05, the usual 2 / 6); bracketing the box corners instead (1.4 / 6.6)
    would spend samples on corners that objects rarely fill.
    """
    origins, dirs = c2w[:, :, 3], -c2w[:, :, 2]
    dirs = dirs / np.linalg.norm(dirs, axis=1, keepdims=True)
    proj = np.eye(3)[None] - dirs[:, :, None] * dirs[:, None, :]  # removes the along-axis component
    a, b = proj.sum(0), (proj @ origins[:, :, None]).sum(0)[:, 0]
    if np.linalg.eigvalsh(a)[0] < 1e-3 * len(c2w):
        warnings.warn("cameras do not look at a common point; scene bounds are a guess "
                      "(put \"aabb\", \"near\", \"far\" in the transforms file)", stacklevel=3)
        centre = origins.mean(0) + dirs.mean(0) * max(1.0, np.ptp(origins, axis=0).max())
    else:
        centre = np.linalg.solve(a, b)
    dist = np.linalg.norm(origins - centre, axis=1)
    if np.linalg.norm(centre) < 0.1 * np.median(dist):
        centre = np.zeros(3)  # scenes are usually built around the origin; keep it exact
        dist = np.linalg.norm(origins, axis=1)
    half = 0.375 * float(np.median(dist)) or 1.0  # all cameras at the centre: nothing to scale by
    radius = half * 4 / 3
    aabb = np.stack([centre - half, centre + half])
    return aabb, max(0.05, float(dist.min()) - radius), float(dist.max()) + radius


def _bounds_from_json(meta: dict, path: Path):
    aabb = near = far = None
    if "aabb" in meta:
        try:
            aabb = np.asarray(meta["aabb"], dtype=np.float64)
        except (TypeError, ValueError):
            aabb = None
        if aabb is None or aabb.shape != (2, 3) or not np.isfinite(aabb).all() or (aabb[0] >= aabb[1]).any():
            raise DataError(f"{path}: 'aabb' must be [[x0,y0,z0],[x1,y1,z1]] with min < max, got {meta['aabb']}")
    if "near" in meta or "far" in meta:
        try:
            near, far = float(meta["near"]), float(meta["far"])
        except (KeyError, TypeError, ValueError):
            raise DataError(f"{path}: 'near' and 'far' must both be numbers") from None
        if not 0 <= near < far:
            raise DataError(f"{path}: need 0 <= near < far, got near={near} far={far}")
    return aabb, near, far


def _object_names(root: Path) -> dict[int, str]:
    path = root / "objects.json"
    if not path.is_file():
        return {}
    try:
        return {int(o["id"]): str(o["name"]) for o in json.loads(path.read_text())["objects"]}
    except (OSError, UnicodeDecodeError, json.JSONDecodeError, KeyError, TypeError, ValueError) as e:
        raise DataError(f"{path}: expected {{\"objects\": [{{\"id\": 1, \"name\": ...}}, ...]}} ({e!r})") from None


def read_blender(path: Path, split: str = "train", downscale: float = 1.0, background=(1.0, 1.0, 1.0),
                 holdout_every: int = 8) -> Dataset:
    """Read one split of a Blender / nerfstudio scene (`path`: its folder or a transforms*.json).

    `split` is train, val, test or all. With transforms_{train,val,test}.json the files are the splits (val falls
    back to test); with a single transforms.json every `holdout_every`-th frame is held out for val/test. Images
    are resized by 1 / `downscale` and composited onto `background`; intrinsics follow. OPENCV lens distortion
    (k1, k2, k3, p1, p2) is undone on load (`dfield.data.distortion.undistort_image`). Bounds come from
    "aabb" / "near" / "far" in the json when present, else `estimate_bounds` over the cameras of every split.
    Per-pixel object ids ("id_path") and objects.json names are read when the scene has them.

    Raises:
        DataError: missing or malformed files, images of different sizes, or an empty split.
    """
    root, files = scene_files(path)
    metas = {name: _read_json(p) for name, p in files.items()}
    frames = {name: _parse_frames(files[name], m, root) for name, m in metas.items()}

    if "" in frames:  # one file: every holdout_every-th frame is held out for test (and val)
        every = frames[""]
        chosen = [every[i] for i in holdout_indices(len(every), split, holdout_every, str(root), "frames")]
    elif split == "all":
        chosen = [f for s in SPLIT_FILES if s in frames for f in frames[s]]
    elif split in frames:
        chosen = frames[split]
    elif split == "val" and "test" in frames:
        chosen = frames["test"]  # scenes without a val file validate on test
    else:
        raise DataError(f"{root}: no transforms_{split}.json")
    if not chosen:
        raise DataError(f"{root}: split '{split}' has no frames (holdout_every={holdout_every})")
    for f in chosen:
        f.image = find_image(f.image)

    sizes = [image_size(f.image) for f in chosen]
    for f, size in zip(chosen, sizes):
        if size != sizes[0]:
            raise DataError(f"{f.image}: image is {size[0]}x{size[1]}, but {chosen[0].image} is "
                            f"{sizes[0][0]}x{sizes[0][1]}; all images of a scene must have the same size")
    width, height = sizes[0]
    out_w, out_h = scaled_size(width, height, downscale)
    k = np.array([_intrinsics(f, width, height) for f in chosen], dtype=np.float64)
    k *= np.array([out_w / width, out_h / height, out_w / width, out_h / height])

    has_ids = [f.ids is not None for f in chosen]
    if any(has_ids) and not all(has_ids):
        f = chosen[has_ids.index(False)]
        raise DataError(f"{f.json_path}: frame {f.index} has no 'id_path' but other frames do")
    object_ids = None
    if all(has_ids):
        object_ids = read_id_stack([f.ids for f in chosen], downscale, (out_w, out_h))

    every_c2w = np.stack([f.c2w for fs in frames.values() for f in fs])
    aabb, near, far = None, None, None
    for name, meta in metas.items():
        a, n, fa = _bounds_from_json(meta, files[name])
        aabb = aabb if aabb is not None else a
        near, far = (near, far) if near is not None else (n, fa)
    if aabb is None or near is None:
        # Estimated from every camera of the scene so that all splits share the same bounds.
        est_aabb, est_near, est_far = estimate_bounds(every_c2w)
        aabb = est_aabb if aabb is None else aabb
        near, far = (est_near, est_far) if near is None else (near, far)

    lenses = []
    for i, f in enumerate(chosen):
        coeffs = _coefficients(f)
        # OPENCV: undistorted (as it is decoded) to a pinhole camera of the same size and principal point
        lenses.append(None if coeffs is None else LensCamera(*k[i], out_w, out_h, coeffs))
        if lenses[-1] is not None:
            k[i] = undistorted_intrinsics(lenses[-1])
    images = read_image_stack([f.image for f in chosen], downscale, background, lenses)
    kt = torch.from_numpy(k).float()
    cameras = Cameras(c2w=torch.from_numpy(np.stack([f.c2w for f in chosen])).float(),
                      fx=kt[:, 0], fy=kt[:, 1], cx=kt[:, 2], cy=kt[:, 3], width=out_w, height=out_h)
    return Dataset(images=images, cameras=cameras, image_paths=[f.image for f in chosen],
                   aabb=torch.as_tensor(aabb, dtype=torch.float32), near=float(near), far=float(far),
                   background=tuple(float(c) for c in background), object_ids=object_ids,
                   object_names=_object_names(root), split=split, source=str(root), format="blender",
                   scene_c2w=torch.from_numpy(every_c2w).float())
