"""COLMAP sparse reconstructions (`sparse/0/{cameras,images,points3D}.{bin,txt}`) without pycolmap.

Binary files are little-endian; the layout is the one COLMAP's `read_write_model.py` documents.
"""

from __future__ import annotations

import struct
import warnings
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch

from dfield.data.dataset import Cameras, DataError, Dataset
from dfield.data.distortion import MODEL_PARAMS, lens_camera, undistorted_intrinsics
from dfield.data.images import find_image, image_size, pick_image_folder, read_image_stack, scaled_size
from dfield.data.splits import holdout_indices

# model id -> (name, number of parameters); the ids are COLMAP's and fix the binary layout.
CAMERA_MODELS = {
    0: ("SIMPLE_PINHOLE", 3), 1: ("PINHOLE", 4), 2: ("SIMPLE_RADIAL", 4), 3: ("RADIAL", 5), 4: ("OPENCV", 8),
    5: ("OPENCV_FISHEYE", 8), 6: ("FULL_OPENCV", 12), 7: ("FOV", 5), 8: ("SIMPLE_RADIAL_FISHEYE", 4),
    9: ("RADIAL_FISHEYE", 5), 10: ("THIN_PRISM_FISHEYE", 12),
}
MODEL_IDS = {name: (i, n) for i, (name, n) in CAMERA_MODELS.items()}
SUPPORTED = tuple(MODEL_PARAMS)  # perspective models; lens distortion is undone on load


@dataclass
class ColmapCamera:
    """One COLMAP camera: model name (e.g. PINHOLE), the size it was calibrated at, and its model parameters."""

    model: str
    width: int
    height: int
    params: np.ndarray


@dataclass
class ColmapImage:
    """One registered COLMAP image: its world-to-camera pose, camera id, file name and observed 3D point ids."""

    qvec: np.ndarray  # (w, x, y, z), world-to-camera rotation
    tvec: np.ndarray  # world-to-camera translation (OpenCV camera axes)
    camera_id: int
    name: str
    point_ids: np.ndarray = field(default_factory=lambda: np.zeros(0, np.int64))  # observed 3D points (-1 = none)


class _Reader:
    """Sequential little-endian reads that turn a short file into a DataError naming it."""

    def __init__(self, path: Path):
        self.path, self.data, self.pos = path, path.read_bytes(), 0

    def read(self, fmt: str):
        size = struct.calcsize("<" + fmt)
        if self.pos + size > len(self.data):
            raise DataError(f"{self.path}: file is truncated at byte {self.pos}")
        out = struct.unpack_from("<" + fmt, self.data, self.pos)
        self.pos += size
        return out

    def skip(self, n: int):
        if self.pos + n > len(self.data):
            raise DataError(f"{self.path}: file is truncated at byte {self.pos}")
        self.pos += n

    def array(self, dtype: str, count: int) -> np.ndarray:
        dt = np.dtype(dtype).newbyteorder("<")
        if self.pos + dt.itemsize * count > len(self.data):
            raise DataError(f"{self.path}: file is truncated at byte {self.pos}")
        out = np.frombuffer(self.data, dt, count, self.pos)
        self.pos += dt.itemsize * count
        return out

    def string(self) -> str:
        end = self.data.find(b"\0", self.pos)
        if end < 0:
            raise DataError(f"{self.path}: file is truncated at byte {self.pos}")
        out = self.data[self.pos:end].decode("utf-8", errors="replace")
        self.pos = end + 1
        return out


def _text_lines(path: Path):
    """(line number, line) for every line of a COLMAP text file, blank lines and comments included."""
    try:
        return list(enumerate(path.read_text().splitlines(), 1))
    except (OSError, UnicodeDecodeError) as e:
        raise DataError(f"{path}: cannot read ({e})") from None


def _records(path: Path):
    """(line number, fields) of each data line: blank lines and comments skipped."""
    for no, line in _text_lines(path):
        line = line.strip()
        if line and not line.startswith("#"):
            yield no, line.split()


def read_cameras(path: Path) -> dict[int, ColmapCamera]:
    """camera_id -> camera, from cameras.bin or cameras.txt (by suffix). Raises DataError on a malformed file."""
    cams = {}
    if path.suffix == ".bin":
        r = _Reader(path)
        for _ in range(r.read("Q")[0]):
            cam_id, model_id, w, h = r.read("iiQQ")
            if model_id not in CAMERA_MODELS:
                raise DataError(f"{path}: camera {cam_id} has unknown model id {model_id}")
            name, n = CAMERA_MODELS[model_id]
            cams[cam_id] = ColmapCamera(name, w, h, np.array(r.read("d" * n)))
        return cams
    for no, parts in _records(path):
        try:
            cam_id, model, w, h = int(parts[0]), parts[1], int(parts[2]), int(parts[3])
            params = np.array([float(p) for p in parts[4:]])
        except (IndexError, ValueError):
            raise DataError(f"{path}:{no}: expected 'CAMERA_ID MODEL WIDTH HEIGHT PARAMS...'") from None
        if model not in MODEL_IDS or len(params) != MODEL_IDS[model][1]:
            raise DataError(f"{path}:{no}: unknown camera model {model} or wrong number of parameters")
        cams[cam_id] = ColmapCamera(model, w, h, params)
    return cams


def read_images(path: Path) -> dict[int, ColmapImage]:
    """image_id -> image, from images.bin or images.txt (by suffix). Raises DataError on a malformed file."""
    images = {}
    if path.suffix == ".bin":
        r = _Reader(path)
        for _ in range(r.read("Q")[0]):
            image_id, *pose, cam_id = r.read("i7di")
            name = r.string()
            n_points = r.read("Q")[0]
            obs = r.array("f8,f8,i8", n_points)  # x, y, point3D_id
            images[image_id] = ColmapImage(np.array(pose[:4]), np.array(pose[4:]), cam_id, name,
                                           np.asarray(obs["f2"], np.int64))
        return images
    lines = _text_lines(path)
    i = 0
    while i < len(lines):
        no, line = lines[i]
        i += 1
        line = line.strip()
        if not line or line.startswith("#"):
            continue
        # Each image takes two lines; the second (its 2D points) may be empty, so it is read unconditionally.
        parts = line.split(maxsplit=9)
        try:
            image_id, pose, cam_id, name = int(parts[0]), [float(p) for p in parts[1:8]], int(parts[8]), parts[9]
            points = lines[i][1].split() if i < len(lines) else []
            point_ids = np.array([int(float(p)) for p in points[2::3]], np.int64)
        except (IndexError, ValueError):
            raise DataError(f"{path}:{no}: expected 'IMAGE_ID QW QX QY QZ TX TY TZ CAMERA_ID NAME' "
                            "followed by a line of 'X Y POINT3D_ID' triples") from None
        i += 1
        images[image_id] = ColmapImage(np.array(pose[:4]), np.array(pose[4:]), cam_id, name, point_ids)
    return images


def read_points(path: Path) -> dict[int, np.ndarray]:
    """point3D_id -> xyz. Colours, errors and tracks are skipped: only the geometry bounds the scene."""
    points = {}
    if path.suffix == ".bin":
        r = _Reader(path)
        for _ in range(r.read("Q")[0]):
            point_id, x, y, z = r.read("Q3d")
            r.skip(3 + 8)  # rgb, error
            r.skip(8 * r.read("Q")[0])  # track of (image_id, point2D_idx) int32 pairs
            points[point_id] = np.array([x, y, z])
        return points
    for no, parts in _records(path):
        try:
            points[int(parts[0])] = np.array([float(p) for p in parts[1:4]])
        except (IndexError, ValueError):
            raise DataError(f"{path}:{no}: expected 'POINT3D_ID X Y Z R G B ERROR TRACK...'") from None
        if len(points[int(parts[0])]) != 3:
            raise DataError(f"{path}:{no}: expected 'POINT3D_ID X Y Z R G B ERROR TRACK...'")
    return points


def qvec_to_rotation(q: np.ndarray) -> np.ndarray:
    """(3, 3) rotation matrix of a quaternion (w, x, y, z), normalised first (COLMAP's convention).

    Example:
        >>> qvec_to_rotation(np.array([2.0, 0, 0, 0])).tolist()  # any scale of the identity quaternion
        [[1.0, 0.0, 0.0], [0.0, 1.0, 0.0], [0.0, 0.0, 1.0]]
    """
    w, x, y, z = q / np.linalg.norm(q)
    return np.array([
        [1 - 2 * (y * y + z * z), 2 * (x * y - w * z), 2 * (x * z + w * y)],
        [2 * (x * y + w * z), 1 - 2 * (x * x + z * z), 2 * (y * z - w * x)],
        [2 * (x * z - w * y), 2 * (y * z + w * x), 1 - 2 * (x * x + y * y)],
    ])


def c2w_opengl(qvec: np.ndarray, tvec: np.ndarray) -> np.ndarray:
    """(3, 4) camera-to-world, OpenGL axes, from COLMAP's world-to-camera pose (OpenCV axes)."""
    r = qvec_to_rotation(qvec)
    c2w = np.concatenate([r.T, (-r.T @ tvec)[:, None]], 1)
    c2w[:, 1:3] *= -1  # OpenCV looks down +z with y down; OpenGL looks down -z with y up
    return c2w


def find_model(root: Path) -> Path | None:
    """The folder holding cameras.{bin,txt}: sparse/0, sparse, or the scene folder itself."""
    for d in (root / "sparse" / "0", root / "sparse", root):
        if any((d / f"cameras.{ext}").is_file() for ext in ("bin", "txt")):
            return d
    return None


def _model_file(folder: Path, stem: str, required: bool = True) -> Path | None:
    for ext in ("bin", "txt"):  # COLMAP writes binary by default; prefer it when both exist
        if (folder / f"{stem}.{ext}").is_file():
            return folder / f"{stem}.{ext}"
    if required:
        raise DataError(f"{folder}: no {stem}.bin or {stem}.txt")
    return None


def normalisation(centres: np.ndarray, points: np.ndarray) -> tuple[np.ndarray, float, np.ndarray]:
    """centre, scale and the normalised aabb: the 1st..99th percentile box of the (N, 3) `points` maps into
    [-1, 1]^3 by x -> (x - centre) * scale; with fewer than 10 points, the camera `centres` bound the scene.

    Example:
        >>> c, s, box = normalisation(np.zeros((1, 3)), np.random.default_rng(0).uniform(2, 4, (1000, 3)))
        >>> round(float(np.abs(box).max()), 9)
        1.0
    """
    if len(points) >= 10:
        lo, hi = np.percentile(points, 1, axis=0), np.percentile(points, 99, axis=0)
        centre = (lo + hi) / 2
        scale = 1.0 / max(float((hi - lo).max()) / 2, 1e-9)
        return centre, scale, np.stack([lo - centre, hi - centre]) * scale
    warnings.warn("COLMAP model has (almost) no 3D points; scene bounds come from the cameras", stacklevel=3)
    centre = centres.mean(0)
    scale = 1.0 / max(float(np.linalg.norm(centres - centre, axis=1).max()), 1e-9)
    return centre, scale, np.array([[-1.0] * 3, [1.0] * 3])


def _observed(images: list[ColmapImage], point_ids: np.ndarray, xyz: np.ndarray) -> list[np.ndarray]:
    """Per image, the (normalised) 3D points it observes."""
    if len(point_ids) == 0:
        return [np.zeros((0, 3))] * len(images)
    order = np.argsort(point_ids)
    sorted_ids = point_ids[order]
    out = []
    for im in images:
        pos = np.minimum(np.searchsorted(sorted_ids, im.point_ids), len(sorted_ids) - 1)
        out.append(xyz[order[pos[sorted_ids[pos] == im.point_ids]]])  # -1 (no 3D point) never matches
    return out


def near_far(c2w: np.ndarray, obs: list[np.ndarray]) -> tuple[float, float]:
    """near/far for (N, 3, 4) OpenGL poses from the depths of the points each view observes (`obs`: one (M, 3)
    array per view; 2nd..98th percentile of all depths, padded by 0.5x and 1.5x)."""
    depths = [((p - c[:, 3]) @ -c[:, 2]) for c, p in zip(c2w, obs) if len(p)]
    depths = np.concatenate(depths) if depths else np.zeros(0)
    depths = depths[depths > 0]
    if len(depths) < 10:
        return 0.05, 6.0  # cameras within radius ~1 of a unit scene: this covers it
    return max(0.01, 0.5 * float(np.percentile(depths, 2))), 1.5 * float(np.percentile(depths, 98))


def read_colmap(root: Path, split: str = "train", downscale: float = 1.0, background=(1.0, 1.0, 1.0),
                holdout_every: int = 8) -> Dataset:
    """Read one split of a COLMAP scene: the model in sparse/0, sparse or `root`, images from `pick_image_folder`.

    Images sorted by name; every `holdout_every`-th is held out for val/test (`split` train, val, test or all).
    Poses become OpenGL camera-to-world, and the scene is shifted and scaled so the 1st..99th percentile box
    of the 3D points fits in [-1, 1]^3 (that box is the aabb); near/far come from the depths of the points
    each view observes. Perspective models (`SUPPORTED`); images of a camera with lens distortion are
    undistorted on load to a pinhole camera of the same size (`dfield.data.distortion.undistort_image`: same
    principal point, focal lengths zoomed so no pixel comes from outside the photo), per image.

    Raises:
        DataError: no model, malformed files, unsupported camera models, invalid poses or images of different sizes.
    """
    root = Path(root)
    model = find_model(root)
    if model is None:
        raise DataError(f"{root}: no COLMAP model (sparse/0/cameras.bin or .txt)")
    cams_file = _model_file(model, "cameras")
    cams = read_cameras(cams_file)
    imgs = read_images(_model_file(model, "images"))
    points_file = _model_file(model, "points3D", required=False)
    points = read_points(points_file) if points_file else {}
    if not imgs:
        raise DataError(f"{model}: the model has no registered images")

    order = sorted(imgs.values(), key=lambda im: im.name)
    chosen = np.array(holdout_indices(len(order), split, holdout_every, str(root)))

    for im in order:
        if im.camera_id not in cams:
            raise DataError(f"{cams_file}: has no camera {im.camera_id}, which image {im.name} uses")
    used = {cams[im.camera_id].model for im in order}
    if bad := used - set(SUPPORTED):
        raise DataError(f"{cams_file}: camera model {', '.join(sorted(bad))} is not supported "
                        f"({', '.join(SUPPORTED)} are)")
    lenses_by_id = {}
    for cid in sorted({im.camera_id for im in order}):
        try:
            lenses_by_id[cid] = lens_camera(cams[cid].model, cams[cid].params, cams[cid].width, cams[cid].height)
        except DataError as e:
            raise DataError(f"{cams_file}: camera {cid}: {e}") from None

    folder, rest = pick_image_folder(root, downscale)
    with np.errstate(divide="ignore", invalid="ignore"):  # a zero qvec becomes NaN, reported below
        c2w_all = np.stack([c2w_opengl(im.qvec, im.tvec) for im in order])
    if not np.isfinite(c2w_all).all():
        bad = order[int(np.nonzero(~np.isfinite(c2w_all).all(axis=(1, 2)))[0][0])]
        raise DataError(f"{model}: image {bad.name} has an invalid pose (qvec {bad.qvec}, tvec {bad.tvec})")
    xyz = np.stack(list(points.values())) if points else np.zeros((0, 3))
    centre, scale, aabb = normalisation(c2w_all[:, :, 3], xyz)
    c2w_all[:, :, 3] = (c2w_all[:, :, 3] - centre) * scale
    xyz_n = (xyz - centre) * scale
    obs = _observed(order, np.fromiter(points.keys(), np.int64, len(points)), xyz_n)
    near, far = near_far(c2w_all, obs)

    sel = [order[i] for i in chosen]
    paths = [find_image(folder / im.name) for im in sel]
    # Intrinsics are for the full-size images; the coefficients act on normalised coordinates and stay.
    width, height = scaled_size(*image_size(paths[0]), rest)
    scaled = {}  # camera id -> (lens at the images' size, its undistorted intrinsics), worked out once per camera
    for cid in sorted({im.camera_id for im in sel}):
        lens = lenses_by_id[cid].scaled(width, height)
        try:
            scaled[cid] = (lens, undistorted_intrinsics(lens))
        except DataError as e:
            raise DataError(f"{cams_file}: camera {cid}: {e}") from None
    lenses = [scaled[im.camera_id][0] for im in sel]
    k = [scaled[im.camera_id][1] for im in sel]
    images = read_image_stack(paths, rest, background, lenses)  # checks that the sizes match
    kt = torch.tensor(k, dtype=torch.float32)
    cameras = Cameras(c2w=torch.from_numpy(c2w_all[chosen]).float(), fx=kt[:, 0], fy=kt[:, 1], cx=kt[:, 2],
                      cy=kt[:, 3], width=width, height=height)
    return Dataset(images=images, cameras=cameras, image_paths=paths,
                   aabb=torch.from_numpy(aabb).float(), near=near, far=far, background=tuple(background),
                   split=split, source=str(root), format="colmap", scene_c2w=torch.from_numpy(c2w_all).float())
