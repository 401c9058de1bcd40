"""Writing results: PNG images, videos, depth visualisation and PLY point clouds / meshes.

Every writer goes through `dfield.io.atomic.atomic_path`, so a crash or a concurrent reader never sees a
half-written file.
"""

from __future__ import annotations

import colorsys
from pathlib import Path

import imageio.v2 as imageio
import numpy as np
from PIL import Image, ImageDraw

from dfield.io.atomic import atomic_path


def _numpy(x) -> np.ndarray:
    if hasattr(x, "detach"):  # torch tensor, without importing torch here
        x = x.detach().cpu().numpy()
    return np.asarray(x)


def to_uint8(img) -> np.ndarray:
    """(H, W, 3) or (H, W) float in [0, 1] (or already uint8) -> uint8 of the same shape."""
    img = _numpy(img)
    if img.dtype == np.uint8:
        return img
    img = np.nan_to_num(img.astype(np.float32), nan=0.0)
    return (np.clip(img, 0.0, 1.0) * 255.0 + 0.5).astype(np.uint8)


def save_png(path, img) -> Path:
    """(H, W, 3) or (H, W) image, float in [0, 1] or uint8 -> PNG at `path`; returns `path`."""
    with atomic_path(path) as tmp:
        Image.fromarray(to_uint8(img)).save(tmp, format="PNG")
    return Path(path)


def labelled_strip(tiles: list[tuple[str, Path]], size: int = 200) -> Image.Image:
    """The images of `tiles` ((label, path) pairs) side by side, each scaled to size x size with its label above it
    (an 18-pixel strip); nearest-neighbour scaling, so small renders keep their pixels.

    Example:
        >>> import tempfile
        >>> p = Path(tempfile.mkdtemp()) / "a.png"; Image.new("RGB", (10, 10), "red").save(p)
        >>> labelled_strip([("a", p), ("b", p)], size=50).size
        (100, 68)
    """
    img = Image.new("RGB", (size * len(tiles), size + 18), "white")
    draw = ImageDraw.Draw(img)
    for k, (label, path) in enumerate(tiles):
        img.paste(Image.open(path).convert("RGB").resize((size, size), Image.NEAREST), (k * size, 18))
        draw.text((k * size + 6, 3), label, fill="black")
    return img


def _pad_even(frame: np.ndarray) -> np.ndarray:
    # yuv420p (what players expect from H.264) subsamples chroma 2x2, so both sides must be even.
    h, w = frame.shape[:2]
    return np.pad(frame, ((0, h % 2), (0, w % 2), (0, 0)), mode="edge")


def save_video(path, frames, fps: int = 24) -> Path:
    """Frames: iterable of (H, W, 3) float [0, 1] or uint8. `.gif` -> animated GIF, else H.264 mp4."""
    frames = [to_uint8(f) for f in frames]
    if not frames:
        raise ValueError("save_video: no frames")
    frames = [np.repeat(f[..., None], 3, -1) if f.ndim == 2 else f for f in frames]
    with atomic_path(path) as tmp:
        if str(path).lower().endswith(".gif"):
            # Pillow's GIF writer takes the frame duration in milliseconds; loop=0 repeats forever.
            imageio.mimsave(tmp, frames, format="GIF", duration=1000.0 / fps, loop=0)
        else:
            # macro_block_size=1 stops imageio from resizing to multiples of 16; we pad to even instead.
            with imageio.get_writer(
                tmp, format="FFMPEG", fps=fps, codec="libx264", pixelformat="yuv420p",
                quality=8, macro_block_size=1,
            ) as writer:
                for f in frames:
                    writer.append_data(_pad_even(f))
    return Path(path)


# Polynomial approximation (Ruofei Du) of Google's Turbo colormap (Anton Mikhailov, 2019): no matplotlib needed.
_TURBO4 = np.array([
    [0.13572138, 4.61539260, -42.66032258, 132.13108234],
    [0.09140261, 2.19418839, 4.84296658, -14.18503333],
    [0.10667330, 12.64194608, -60.58204836, 110.36276771],
])
_TURBO2 = np.array([[-152.94239396, 59.28637943], [4.27729857, 2.82956604], [-89.90310912, 27.34824973]])


def turbo(x) -> np.ndarray:
    """Values in [0, 1] (clipped) -> (..., 3) RGB float in [0, 1]."""
    x = np.clip(np.asarray(x, dtype=np.float64), 0.0, 1.0)[..., None]
    v4 = np.concatenate([np.ones_like(x), x, x**2, x**3], -1)
    v2 = np.concatenate([x**4, x**5], -1)
    return np.clip(v4 @ _TURBO4.T + v2 @ _TURBO2.T, 0.0, 1.0)


def cluster_palette(k: int) -> np.ndarray:
    """(k, 3) distinct colours in [0, 1] for cluster maps: hues spaced by the golden angle, so clusters with
    neighbouring indices never look alike."""
    return np.array([colorsys.hsv_to_rgb((j * 0.618033988749895) % 1.0, 0.75, 0.95) for j in range(k)]).reshape(k, 3)


def colorize_depth(depth, acc=None, near=None, far=None) -> np.ndarray:
    """(H, W) depth -> (H, W, 3) float RGB, near = blue end of Turbo. Pixels are blended towards white
    by (1 - acc), so empty space is white. `near`/`far` default to the 1st/99th percentile of
    the depths of opaque pixels, so a few stray samples don't flatten the colour range."""
    depth = _numpy(depth).astype(np.float64)
    acc = np.ones_like(depth) if acc is None else np.clip(_numpy(acc).astype(np.float64), 0.0, 1.0)
    finite = np.isfinite(depth)
    acc = np.where(finite, acc, 0.0)
    sel = depth[finite & (acc > 0.5)]
    if sel.size == 0:
        sel = depth[finite]
    if near is None:
        near = float(np.percentile(sel, 1)) if sel.size else 0.0
    if far is None:
        far = float(np.percentile(sel, 99)) if sel.size else 1.0
    t = (np.where(finite, depth, near) - near) / max(far - near, 1e-12)
    rgb = turbo(t)
    a = acc[..., None]
    return (rgb * a + (1.0 - a)).astype(np.float32)


def _vertex_array(points, colors) -> np.ndarray:
    points = _numpy(points).reshape(-1, 3)
    fields = [("x", "<f4"), ("y", "<f4"), ("z", "<f4")]
    if colors is not None:
        colors = to_uint8(_numpy(colors).reshape(-1, 3))
        if len(colors) != len(points):
            raise ValueError(f"{len(colors)} colors for {len(points)} points")
        fields += [("red", "u1"), ("green", "u1"), ("blue", "u1")]
    v = np.empty(len(points), dtype=fields)
    v["x"], v["y"], v["z"] = points[:, 0], points[:, 1], points[:, 2]
    if colors is not None:
        v["red"], v["green"], v["blue"] = colors[:, 0], colors[:, 1], colors[:, 2]
    return v


_PLY_TYPES = {"<f4": "float", "u1": "uchar", "<i4": "int"}


def _write_ply(path, vertices: np.ndarray, faces: np.ndarray | None) -> Path:
    lines = ["ply", "format binary_little_endian 1.0", f"element vertex {len(vertices)}"]
    lines += [f"property {_PLY_TYPES[vertices.dtype[n].str.lstrip('|')]} {n}" for n in vertices.dtype.names]
    if faces is not None:
        lines += [f"element face {len(faces)}", "property list uchar int vertex_indices"]
    lines.append("end_header")
    with atomic_path(path) as tmp, open(tmp, "wb") as f:
        f.write(("\n".join(lines) + "\n").encode("ascii"))
        f.write(vertices.tobytes())
        if faces is not None:
            f.write(faces.tobytes())
    return Path(path)


def save_ply(path, points, colors=None) -> Path:
    """Binary little-endian point cloud: float x y z, optional uchar red green blue
    (`colors` uint8, or float in [0, 1])."""
    return _write_ply(path, _vertex_array(points, colors), None)


def save_mesh_ply(path, vertices, faces, colors=None) -> Path:
    """Triangle mesh: `faces` (F, 3) integer vertex indices, optional per-vertex colours."""
    faces = _numpy(faces).reshape(-1, 3)
    f = np.empty(len(faces), dtype=[("n", "u1"), ("idx", "<i4", (3,))])
    f["n"], f["idx"] = 3, faces
    return _write_ply(path, _vertex_array(vertices, colors), f)
