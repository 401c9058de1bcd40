"""The on-disk teacher feature cache: every view's feature map computed once per scene and teacher setting, kept
as fp16 `.npy` files that the trainer memory-maps and samples ray by ray (`FeatureMaps.sample`).

    maps = cached_features(make_teacher("dinov2"), dataset, feature_cache_dir())
    f = maps.sample(view_idx, u, v)                   # (R, D) float32 at image pixel coordinates

In a torch.distributed job (`dfield train --nproc N`, torchrun) each process encodes its contiguous share of the
views into the same file, so N processes fill the cache about N times faster. Maps are written with plain file
writes and read through a memory map whose pages are handed back after every sample (`dfield.data.store.trim`),
so neither writing nor sampling keeps the whole cache in a process's memory.
"""

from __future__ import annotations

import hashlib
import json
import os
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from dfield.core import ranks
from dfield.data.dataset import Dataset
from dfield.data.store import check_free_space, default_cache_dir, no_space, open_mapped, trim
from dfield.errors import TeacherError
from dfield.features.teachers.base import Teacher
from dfield.io.atomic import atomic_path, atomic_write_text

CACHE_FORMAT = 1  # bump when the stored layout or the key recipe changes


def feature_cache_dir() -> Path:
    """Where teacher feature maps are cached: one shared folder for every run, keyed by dataset content."""
    return default_cache_dir() / "features"


def sample_coords(view_idx, u, v, n_views: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """`sample`'s arguments as flat numpy arrays (view int64, u and v float64), an int view spread over every
    coordinate; ValueError for unequal lengths, IndexError for a view outside 0..n_views-1."""
    u = np.asarray(torch.as_tensor(u).detach().cpu(), dtype=np.float64).reshape(-1)
    v = np.asarray(torch.as_tensor(v).detach().cpu(), dtype=np.float64).reshape(-1)
    vi = np.asarray(torch.as_tensor(view_idx).detach().cpu(), dtype=np.int64).reshape(-1)
    if vi.size == 1 and u.size != 1:
        vi = np.full(u.shape, vi[0], dtype=np.int64)
    if not (u.shape == v.shape == vi.shape):
        raise ValueError(f"view_idx, u and v must have the same length, got {vi.shape}, {u.shape}, {v.shape}")
    if vi.size and (vi.min() < 0 or vi.max() >= n_views):
        raise IndexError(f"view index out of range 0..{n_views - 1}")
    return vi, u, v


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
        """D, the number of feature channels."""
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
        n, h, w, _ = self.maps.shape
        vi, u, v = sample_coords(view_idx, u, v, n)
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
        trim(self.maps)  # a cache of thousands of views must not end up resident, page by sampled page
        out = torch.lerp(torch.lerp(c[0], c[1], fx), torch.lerp(c[2], c[3], fx), fy)
        return out if device is None else out.to(device, non_blocking=True)


def _cache_key(teacher: Teacher, data: Dataset) -> str:
    h = hashlib.sha1()
    h.update(f"dfield-features-v{CACHE_FORMAT}\0{teacher.name}\0".encode())
    images = data.images
    h.update(repr(tuple(images.shape)).encode())
    for i in range(len(data)):
        h.update(np.ascontiguousarray(images[i].numpy()).tobytes())
        if i % 64 == 63:
            trim(images)
    trim(images)
    if teacher.uses_object_ids and data.object_ids is not None:
        h.update(b"\0ids")
        for i in range(len(data)):
            h.update(np.ascontiguousarray(data.object_ids[i].numpy()).tobytes())
        trim(data.object_ids)
    h.update(b"\0")
    h.update(teacher.cache_token(data))
    return h.hexdigest()


def _open_cached(npy: Path, meta_path: Path, n: int, teacher: Teacher, image_size) -> FeatureMaps | None:
    if not (npy.is_file() and meta_path.is_file()):
        return None
    try:
        meta = json.loads(meta_path.read_text())
        maps = open_mapped(npy, writable_copy=False)
    except (OSError, ValueError):
        return None
    if (maps.dtype != np.float16 or maps.ndim != 4 or maps.shape[0] != n or list(maps.shape) != meta.get("shape")
            or meta.get("teacher") != teacher.name):
        return None
    return FeatureMaps(maps, image_size, teacher.name, npy)


def cached_features(teacher: Teacher, data: Dataset, cache_dir: Path, batch: int = 8,
                    progress: Callable[[str, int, int, dict | None], None] | None = None) -> FeatureMaps:
    """Teacher features for every view of `data`, computed once and kept in `cache_dir/<key>.npy` (fp16).

    The key is a sha1 of the teacher's name (which carries its settings), every image's bytes, and the
    object-id maps when the teacher reads them; any change computes a new file. Returns FeatureMaps
    whose `maps` are memory-mapped from the cache file. `progress("teacher NAME", views_done, views, None)` is
    called after each batch the teacher encodes (never on a cache hit); in a distributed job every process
    calls this together, encodes its share of the views (`ranks.share`) and counts its own views."""
    cache_dir = Path(cache_dir)
    n = len(data)
    if n == 0:
        raise TeacherError("no views to compute teacher features for")
    image_size = (data.images.shape[2], data.images.shape[1])
    key = ranks.broadcast_object(_cache_key(teacher, data) if ranks.is_main() else None)
    npy, meta_path = cache_dir / f"{key}.npy", cache_dir / f"{key}.json"
    hit = _open_cached(npy, meta_path, n, teacher, image_size) if ranks.is_main() else None
    if ranks.broadcast_object(hit is not None):
        return hit if hit is not None else _open_cached(npy, meta_path, n, teacher, image_size)
    batch = max(1, int(batch))
    mine = ranks.share(n)
    batches = [list(range(s, min(mine.stop, s + batch))) for s in range(mine.start, mine.stop, batch)]

    def encode(idx: list[int]) -> np.ndarray:
        f = torch.as_tensor(teacher.encode_views(data, idx)).detach().float().cpu()
        trim(data.images)
        if f.ndim != 4 or f.shape[0] != len(idx):
            raise TeacherError(f"teacher {teacher.name} returned features of shape {tuple(f.shape)} for "
                               f"{len(idx)} images; expected (N, h, w, D)")
        if not torch.isfinite(f).all():
            raise TeacherError(f"teacher {teacher.name} returned non-finite features for views "
                               f"{idx[0]}..{idx[-1]}")
        return f.numpy().astype(np.float16)

    with torch.inference_mode():
        first = encode(batches[0]) if batches else None
    # Every process must write maps of one shape: the first batch of each says what its teacher returns.
    shapes = ranks.all_gather_object(None if first is None else tuple(first.shape[1:]))
    shape = next(s for s in shapes if s is not None)
    for r, s in enumerate(shapes):
        if s is not None and s != shape:
            raise TeacherError(f"teacher {teacher.name} returned {s} maps for views {ranks.share(n, r).start}.. "
                               f"but {shape} before; every view must match")
    view_bytes = int(np.prod(shape)) * 2

    def write_mine(tmp: str, offset: int) -> None:
        fd = os.open(tmp, os.O_WRONLY)
        try:
            for j, idx in enumerate(batches):
                with torch.inference_mode():
                    f = first if j == 0 else encode(idx)
                if tuple(f.shape[1:]) != shape:
                    raise TeacherError(f"teacher {teacher.name} returned {tuple(f.shape[1:])} maps for views "
                                       f"{idx[0]}..{idx[-1]} but {shape} before; every view must match")
                try:
                    os.pwrite(fd, np.ascontiguousarray(f).tobytes(), offset + idx[0] * view_bytes)
                except OSError as e:
                    err = no_space(e, cache_dir, what, moved_by)
                    if err is not e:
                        raise err from None
                    raise
                if progress is not None:
                    progress(f"teacher {teacher.name}", idx[-1] + 1 - mine.start, len(mine), None)
        finally:
            os.close(fd)

    what, moved_by = f"teacher features ({n} x {' x '.join(map(str, shape))} fp16)", "DFIELD_CACHE_DIR"
    if ranks.is_main():
        cache_dir.mkdir(parents=True, exist_ok=True)
        # The file is made at full size but sparse: a full disk would otherwise surface as an OSError deep in a write.
        check_free_space(cache_dir, n * view_bytes + (64 << 20), what, moved_by)
        with atomic_path(npy) as tmp:
            with open(tmp, "wb") as fh:  # the header, then the file at its full size for every process to fill
                header = {"descr": np.lib.format.dtype_to_descr(np.dtype(np.float16)), "fortran_order": False,
                          "shape": (n, *shape)}
                np.lib.format.write_array_header_1_0(fh, header)
                offset = fh.tell()
                fh.truncate(offset + n * view_bytes)
            ranks.broadcast_object((tmp, offset))
            write_mine(tmp, offset)
            ranks.barrier()  # every share written
        meta = {"teacher": teacher.name, "dim": int(teacher.dim), "shape": [n, *shape],
                "image_size": list(image_size), "views": n, "format": CACHE_FORMAT,
                "images": [str(p) for p in data.image_paths]}
        atomic_write_text(meta_path, json.dumps(meta, indent=1) + "\n", durable=False)
    else:
        tmp, offset = ranks.broadcast_object(None)
        write_mine(tmp, offset)
        ranks.barrier()
    ranks.barrier()  # the file is in place
    return FeatureMaps(open_mapped(npy, writable_copy=False), image_size, teacher.name, npy)
