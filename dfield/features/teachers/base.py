"""The 2D teacher interface, the teacher registry and the on-disk feature cache.

A teacher turns images into dense per-pixel feature maps at its own (usually lower) resolution; a
3D feature field is then distilled from those maps. Features are computed once per scene and kept
in a cache folder as fp16 `.npy` files that the trainer memory-maps and samples ray by ray.

Adding a teacher (the Python hook):

    import torch
    from dfield.features.teachers import Teacher, register_teacher

    class MyTeacher(Teacher):
        def __init__(self, scale=0.5):
            self.name = f"mine(scale={scale})"   # every setting that changes the output goes in here
            self.dim = 64
            self.scale = scale
        def encode(self, images, object_ids=None):  # uint8 (N, H, W, 3) -> float32 (N, h, w, 64)
            ...

    register_teacher("mine", MyTeacher)          # then make_teacher("mine", scale=0.25)

`make_teacher("name:arg", **kw)` calls the factory as `factory(arg, **kw)` (or `factory(**kw)`
without an argument), so "files:/data/feats" becomes `FileTeacher("/data/feats")`.
"""

from __future__ import annotations

import hashlib
import json
import os
import tempfile
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from dfield.data.dataset import Dataset

CACHE_FORMAT = 1  # bump when the stored layout or the key recipe changes


class TeacherError(ValueError):
    """A teacher cannot be built or run (missing package, weights or files). The message says what to do."""


class Teacher:
    """Base class: set `name` (a stable id that includes every output-changing setting) and `dim`."""

    name: str = "teacher"
    dim: int = 0
    text_aligned: bool = False  # True when encode_text() maps text into the same space as the features
    uses_object_ids: bool = False  # True when encode() reads ground-truth object ids (part of the cache key)

    def encode(self, images: torch.Tensor, object_ids: torch.Tensor | None = None) -> torch.Tensor:
        """uint8 (N, H, W, 3) -> float32 (N, h, w, D) dense feature maps at the teacher's own resolution.

        Cell (j, i) of an h x w map covers the image rectangle [i W/w, (i+1) W/w) x [j H/h, (j+1) H/h),
        so the map is aligned with the whole image (see FeatureMaps.sample)."""
        raise NotImplementedError

    def encode_text(self, texts: list[str]) -> torch.Tensor:
        """(T, D) text embeddings in the feature space; only text-aligned teachers have one."""
        raise TeacherError(f"{self.name} has no text encoder; use a patch or click query")

    # Hooks used by cached_features; the defaults suit any teacher that only looks at pixels.
    def encode_views(self, data: Dataset, idx: Sequence[int]) -> torch.Tensor:
        """Features of the views `idx` of `data` (teachers that need file names override this)."""
        idx = list(idx)
        ids = None
        if self.uses_object_ids:
            if data.object_ids is None:
                raise TeacherError(f"teacher {self.name} needs ground-truth object ids; this scene has none "
                                   "(only generated scenes carry them)")
            ids = data.object_ids[idx]
        return self.encode(data.images[idx], ids)

    def cache_token(self, data: Dataset) -> bytes:
        """Extra bytes for the cache key beyond the teacher name and the image bytes (e.g. source-file stamps)."""
        return b""

    def __repr__(self) -> str:
        return f"<{type(self).__name__} {self.name} dim={self.dim}>"


# ---------------------------------------------------------------------------------------- registry

_REGISTRY: dict[str, Callable[..., Teacher]] = {}


def register_teacher(name: str, factory: Callable[..., Teacher]) -> None:
    """Make `make_teacher(name, ...)` / `make_teacher("name:arg", ...)` call `factory` (replaces an earlier one)."""
    if not name or ":" in name:
        raise ValueError(f"teacher name must be non-empty and contain no ':', got {name!r}")
    _REGISTRY[name] = factory


def teacher_names() -> list[str]:
    return sorted(_REGISTRY)


def _parse_value(v: str):
    for cast in (int, float):
        try:
            return cast(v)
        except ValueError:
            pass
    return v


def make_teacher(spec: str, **kw) -> Teacher:
    """Build a teacher from a spec: "synthetic", "dinov2", "clip", "files:<folder>" or a registered name.

    Settings ride along as "name:key=value,key=value" (e.g. "dinov2:block=7,input_size=518",
    "synthetic:noise=0.8"); an argument without "=" is passed positionally ("files:feats/", "clip:PATH").
    """
    name, sep, arg = str(spec).partition(":")
    factory = _REGISTRY.get(name)
    if factory is None:
        raise TeacherError(f"unknown teacher {spec!r}; known: {', '.join(teacher_names())} "
                           "(add one with dfield.features.teachers.register_teacher)")
    if sep and "=" in arg:
        for item in arg.split(","):
            key, eq, value = item.partition("=")
            if not eq or not key.strip():
                raise TeacherError(f"teacher settings must be key=value pairs, got {item!r} in {spec!r}")
            kw[key.strip()] = _parse_value(value.strip())
        try:
            return factory(**kw)
        except TypeError as e:
            raise TeacherError(f"bad settings for teacher {name!r} in {spec!r}: {e}") from None
    return factory(arg, **kw) if sep else factory(**kw)


def _files_factory(folder=None, **kw):
    from dfield.features.teachers.files import FileTeacher

    if not folder:
        raise TeacherError("the files teacher needs a folder: files:<folder>")
    return FileTeacher(folder, **kw)


def _lazy(module: str, cls: str):
    def factory(*args, **kw):
        import importlib

        return getattr(importlib.import_module(module), cls)(*args, **kw)

    return factory


register_teacher("synthetic", _lazy("dfield.features.teachers.synthetic", "SyntheticTeacher"))
register_teacher("dinov2", _lazy("dfield.features.teachers.dinov2_onnx", "DinoV2Teacher"))
register_teacher("clip", _lazy("dfield.features.teachers.clip", "ClipTeacher"))
register_teacher("files", _files_factory)


def default_cache_dir() -> Path:
    """$DFIELD_CACHE_DIR, else $XDG_CACHE_HOME/dfield, else ~/.cache/dfield (for converted model files)."""
    if os.environ.get("DFIELD_CACHE_DIR"):
        return Path(os.environ["DFIELD_CACHE_DIR"]).expanduser()
    base = os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache"
    return Path(base).expanduser() / "dfield"


def atomic_write_bytes(path: Path, data: bytes) -> None:
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        with os.fdopen(fd, "wb") as f:
            f.write(data)
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def resize_normalize(images: torch.Tensor, input_size: int, patch: int, mean, std) -> torch.Tensor:
    """uint8 (N, H, W, 3) -> float32 (N, 3, h', w') for a ViT: shorter side ~`input_size`, both sides rounded
    to multiples of `patch` (so the token grid covers the whole image, aspect kept up to that rounding),
    antialiased bilinear resize, then (pixels / 255 - mean) / std."""
    x = torch.as_tensor(images).permute(0, 3, 1, 2).float() / 255.0
    H, W = x.shape[2:]
    s = input_size / min(H, W)
    h = max(patch, round(H * s / patch) * patch)
    w = max(patch, round(W * s / patch) * patch)
    if (h, w) != (H, W):
        x = torch.nn.functional.interpolate(x, size=(h, w), mode="bilinear", align_corners=False, antialias=True)
    m = torch.tensor(mean, dtype=torch.float32).view(1, 3, 1, 1)
    sd = torch.tensor(std, dtype=torch.float32).view(1, 3, 1, 1)
    return ((x - m) / sd).contiguous()


# ------------------------------------------------------------------------------------ feature maps


@dataclass
class FeatureMaps:
    """Teacher features of every view of a dataset: `maps` is (N, h, w, D) fp16, usually memory-mapped."""

    maps: np.ndarray
    image_size: tuple[int, int]  # (width, height) of the dataset images the maps are aligned with
    teacher: str = ""
    path: Path | None = None

    def __len__(self) -> int:
        return self.maps.shape[0]

    @property
    def dim(self) -> int:
        return self.maps.shape[-1]

    @property
    def resolution(self) -> tuple[int, int]:
        """(w, h) of each feature map."""
        return self.maps.shape[2], self.maps.shape[1]

    def view(self, i: int) -> torch.Tensor:
        """float32 (h, w, D) map of view `i`."""
        return torch.from_numpy(np.asarray(self.maps[i], dtype=np.float32))

    def sample(self, view_idx, u, v, device=None) -> torch.Tensor:
        """Bilinearly sample features at image pixel coordinates -> float32 (R, D) torch tensor.

        `view_idx` (R,) or an int, `u` (R,) x and `v` (R,) y in the dataset's image pixels, where pixel
        (i, j) has its centre at (i + 0.5, j + 0.5). Feature cells are spread evenly over the image
        (cell centres at (k + 0.5) W / w), and coordinates beyond the outer cell centres take the edge
        value, like grid_sample(align_corners=False, padding_mode="border"). The result is on `device`
        (default CPU)."""
        u = np.asarray(torch.as_tensor(u).detach().cpu(), dtype=np.float64).reshape(-1)
        v = np.asarray(torch.as_tensor(v).detach().cpu(), dtype=np.float64).reshape(-1)
        vi = np.asarray(torch.as_tensor(view_idx).detach().cpu(), dtype=np.int64).reshape(-1)
        if vi.size == 1 and u.size != 1:
            vi = np.full(u.shape, vi[0], dtype=np.int64)
        if not (u.shape == v.shape == vi.shape):
            raise ValueError(f"view_idx, u and v must have the same length, got {vi.shape}, {u.shape}, {v.shape}")
        n, h, w, _ = self.maps.shape
        if vi.size and (vi.min() < 0 or vi.max() >= n):
            raise IndexError(f"view index out of range 0..{n - 1}")
        width, height = self.image_size
        x = np.clip(u * (w / width) - 0.5, 0, w - 1)
        y = np.clip(v * (h / height) - 0.5, 0, h - 1)
        x0 = np.floor(x).astype(np.int64)
        y0 = np.floor(y).astype(np.int64)
        x1, y1 = np.minimum(x0 + 1, w - 1), np.minimum(y0 + 1, h - 1)
        fx = torch.from_numpy((x - x0).astype(np.float32))[:, None]
        fy = torch.from_numpy((y - y0).astype(np.float32))[:, None]
        flat = self.maps.reshape(n * h * w, -1)  # a view (also of a memmap): one gather for all four corners
        base = vi * (h * w)
        rows = np.concatenate([base + y0 * w + x0, base + y0 * w + x1, base + y1 * w + x0, base + y1 * w + x1])
        c = torch.from_numpy(np.ascontiguousarray(flat[rows])).float().reshape(4, -1, flat.shape[1])
        out = torch.lerp(torch.lerp(c[0], c[1], fx), torch.lerp(c[2], c[3], fx), fy)
        return out if device is None else out.to(device, non_blocking=True)


def _cache_key(teacher: Teacher, data: Dataset) -> str:
    h = hashlib.sha1()
    h.update(f"dfield-features-v{CACHE_FORMAT}\0{teacher.name}\0".encode())
    images = data.images
    h.update(repr(tuple(images.shape)).encode())
    for i in range(len(data)):
        h.update(np.ascontiguousarray(images[i].numpy()).tobytes())
    if teacher.uses_object_ids and data.object_ids is not None:
        h.update(b"\0ids")
        for i in range(len(data)):
            h.update(np.ascontiguousarray(data.object_ids[i].numpy()).tobytes())
    h.update(b"\0")
    h.update(teacher.cache_token(data))
    return h.hexdigest()


def _open_cached(npy: Path, meta_path: Path, n: int, teacher: Teacher, image_size) -> FeatureMaps | None:
    if not (npy.is_file() and meta_path.is_file()):
        return None
    try:
        meta = json.loads(meta_path.read_text())
        maps = np.load(npy, mmap_mode="r")
    except (OSError, ValueError):
        return None
    if (maps.dtype != np.float16 or maps.ndim != 4 or maps.shape[0] != n or list(maps.shape) != meta.get("shape")
            or meta.get("teacher") != teacher.name):
        return None
    return FeatureMaps(maps, image_size, teacher.name, npy)


def cached_features(teacher: Teacher, data: Dataset, cache_dir: Path, batch: int = 8, progress=True) -> FeatureMaps:
    """Teacher features for every view of `data`, computed once and kept in `cache_dir/<key>.npy` (fp16).

    The key is a sha1 of the teacher's name (which carries its settings), every image's bytes, and the
    object-id maps when the teacher reads them; any change computes a new file. Returns FeatureMaps
    whose `maps` are memory-mapped from the cache file."""
    cache_dir = Path(cache_dir)
    cache_dir.mkdir(parents=True, exist_ok=True)
    n = len(data)
    if n == 0:
        raise TeacherError("no views to compute teacher features for")
    image_size = (data.images.shape[2], data.images.shape[1])
    key = _cache_key(teacher, data)
    npy, meta_path = cache_dir / f"{key}.npy", cache_dir / f"{key}.json"
    hit = _open_cached(npy, meta_path, n, teacher, image_size)
    if hit is not None:
        return hit

    from rich.progress import (BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn,
                               TimeRemainingColumn)

    batch = max(1, int(batch))
    fd, tmp = tempfile.mkstemp(dir=cache_dir, prefix=f".{key}.", suffix=".npy.tmp")
    os.close(fd)
    out = None
    try:
        bar = Progress(TextColumn(f"[bold]teacher {teacher.name}"), BarColumn(), MofNCompleteColumn(),
                       TimeElapsedColumn(), TimeRemainingColumn(), disable=not progress, transient=True)
        with bar, torch.inference_mode():
            task = bar.add_task("features", total=n)
            for start in range(0, n, batch):
                idx = list(range(start, min(n, start + batch)))
                f = torch.as_tensor(teacher.encode_views(data, idx)).detach().float().cpu()
                if f.ndim != 4 or f.shape[0] != len(idx):
                    raise TeacherError(f"teacher {teacher.name} returned features of shape {tuple(f.shape)} for "
                                       f"{len(idx)} images; expected (N, h, w, D)")
                if out is None:
                    shape = (n, *f.shape[1:])
                    out = np.lib.format.open_memmap(tmp, mode="w+", dtype=np.float16, shape=shape)
                elif tuple(f.shape[1:]) != out.shape[1:]:
                    raise TeacherError(f"teacher {teacher.name} returned {tuple(f.shape[1:])} maps for views "
                                       f"{idx[0]}..{idx[-1]} but {out.shape[1:]} before; every view must match")
                if not torch.isfinite(f).all():
                    raise TeacherError(f"teacher {teacher.name} returned non-finite features for views "
                                       f"{idx[0]}..{idx[-1]}")
                out[start:start + len(idx)] = f.numpy().astype(np.float16)
                bar.advance(task, len(idx))
        out.flush()
        del out
        os.replace(tmp, npy)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
    meta = {"teacher": teacher.name, "dim": int(teacher.dim), "shape": list(np.load(npy, mmap_mode="r").shape),
            "image_size": list(image_size), "views": n, "format": CACHE_FORMAT,
            "images": [str(p) for p in data.image_paths]}
    atomic_write_bytes(meta_path, (json.dumps(meta, indent=1) + "\n").encode())
    return FeatureMaps(np.load(npy, mmap_mode="r"), image_size, teacher.name, npy)
