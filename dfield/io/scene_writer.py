"""Posed pinhole images written as a scene the readers take: a COLMAP text model (sparse/0), nerfstudio's
transforms.json, or LLFF's poses_bounds.npy; each file atomically.

A `PosedScene` holds OpenGL camera-to-world poses (`dfield.data.dataset` conventions), pinhole intrinsics per
image, and the sparse points with the views that observe them.
"""

from __future__ import annotations

import io
import json
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from dfield.io.atomic import atomic_write_bytes, atomic_write_text

OPENCV_FROM_OPENGL = np.diag([1.0, -1.0, -1.0])  # flips y and z: the same matrix both ways


@dataclass
class PosedScene:
    """Pinhole images `names` (W x H) with poses `c2w` (N, 3, 4, OpenGL), intrinsics `k` (N, 4: fx, fy, cx,
    cy), sparse points `xyz` (P, 3) with colours `rgb` (P, 3) uint8 and mean reprojection errors `error` (P,),
    and per image the indices into the points it observes (`observed`)."""

    names: list[str]
    c2w: np.ndarray
    k: np.ndarray
    width: int
    height: int
    xyz: np.ndarray
    rgb: np.ndarray
    error: np.ndarray
    observed: list[np.ndarray]

    def shared_intrinsics(self) -> bool:
        """Whether every image has the same intrinsics (to 1e-6 relative)."""
        return bool(np.allclose(self.k, self.k[0], rtol=1e-6, atol=1e-9))


def rotation_to_qvec(r: np.ndarray) -> np.ndarray:
    """Unit quaternion (w, x, y, z), w >= 0, of a (3, 3) rotation matrix (the inverse of COLMAP's qvec2rotmat).

    Example:
        >>> np.round(rotation_to_qvec(np.array([[0.0, -1, 0], [1, 0, 0], [0, 0, 1]])), 6).tolist()  # 90 deg about z
        [0.707107, 0.0, 0.0, 0.707107]
    """
    m = np.asarray(r, np.float64)
    # The eigenvector of the largest eigenvalue of this symmetric matrix is the quaternion (Bar-Itzhack 2000).
    k = np.array([
        [m[0, 0] - m[1, 1] - m[2, 2], m[1, 0] + m[0, 1], m[2, 0] + m[0, 2], m[2, 1] - m[1, 2]],
        [m[1, 0] + m[0, 1], m[1, 1] - m[0, 0] - m[2, 2], m[2, 1] + m[1, 2], m[0, 2] - m[2, 0]],
        [m[2, 0] + m[0, 2], m[2, 1] + m[1, 2], m[2, 2] - m[0, 0] - m[1, 1], m[1, 0] - m[0, 1]],
        [m[2, 1] - m[1, 2], m[0, 2] - m[2, 0], m[1, 0] - m[0, 1], m[0, 0] + m[1, 1] + m[2, 2]],
    ]) / 3.0
    w, v = np.linalg.eigh(k)
    x, y, z, qw = v[:, np.argmax(w)]
    q = np.array([qw, x, y, z])
    return q if q[0] >= 0 else -q


def world_to_camera(c2w: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """COLMAP's world-to-camera rotation (3, 3) and translation (3,) (OpenCV axes) of one OpenGL (3, 4) pose."""
    r = (c2w[:, :3] @ OPENCV_FROM_OPENGL).T
    return r, -r @ c2w[:, 3]


def _fmt(values) -> str:
    return " ".join(f"{float(v):.10g}" for v in values)


def write_colmap_text(folder: Path, scene: PosedScene) -> Path:
    """cameras.txt (PINHOLE: one camera if all images share intrinsics, else one each), images.txt (each image's
    observations re-projected into its pinhole image) and points3D.txt with tracks, into `folder`."""
    folder = Path(folder)
    shared = scene.shared_intrinsics()
    cam_ids = [1] * len(scene.names) if shared else list(range(1, len(scene.names) + 1))
    lines = ["# Camera list with one line of data per camera:", "#   CAMERA_ID, MODEL, WIDTH, HEIGHT, PARAMS[]"]
    for i in sorted(set(range(len(scene.names))) if not shared else {0}):
        lines.append(f"{cam_ids[i]} PINHOLE {scene.width} {scene.height} {_fmt(scene.k[i])}")
    atomic_write_text(folder / "cameras.txt", "\n".join(lines) + "\n")

    tracks: dict[int, list[tuple[int, int]]] = {}
    lines = ["# Image list with two lines of data per image:",
             "#   IMAGE_ID, QW, QX, QY, QZ, TX, TY, TZ, CAMERA_ID, NAME", "#   POINTS2D[] as (X, Y, POINT3D_ID)"]
    for i, name in enumerate(scene.names):
        r, t = world_to_camera(scene.c2w[i])
        lines.append(f"{i + 1} {_fmt(rotation_to_qvec(r))} {_fmt(t)} {cam_ids[i]} {name}")
        idx = scene.observed[i]
        p = scene.xyz[idx] @ r.T + t
        fx, fy, cx, cy = scene.k[i]
        uv = np.stack([fx * p[:, 0] / p[:, 2] + cx, fy * p[:, 1] / p[:, 2] + cy], 1) if len(idx) else np.zeros((0, 2))
        for j, (pid, (u, v)) in enumerate(zip(idx.tolist(), uv.tolist())):
            tracks.setdefault(pid, []).append((i + 1, j))
        lines.append(" ".join(f"{u:.3f} {v:.3f} {pid + 1}" for pid, (u, v) in zip(idx.tolist(), uv.tolist())))
    atomic_write_text(folder / "images.txt", "\n".join(lines) + "\n")

    lines = ["# 3D point list with one line of data per point:",
             "#   POINT3D_ID, X, Y, Z, R, G, B, ERROR, TRACK[] as (IMAGE_ID, POINT2D_IDX)"]
    for pid in range(len(scene.xyz)):
        track = " ".join(f"{a} {b}" for a, b in tracks.get(pid, []))
        lines.append(f"{pid + 1} {_fmt(scene.xyz[pid])} {' '.join(str(int(c)) for c in scene.rgb[pid])} "
                     f"{scene.error[pid]:.4f} {track}".rstrip())
    atomic_write_text(folder / "points3D.txt", "\n".join(lines) + "\n")
    return folder


def write_transforms(path: Path, scene: PosedScene, image_dir: str, aabb: np.ndarray, near: float, far: float,
                     extra: dict | None = None) -> Path:
    """nerfstudio's transforms.json: PINHOLE intrinsics (top level when shared, else per frame), frames with
    `image_dir`/name and 4x4 OpenGL `transform_matrix`, plus the aabb / near / far dfield's reader uses and
    anything in `extra` (e.g. nerfstudio's applied_transform)."""
    def intrinsics(k):
        return {"fl_x": float(k[0]), "fl_y": float(k[1]), "cx": float(k[2]), "cy": float(k[3])}

    shared = scene.shared_intrinsics()
    meta = {"camera_model": "PINHOLE", "w": scene.width, "h": scene.height, **(intrinsics(scene.k[0]) if shared else {})}
    frames = []
    for i, name in enumerate(scene.names):
        m = np.concatenate([scene.c2w[i], [[0.0, 0.0, 0.0, 1.0]]])
        frames.append({"file_path": f"{image_dir}/{name}", "transform_matrix": np.round(m, 10).tolist(),
                       **({} if shared else intrinsics(scene.k[i]))})
    meta.update(frames=frames, aabb=np.round(aabb, 6).tolist(), near=float(near), far=float(far), **(extra or {}))
    return atomic_write_text(path, json.dumps(meta, indent=2) + "\n")


def depth_bounds(c2w: np.ndarray, points: np.ndarray) -> tuple[float, float]:
    """Near and far depth of the points (M, 3) one OpenGL camera (3, 4) observes: their 0.1th and 99.9th
    percentile depth along the viewing axis, as LLFF's imgs2poses computes them.

    Example:
        >>> depth_bounds(np.eye(4)[:3], np.array([[0.0, 0, -2], [0, 0, -5]]))  # camera at 0 looking down -z
        (2.003, 4.997)
    """
    z = (points - c2w[:, 3]) @ -c2w[:, 2]
    z = z[z > 0]
    if len(z) == 0:
        raise ValueError("no observed point lies in front of the camera")
    return float(np.percentile(z, 0.1)), float(np.percentile(z, 99.9))


def write_poses_bounds(path: Path, scene: PosedScene) -> Path:
    """LLFF's poses_bounds.npy: per image (in name order, as the LLFF reader lists the images) the 3x4 pose in
    LLFF axes (down, right, back), a column (H, W, focal), and near / far depths of the points it observes.
    The LLFF format has one focal length and the principal point at the image centre: the intrinsics must be
    shared, square (fx = fy) and centred.

    Raises:
        ValueError: intrinsics that the format cannot hold, or an image that observes no point.
    """
    k = scene.k
    if not (scene.shared_intrinsics() and np.allclose(k[:, 0], k[:, 1], rtol=1e-6)
            and np.allclose(k[:, 2:], [scene.width / 2, scene.height / 2], atol=1e-6)):
        raise ValueError("LLFF poses_bounds.npy needs one square, centred pinhole camera for all images")
    rows = []
    for i in np.argsort(scene.names, kind="stable"):
        c = scene.c2w[i]
        llff = np.stack([-c[:, 1], c[:, 0], c[:, 2], c[:, 3], [scene.height, scene.width, k[i, 0]]], 1)
        rows.append(np.concatenate([llff.reshape(-1), depth_bounds(c, scene.xyz[scene.observed[i]])]))
    buf = io.BytesIO()
    np.save(buf, np.array(rows, np.float64))
    return atomic_write_bytes(path, buf.getvalue())
