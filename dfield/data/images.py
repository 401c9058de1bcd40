"""Image and id-map reading shared by every scene reader, so all formats downscale and composite alike."""

from __future__ import annotations

import re
import warnings
from pathlib import Path

import numpy as np
import torch
from PIL import Image, UnidentifiedImageError

from dfield.data.dataset import DataError
from dfield.data.distortion import LensCamera, undistort_image, undistorted_intrinsics
from dfield.data.store import check_shape, stored_stack

IMAGE_EXTS = (".png", ".jpg", ".jpeg")

# Pillow raises any of these for unreadable, truncated or hostile files.
_PIL_ERRORS = (OSError, SyntaxError, ValueError, EOFError, Image.DecompressionBombError)


def scaled_size(width: int, height: int, downscale: float) -> tuple[int, int]:
    """(width, height) after dividing by `downscale`, the size every reader reports for its images."""
    return max(1, round(width / downscale)), max(1, round(height / downscale))


def find_image(base: Path) -> Path:
    """`base` itself, or `base` with an image extension: Blender `file_path`s often omit it."""
    base = Path(base)
    if base.suffix.lower() in IMAGE_EXTS and base.is_file():
        return base
    for ext in IMAGE_EXTS + tuple(e.upper() for e in IMAGE_EXTS):
        candidate = base.with_name(base.name + ext)
        if candidate.is_file():
            return candidate
    # A downscaled folder may hold PNGs of originally-JPEG photos (LLFF, COLMAP `images_k/`).
    if base.suffix.lower() in IMAGE_EXTS:
        for ext in IMAGE_EXTS:
            candidate = base.with_suffix(ext)
            if candidate.is_file():
                return candidate
    raise DataError(f"{base}: image not found (also tried extensions {', '.join(IMAGE_EXTS)})")


def list_images(folder: Path) -> list[Path]:
    """The image files (png, jpg, jpeg, any case) directly in `folder`, sorted by path."""
    return sorted(p for p in Path(folder).iterdir() if p.is_file() and p.suffix.lower() in IMAGE_EXTS)


def pick_image_folder(root: Path, downscale: float) -> tuple[Path, float]:
    """Choose among `images/` and `images_k/` (k times smaller) for `downscale`.

    Returns the folder and the factor still to apply to its images. Prefers the largest k that does
    not exceed `downscale`, so the remaining resize is a reduction; if only smaller folders exist,
    returns the least reduced one with a factor of 1 (the images come out smaller than asked).
    """
    folders = {}
    for p in Path(root).iterdir():
        m = re.fullmatch(r"images(?:_(\d+))?", p.name)
        if p.is_dir() and m and int(m.group(1) or 1) >= 1:
            folders[int(m.group(1) or 1)] = p
    if not folders:
        raise DataError(f"{root}: no images/ or images_N/ folder")
    usable = [k for k in folders if k <= downscale + 1e-6]
    if usable:
        k = max(usable)
        return folders[k], max(1.0, downscale / k)
    k = min(folders)
    warnings.warn(f"{root}: no image folder for downscale {downscale:g}; using {folders[k].name}/ as is", stacklevel=3)
    return folders[k], 1.0


def _open(path: Path) -> Image.Image:
    path = Path(path)
    if not path.is_file():
        raise DataError(f"{path}: image not found")
    try:
        im = Image.open(path)
        im.load()
    except UnidentifiedImageError:
        raise DataError(f"{path}: not an image file (or an unsupported kind)") from None
    except _PIL_ERRORS as e:
        raise DataError(f"{path}: cannot read image ({e})") from None
    if im.width == 0 or im.height == 0:
        raise DataError(f"{path}: image has zero size {im.width}x{im.height}")
    return im


def image_size(path: Path) -> tuple[int, int]:
    """(width, height) from the file header only, to validate a scene before decoding it."""
    path = Path(path)
    if not path.is_file():
        raise DataError(f"{path}: image not found")
    try:
        with Image.open(path) as im:
            w, h = im.size
    except UnidentifiedImageError:
        raise DataError(f"{path}: not an image file (or an unsupported kind)") from None
    except _PIL_ERRORS as e:
        raise DataError(f"{path}: cannot read image ({e})") from None
    if w == 0 or h == 0:
        raise DataError(f"{path}: image has zero size {w}x{h}")
    return w, h


def _box_downscale(x: np.ndarray, size: tuple[int, int]) -> np.ndarray:
    """Mean over pixel blocks of a float (H, W, C) array, resized to `size` = (width, height)."""
    h, w = x.shape[:2]
    if (w, h) == size:
        return x
    kx, ky = w / size[0], h / size[1]
    if kx == ky and kx.is_integer():
        k = int(kx)
        return x.reshape(size[1], k, size[0], k, -1).mean(axis=(1, 3))
    channels = [np.asarray(Image.fromarray(np.ascontiguousarray(x[..., c])).resize(size, Image.Resampling.BOX))
                for c in range(x.shape[2])]
    return np.stack(channels, axis=-1)


def read_image(path: Path, downscale: float = 1.0, background=(1.0, 1.0, 1.0)) -> np.ndarray:
    """uint8 (H, W, 3) image, box-downscaled by `downscale`, any alpha composited onto `background`.

    Alpha is premultiplied before the box filter, so transparent pixels' (meaningless) colours do not
    bleed into edges; compositing after downscaling then equals downscaling the composited image.
    """
    im = _open(path)
    has_alpha = im.mode in ("RGBA", "LA", "PA", "RGBa", "La") or "transparency" in im.info
    try:
        arr = np.asarray(im.convert("RGBA" if has_alpha else "RGB"), dtype=np.float32) / 255.0
    except _PIL_ERRORS as e:
        raise DataError(f"{path}: cannot read image ({e})") from None
    if has_alpha:
        arr = np.concatenate([arr[..., :3] * arr[..., 3:], arr[..., 3:]], axis=-1)
    arr = _box_downscale(arr, scaled_size(im.width, im.height, downscale))
    if has_alpha:
        arr = arr[..., :3] + (1.0 - arr[..., 3:]) * np.asarray(background, dtype=np.float32)
    return np.clip(np.rint(arr * 255.0), 0, 255).astype(np.uint8)


def read_ids(path: Path, downscale: float = 1.0) -> np.ndarray:
    """int16 (H, W) object-id map (8- or 16-bit PNG), downscaled by taking each block's centre pixel.

    Ids are labels, so they are sampled, never averaged.
    """
    im = _open(path)
    if im.mode not in ("L", "P", "I", "I;16", "I;16B", "I;16L"):
        raise DataError(f"{path}: id map must be a single-channel 8- or 16-bit image, got mode {im.mode}")
    ids = np.asarray(im).astype(np.int64)
    if ids.min() < 0 or ids.max() > np.iinfo(np.int16).max:
        raise DataError(f"{path}: object ids must lie in 0..32767, got {ids.min()}..{ids.max()}")
    w, h = scaled_size(im.width, im.height, downscale)
    rows = ((np.arange(h) + 0.5) * (im.height / h)).astype(np.int64)
    cols = ((np.arange(w) + 0.5) * (im.width / w)).astype(np.int64)
    return ids[rows[:, None], cols[None, :]].astype(np.int16)


def read_image_stack(paths: list[Path], downscale: float = 1.0, background=(1.0, 1.0, 1.0),
                     lenses: list[LensCamera | None] | None = None) -> torch.Tensor:
    """uint8 (N, H, W, 3) images of `paths` as `read_image` makes them, decoded once into the on-disk image store
    and memory-mapped from it (`dfield.data.store`): a scene's pixels are never all in memory.

    `lenses[i]`, when given and not None, is image i's distorted camera at the downscaled size; the image is
    undistorted as it is decoded, to the pinhole camera `undistorted_intrinsics(lenses[i])` (the caller's
    intrinsics), so the store holds undistorted pixels and nothing is written into the mapped array afterwards.

    Raises:
        DataError: an unreadable image, or images of different sizes (the sizes are read from the file headers
            before anything is decoded).
    """
    paths = [Path(p) for p in paths]
    sizes = [scaled_size(*image_size(p), downscale) for p in paths]
    for p, s in zip(paths, sizes):
        if s != sizes[0]:
            raise DataError(f"{p}: image is {s[0]}x{s[1]}, but {paths[0]} is {sizes[0][0]}x{sizes[0][1]}; "
                            "all images must have the same size")
    w, h = sizes[0]
    bg = tuple(float(c) for c in background)
    lenses = list(lenses) if lenses is not None else [None] * len(paths)
    settings = f"rgb {float(downscale)!r} {bg!r}"
    if any(cam is not None and cam.distorted for cam in lenses):
        settings += " " + repr([None if c is None else (c.fx, c.fy, c.cx, c.cy, c.width, c.height,
                                                        np.asarray(c.coeffs, np.float64).tolist()) for c in lenses])

    pinholes: dict[int, tuple] = {}  # id(lens) -> its undistorted intrinsics: images of one camera share a lens

    def decode(i: int) -> np.ndarray:
        image = check_shape(read_image(paths[i], downscale, bg), (h, w, 3), paths[i])
        lens = lenses[i]
        if lens is not None:
            if id(lens) not in pinholes:
                pinholes[id(lens)] = undistorted_intrinsics(lens)
            image = undistort_image(image, lens, pinholes[id(lens)])[0]
        return image

    return stored_stack(paths, (len(paths), h, w, 3), np.uint8, decode, settings)


def read_id_stack(paths: list[Path], downscale: float, size: tuple[int, int]) -> torch.Tensor:
    """int16 (N, H, W) object-id maps of `paths` as `read_ids` makes them, `size` = (W, H) after downscaling, kept in
    the image store like `read_image_stack`.

    Raises:
        DataError: an unreadable map, or one whose downscaled size is not `size`.
    """
    paths = [Path(p) for p in paths]
    for p in paths:
        if not p.is_file():
            raise DataError(f"{p}: image not found")
    w, h = size

    def decode(i: int) -> np.ndarray:
        m = read_ids(paths[i], downscale)
        if m.shape != (h, w):
            raise DataError(f"{paths[i]}: id map is {m.shape[1]}x{m.shape[0]} after downscaling, "
                            f"but the images are {w}x{h}")
        return m

    return stored_stack(paths, (len(paths), h, w), np.int16, decode, f"ids {float(downscale)!r}")
