"""Lens distortion of COLMAP's perspective camera models, and images undistorted to a pinhole camera.

Every supported model is one case of OpenCV's rational model, applied to normalised image coordinates
(x, y) = (X / Z, Y / Z) of a camera-space point:

    r2 = x^2 + y^2,   radial = (1 + k1 r2 + k2 r2^2 + k3 r2^3) / (1 + k4 r2 + k5 r2^2 + k6 r2^3)
    x_d = x radial + 2 p1 x y + p2 (r2 + 2 x^2)
    y_d = y radial + 2 p2 x y + p1 (r2 + 2 y^2)
    pixel = (fx x_d + cx, fy y_d + cy)            (pixel centres at +0.5, as everywhere in dfield)

SIMPLE_PINHOLE / PINHOLE have no coefficients, SIMPLE_RADIAL has k1 (COLMAP calls it k), RADIAL k1 and k2,
OPENCV k1, k2, p1, p2 and FULL_OPENCV all eight, so one `distort` serves them all.

Undistortion (`undistort_image`) is a remap: each pixel of the pinhole output is a ray, the model above says
where that ray lands in the photo, and the photo is sampled there bilinearly. That direction needs no inverse;
the inverse (`undistort_points`, Newton's method) is only used on the photo's border, to choose the output
focal length so that every output pixel comes from inside the photo (`undistorted_intrinsics`: no blank
borders, the criterion of COLMAP's image undistorter with blank_pixels = 0). The output keeps the photo's size.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch
import torch.nn.functional as F

from dfield.data.dataset import DataError

# model -> names of its parameters, in COLMAP's order
MODEL_PARAMS = {
    "SIMPLE_PINHOLE": ("f", "cx", "cy"),
    "PINHOLE": ("fx", "fy", "cx", "cy"),
    "SIMPLE_RADIAL": ("f", "cx", "cy", "k1"),
    "RADIAL": ("f", "cx", "cy", "k1", "k2"),
    "OPENCV": ("fx", "fy", "cx", "cy", "k1", "k2", "p1", "p2"),
    "FULL_OPENCV": ("fx", "fy", "cx", "cy", "k1", "k2", "p1", "p2", "k3", "k4", "k5", "k6"),
}
COEFFS = ("k1", "k2", "p1", "p2", "k3", "k4", "k5", "k6")


@dataclass
class LensCamera:
    """A perspective camera with lens distortion: intrinsics in pixels of a `width` x `height` image and the
    8 coefficients (k1, k2, p1, p2, k3, k4, k5, k6) of the model in the module docstring."""

    fx: float
    fy: float
    cx: float
    cy: float
    width: int
    height: int
    coeffs: np.ndarray  # (8,) float64

    @property
    def distorted(self) -> bool:
        """Whether any distortion coefficient is non-zero."""
        return bool(np.any(self.coeffs != 0))

    def scaled(self, width: int, height: int) -> "LensCamera":
        """The same camera for the image resized to `width` x `height` (coefficients act on normalised
        coordinates, so they do not change)."""
        sx, sy = width / self.width, height / self.height
        return LensCamera(self.fx * sx, self.fy * sy, self.cx * sx, self.cy * sy, width, height, self.coeffs)


def lens_camera(model: str, params, width: int, height: int) -> LensCamera:
    """A `LensCamera` from a COLMAP model name and its parameter list.

    Example:
        >>> cam = lens_camera("SIMPLE_RADIAL", [100.0, 32.0, 24.0, -0.1], 64, 48)
        >>> (cam.fx, cam.fy, float(cam.coeffs[0]), cam.distorted)
        (100.0, 100.0, -0.1, True)
    """
    if model not in MODEL_PARAMS:
        raise DataError(f"camera model {model} is not supported ({', '.join(MODEL_PARAMS)} are)")
    names = MODEL_PARAMS[model]
    if len(params) != len(names):
        raise DataError(f"camera model {model} takes {len(names)} parameters ({' '.join(names)}), got {len(params)}")
    p = dict(zip(names, (float(v) for v in params)))
    fx, fy = (p["f"], p["f"]) if "f" in p else (p["fx"], p["fy"])
    if not all(np.isfinite(list(p.values()))) or fx <= 0 or fy <= 0:
        raise DataError(f"camera model {model}: bad parameters {list(params)}")
    return LensCamera(fx, fy, p["cx"], p["cy"], int(width), int(height), np.array([p.get(k, 0.0) for k in COEFFS]))


def distort(x: np.ndarray, y: np.ndarray, coeffs: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Distorted normalised coordinates (x_d, y_d) of undistorted ones (x, y), any equal shapes (see the module
    docstring for the equation).

    Example:
        >>> distort(np.array([0.5]), np.array([0.0]), np.array([0.1, 0, 0, 0, 0, 0, 0, 0]))[0]  # 0.5 (1 + 0.1 * 0.25)
        array([0.5125])
    """
    k1, k2, p1, p2, k3, k4, k5, k6 = (float(c) for c in coeffs)
    r2 = x * x + y * y
    radial = (1 + r2 * (k1 + r2 * (k2 + r2 * k3))) / (1 + r2 * (k4 + r2 * (k5 + r2 * k6)))
    xy = x * y
    return x * radial + 2 * p1 * xy + p2 * (r2 + 2 * x * x), y * radial + 2 * p2 * xy + p1 * (r2 + 2 * y * y)


def undistort_points(xd: np.ndarray, yd: np.ndarray, coeffs: np.ndarray, iterations: int = 20,
                     ) -> tuple[np.ndarray, np.ndarray]:
    """The inverse of `distort`: undistorted (x, y) whose distortion is (xd, yd), by Newton's method with a
    finite-difference Jacobian, started at (xd, yd). Points where it does not converge (beyond the radius where
    the model folds over) come out NaN.

    Example:
        >>> c = np.array([-0.2, 0.05, 0.001, -0.002, 0, 0, 0, 0])
        >>> x, y = undistort_points(*distort(np.array([0.3]), np.array([-0.4]), c), c)
        >>> np.round([x[0], y[0]], 9).tolist()
        [0.3, -0.4]
    """
    xd, yd = np.asarray(xd, np.float64), np.asarray(yd, np.float64)
    x, y, h = xd.copy(), yd.copy(), 1e-7
    for _ in range(iterations):
        fx, fy = distort(x, y, coeffs)
        ex, ey = fx - xd, fy - yd
        ax, ay = distort(x + h, y, coeffs)
        bx, by = distort(x, y + h, coeffs)
        j11, j21, j12, j22 = (ax - fx) / h, (ay - fy) / h, (bx - fx) / h, (by - fy) / h
        det = j11 * j22 - j12 * j21
        with np.errstate(divide="ignore", invalid="ignore"):
            x = x - (j22 * ex - j12 * ey) / det
            y = y - (-j21 * ex + j11 * ey) / det
    fx, fy = distort(x, y, coeffs)
    bad = ~(np.hypot(fx - xd, fy - yd) < 1e-9)
    return np.where(bad, np.nan, x), np.where(bad, np.nan, y)


def undistorted_intrinsics(cam: LensCamera, centre: bool = False) -> tuple[float, float, float, float]:
    """fx, fy, cx, cy of the pinhole camera `undistort_image` renders: the photo's size, its principal point
    (or the image centre with `centre`), and one zoom z of its focal lengths (fx' = z fx, fy' = z fy), the
    smallest for which every output pixel centre maps inside the photo's border of pixel centres.

    Each border of the photo is undistorted; the output's left edge must lie right of the rightmost point of the
    photo's left border, and so on for the other three. Barrel distortion (k1 < 0) gives z < 1 (the output
    sees a little more than the photo's centre), pincushion z > 1.

    Example:
        >>> cam = lens_camera("SIMPLE_RADIAL", [100.0, 32.0, 24.0, 0.0], 64, 48)
        >>> undistorted_intrinsics(cam)  # no distortion: the same camera
        (100.0, 100.0, 32.0, 24.0)
    """
    w, h = cam.width, cam.height
    cx, cy = (w / 2, h / 2) if centre else (cam.cx, cam.cy)
    if not cam.distorted and not centre:
        return cam.fx, cam.fy, cx, cy
    us, vs = np.arange(w) + 0.5, np.arange(h) + 0.5  # every pixel centre of the border
    border = {"left": (np.full(h, 0.5), vs), "right": (np.full(h, w - 0.5), vs),
              "top": (us, np.full(w, 0.5)), "bottom": (us, np.full(w, h - 0.5))}
    und = {}
    for side, (u, v) in border.items():
        x, y = undistort_points((u - cam.cx) / cam.fx, (v - cam.cy) / cam.fy, cam.coeffs)
        if not (np.isfinite(x).all() and np.isfinite(y).all()):
            raise DataError(f"camera distortion {cam.coeffs.tolist()} cannot be inverted at the image border "
                            "(a fisheye lens needs a fisheye model)")
        und[side] = (x, y)
    left, right = und["left"][0].max(), und["right"][0].min()
    top, bottom = und["top"][1].max(), und["bottom"][1].min()
    if not (left < 0 < right and top < 0 < bottom):
        raise DataError(f"camera distortion {cam.coeffs.tolist()} folds the image over; cannot undistort it")
    # Output pixel centre u maps to x = (u - cx') / (z fx); the extreme ones must stay within [left, right].
    z = max((cx - 0.5) / (-left * cam.fx), (w - 0.5 - cx) / (right * cam.fx),
            (cy - 0.5) / (-top * cam.fy), (h - 0.5 - cy) / (bottom * cam.fy))
    return cam.fx * z, cam.fy * z, cx, cy


def undistortion_grid(cam: LensCamera, intrinsics: tuple[float, float, float, float]) -> np.ndarray:
    """(H, W, 2) pixel coordinates (x, y; centres at +0.5) in the photo of each pixel centre of the pinhole
    image with `intrinsics` (fx, fy, cx, cy) and the photo's size.

    Example:
        >>> cam = lens_camera("PINHOLE", [10.0, 10.0, 2.0, 1.5], 4, 3)
        >>> undistortion_grid(cam, (10.0, 10.0, 2.0, 1.5))[0, 0].tolist()  # no distortion: the identity
        [0.5, 0.5]
    """
    fx, fy, cx, cy = intrinsics
    u, v = np.meshgrid(np.arange(cam.width) + 0.5, np.arange(cam.height) + 0.5)
    xd, yd = distort((u - cx) / fx, (v - cy) / fy, cam.coeffs)
    return np.stack([cam.fx * xd + cam.cx, cam.fy * yd + cam.cy], -1)


def undistort_image(image: np.ndarray, cam: LensCamera, intrinsics: tuple[float, float, float, float] | None = None,
                    ) -> tuple[np.ndarray, tuple[float, float, float, float]]:
    """`image` (H, W, C) uint8, taken by `cam` (of the same size), resampled bilinearly to the pinhole camera
    `intrinsics` (default `undistorted_intrinsics(cam)`). Returns the image (same size and dtype) and the
    intrinsics. A camera without distortion whose intrinsics do not change returns `image` itself.

    Example:
        >>> cam = lens_camera("SIMPLE_RADIAL", [40.0, 16.0, 12.0, -0.05], 32, 24)
        >>> out, (fx, fy, cx, cy) = undistort_image(np.full((24, 32, 3), 7, np.uint8), cam)
        >>> out.shape, int(out.min()), int(out.max()), round(float(fx), 2), (cx, cy)
        ((24, 32, 3), 7, 7, 39.83, (16.0, 12.0))
    """
    h, w = image.shape[:2]
    if (w, h) != (cam.width, cam.height):
        raise ValueError(f"image is {w}x{h} but the camera is {cam.width}x{cam.height}")
    k = undistorted_intrinsics(cam) if intrinsics is None else tuple(float(v) for v in intrinsics)
    if not cam.distorted and np.allclose(k, (cam.fx, cam.fy, cam.cx, cam.cy)):
        return image, k
    grid = torch.from_numpy(undistortion_grid(cam, k))
    # grid_sample's align_corners=False puts pixel i's centre at normalised (2 i + 1) / W - 1 = 2 (i + 0.5) / W - 1.
    grid = (2 * grid / torch.tensor([w, h], dtype=grid.dtype) - 1).float()[None]
    src = torch.from_numpy(np.array(image, np.float32)).permute(2, 0, 1)[None]  # a copy: PIL arrays are read-only
    out = F.grid_sample(src, grid, mode="bilinear", padding_mode="border", align_corners=False)
    return out[0].permute(1, 2, 0).round().clamp(0, 255).to(torch.uint8).numpy(), k
