"""Between a browser camera (viser: OpenCV axes, a position, a wxyz quaternion and a vertical field of view) and
dfield's pinhole Cameras (OpenGL camera-to-world), and where a viewer starts looking from."""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np
import torch

from dfield.data.dataset import Cameras

# OpenCV camera axes (x right, y down, z forward) -> OpenGL ones (x right, y up, z backward).
CV_TO_GL = np.diag([1.0, -1.0, -1.0])


def quat_to_matrix(wxyz) -> np.ndarray:
    """(3, 3) rotation of a unit quaternion (w, x, y, z); normalised first, so small rounding does not skew it."""
    w, x, y, z = np.asarray(wxyz, dtype=np.float64) / np.linalg.norm(wxyz)
    return np.array([
        [1 - 2 * (y * y + z * z), 2 * (x * y - w * z), 2 * (x * z + w * y)],
        [2 * (x * y + w * z), 1 - 2 * (x * x + z * z), 2 * (y * z - w * x)],
        [2 * (x * z - w * y), 2 * (y * z + w * x), 1 - 2 * (x * x + y * y)],
    ])


def matrix_to_quat(r) -> np.ndarray:
    """(w, x, y, z) with w >= 0 of a (3, 3) rotation (Shepperd's method: stable for every angle)."""
    r = np.asarray(r, dtype=np.float64)
    t = np.trace(r)
    if t > 0:
        s = 2 * math.sqrt(t + 1)
        q = [s / 4, (r[2, 1] - r[1, 2]) / s, (r[0, 2] - r[2, 0]) / s, (r[1, 0] - r[0, 1]) / s]
    else:
        i = int(np.argmax(np.diag(r)))
        j, k = (i + 1) % 3, (i + 2) % 3
        s = 2 * math.sqrt(1 + r[i, i] - r[j, j] - r[k, k])
        q = [0.0] * 4
        q[0] = (r[k, j] - r[j, k]) / s
        q[1 + i] = s / 4
        q[1 + j] = (r[j, i] + r[i, j]) / s
        q[1 + k] = (r[k, i] + r[i, k]) / s
    q = np.asarray(q)
    return q if q[0] >= 0 else -q


@dataclass(frozen=True)
class ViewCamera:
    """A browser camera as the viewer keeps it: world position, OpenCV-axes orientation (w, x, y, z), vertical
    field of view in radians and the canvas aspect (width / height)."""

    position: tuple[float, float, float]
    wxyz: tuple[float, float, float, float]
    fov_y: float
    aspect: float

    def size(self, max_side: int) -> tuple[int, int]:
        """(width, height) of a render whose longer side is `max_side` pixels, with the canvas's aspect."""
        if self.aspect >= 1:
            return max_side, max(1, round(max_side / self.aspect))
        return max(1, round(max_side * self.aspect)), max_side

    def cameras(self, max_side: int) -> Cameras:
        """One dfield camera (OpenGL c2w) seeing what the browser sees, rendered at `max_side` pixels.

        Example:
            >>> cam = ViewCamera((0.0, 0.0, 4.0), (0.0, 1.0, 0.0, 0.0), math.radians(60), 1.5)
            >>> c = cam.cameras(96); (c.width, c.height), [round(v, 3) for v in c.c2w[0, :, 2].tolist()]
            ((96, 64), [0.0, 0.0, 1.0])
        """
        w, h = self.size(max_side)
        c2w = np.zeros((3, 4))
        c2w[:, :3] = quat_to_matrix(self.wxyz) @ CV_TO_GL
        c2w[:, 3] = self.position
        f = 0.5 * h / math.tan(0.5 * self.fov_y)
        one = lambda v: torch.tensor([v], dtype=torch.float32)  # noqa: E731
        return Cameras(torch.tensor(c2w, dtype=torch.float32)[None], one(f), one(f), one(w / 2), one(h / 2), w, h)


def view_of(cameras: Cameras, i: int, aspect: float | None = None) -> ViewCamera:
    """The browser camera that sees what dataset camera `i` sees (its pose and vertical field of view)."""
    c2w = cameras.c2w[i].double().numpy()
    fov_y = 2 * math.atan(0.5 * cameras.height / float(cameras.fy[i]))
    aspect = cameras.width / cameras.height if aspect is None else aspect
    return ViewCamera(tuple(c2w[:, 3].tolist()), tuple(matrix_to_quat(c2w[:, :3] @ CV_TO_GL).tolist()), fov_y, aspect)


def scene_up(cameras: Cameras) -> np.ndarray:
    """The scene's up direction: the training cameras' mean up axis (unit). Captures hold the camera upright, and
    generated and Blender scenes put +z up, which their cameras' up axes agree with."""
    up = cameras.c2w[:, :, 1].double().mean(0).numpy()
    n = np.linalg.norm(up)
    return up / n if n > 1e-6 else np.array([0.0, 0.0, 1.0])


def look_at_point(cameras: Cameras) -> np.ndarray:
    """The point the training cameras look at most nearly (least squares over their viewing axes): where the
    browser camera orbits around."""
    origins = cameras.c2w[:, :, 3].double().numpy()
    dirs = -cameras.c2w[:, :, 2].double().numpy()
    dirs /= np.linalg.norm(dirs, axis=1, keepdims=True)
    proj = np.eye(3)[None] - dirs[:, :, None] * dirs[:, None, :]
    a, b = proj.sum(0), np.einsum("nij,nj->i", proj, origins)
    if abs(np.linalg.det(a)) < 1e-9:  # parallel axes (forward-facing): look one scene unit ahead of the mean camera
        return origins.mean(0) + dirs.mean(0)
    return np.linalg.solve(a, b)
