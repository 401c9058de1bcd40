"""Similarity transforms between sets of camera poses: the rotation that turns the cameras' up into +z, the
least-squares similarity between two sets of camera centres (Umeyama), and pose errors after aligning.

Poses are (N, 3, 4) camera-to-world matrices in the OpenGL convention of `dfield.data.dataset`. A similarity
x -> s R x + t maps a pose's centre to s R c + t and its rotation to R Rc.
"""

from __future__ import annotations

import numpy as np


def rotation_between(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    """(3, 3) rotation turning unit-length direction `a` onto `b` (Rodrigues; the shortest arc).

    Example:
        >>> np.round(rotation_between(np.array([1.0, 0, 0]), np.array([0, 0, 1.0])) @ [1, 0, 0], 6).tolist()
        [0.0, 0.0, 1.0]
    """
    a, b = a / np.linalg.norm(a), b / np.linalg.norm(b)
    v, c = np.cross(a, b), float(a @ b)
    if c < -1 + 1e-12:  # opposite: half a turn about any axis perpendicular to a
        axis = np.cross(a, [1.0, 0, 0] if abs(a[0]) < 0.9 else [0, 1.0, 0])
        axis /= np.linalg.norm(axis)
        return 2 * np.outer(axis, axis) - np.eye(3)
    vx = np.array([[0, -v[2], v[1]], [v[2], 0, -v[0]], [-v[1], v[0], 0]])
    return np.eye(3) + vx + vx @ vx / (1 + c)


def up_rotation(c2w: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """The rotation that turns the cameras' mean up vector (their +y axes) onto +z, and that up vector.

    People hold cameras level, so the mean of the cameras' up axes is the world's up (nerfstudio's "up"
    orientation); after the rotation the ground is roughly z = const, as in Blender scenes.

    Example:
        >>> c2w = np.eye(4)[:3][None]  # one camera whose up is +y
        >>> r, up = up_rotation(c2w)
        >>> np.round(r @ up, 6).tolist()
        [0.0, 0.0, 1.0]
    """
    up = c2w[:, :, 1].sum(0)
    up = up / max(np.linalg.norm(up), 1e-12)
    return rotation_between(up, np.array([0.0, 0.0, 1.0])), up


def transform_poses(c2w: np.ndarray, scale: float, rotation: np.ndarray, translation: np.ndarray) -> np.ndarray:
    """(N, 3, 4) poses moved by the similarity x -> scale * rotation @ x + translation.

    Example:
        >>> transform_poses(np.eye(4)[:3][None], 2.0, np.eye(3), np.ones(3))[0, :, 3].tolist()
        [1.0, 1.0, 1.0]
    """
    out = np.empty_like(c2w, dtype=np.float64)
    out[:, :, :3] = rotation @ c2w[:, :, :3]
    out[:, :, 3] = scale * c2w[:, :, 3] @ rotation.T + translation
    return out


def umeyama(src: np.ndarray, dst: np.ndarray) -> tuple[float, np.ndarray, np.ndarray]:
    """scale s, rotation R (3, 3), translation t minimising sum |dst - (s R src + t)|^2 over (N, 3) point pairs
    (Umeyama 1991; N >= 3 points not on a line).

    Example:
        >>> src = np.array([[0.0, 0, 0], [1, 0, 0], [0, 1, 0], [0, 0, 1]])
        >>> s, r, t = umeyama(src, 3 * src + 1)
        >>> round(s, 6), np.round(r, 6).tolist() == np.eye(3).tolist(), np.round(t, 6).tolist()
        (3.0, True, [1.0, 1.0, 1.0])
    """
    mu_s, mu_d = src.mean(0), dst.mean(0)
    a, b = src - mu_s, dst - mu_d
    u, d, vt = np.linalg.svd(b.T @ a / len(src))
    sign = np.eye(3)
    if np.linalg.det(u) * np.linalg.det(vt) < 0:
        sign[2, 2] = -1
    r = u @ sign @ vt
    var = (a**2).sum() / len(src)
    s = float(np.trace(np.diag(d) @ sign) / var) if var > 0 else 1.0
    return s, r, mu_d - s * r @ mu_s


def rotation_angle_deg(r: np.ndarray) -> np.ndarray:
    """Angles in degrees of (..., 3, 3) rotation matrices (0 for the identity).

    Example:
        >>> round(float(rotation_angle_deg(np.array([[0.0, -1, 0], [1, 0, 0], [0, 0, 1]]))), 6)
        90.0
    """
    # atan2 of sine and cosine stays accurate near 0, where arccos of the trace loses half the digits.
    cos = (np.trace(r, axis1=-2, axis2=-1) - 1) / 2
    sin = np.linalg.norm(r - np.swapaxes(r, -1, -2), axis=(-2, -1)) / (2 * np.sqrt(2))
    return np.degrees(np.arctan2(sin, cos))


def pose_errors(estimated: np.ndarray, reference: np.ndarray) -> dict:
    """Align `estimated` (N, 3, 4) poses to `reference` by the similarity of their camera centres (`umeyama`),
    then measure per camera: centre distance (reference units, and as a fraction of the extent of the reference
    centres, the largest distance between two of them) and rotation error in degrees.

    Returns a dict of per-camera arrays `position_error`, `position_error_rel`, `rotation_error_deg`, the
    similarity `scale`, `rotation`, `translation`, and `extent`.

    Example:
        >>> ref = np.tile(np.eye(4)[:3], (4, 1, 1)); ref[:, :, 3] = np.eye(4)[:, :3]
        >>> e = pose_errors(transform_poses(ref, 0.5, np.eye(3), np.ones(3)), ref)
        >>> float(e["position_error"].max()) < 1e-9, float(e["rotation_error_deg"].max()) < 1e-6
        (True, True)
    """
    s, r, t = umeyama(estimated[:, :, 3], reference[:, :, 3])
    aligned = transform_poses(estimated, s, r, t)
    centres = reference[:, :, 3]
    extent = float(np.linalg.norm(centres[:, None] - centres[None], axis=-1).max())
    pos = np.linalg.norm(aligned[:, :, 3] - centres, axis=1)
    rel = np.einsum("nji,njk->nik", reference[:, :, :3], aligned[:, :, :3])
    return {"position_error": pos, "position_error_rel": pos / max(extent, 1e-12),
            "rotation_error_deg": rotation_angle_deg(rel), "scale": s, "rotation": r, "translation": t,
            "extent": extent}
