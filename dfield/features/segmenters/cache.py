"""The on-disk mask cache: every view's label map computed once per segmenter setting and input, kept as an
int32 `.npy` that is memory-mapped on later runs.

The key is a sha1 of the segmenter's name (which carries its settings), every image's bytes, and whichever of
depth, teacher features and ground-truth ids the segmenter reads; any change computes a new file.
"""

from __future__ import annotations

import hashlib
import json
from collections.abc import Callable, Sequence
from pathlib import Path

import numpy as np
import torch

from dfield.errors import TeacherError
from dfield.features.segmenters.base import Segmenter, SegmentInputs
from dfield.features.teachers.cache import FeatureMaps, default_cache_dir
from dfield.io.atomic import atomic_path, atomic_write_text

CACHE_FORMAT = 1


def segment_cache_dir() -> Path:
    """Where label maps are cached: one shared folder, keyed by content."""
    return default_cache_dir() / "masks"


def _np(a) -> np.ndarray | None:
    if a is None:
        return None
    return a.detach().cpu().numpy() if isinstance(a, torch.Tensor) else np.asarray(a)


def _key(seg: Segmenter, images: np.ndarray, depths, features: FeatureMaps | None, ids) -> str:
    h = hashlib.sha1()
    h.update(f"dfield-masks-v{CACHE_FORMAT}\0{seg.name}\0{images.shape}\0".encode())
    for i in range(len(images)):
        h.update(np.ascontiguousarray(images[i]).tobytes())
    if seg.uses_depth and depths is not None:
        h.update(b"\0depth")
        for i in range(len(depths)):  # rounded: renders repeat to float noise across machines
            h.update(np.round(np.asarray(depths[i], np.float64), 4).astype(np.float32).tobytes())
    if seg.uses_features and features is not None:
        h.update(f"\0features{features.teacher}\0{features.maps.shape}".encode())
        # The teacher cache names its files by content; maps from elsewhere are hashed.
        h.update(features.path.stem.encode() if features.path is not None else
                 hashlib.sha1(np.ascontiguousarray(features.maps).tobytes()).digest())
    if seg.uses_object_ids and ids is not None:
        h.update(b"\0ids")
        for i in range(len(ids)):
            h.update(np.ascontiguousarray(ids[i]).astype(np.int64).tobytes())
    h.update(b"\0")
    h.update(seg.cache_token())
    return h.hexdigest()


def cached_segments(seg: Segmenter, images, cache_dir: Path, depths=None, features: FeatureMaps | None = None,
                    object_ids=None, paths: Sequence[str] = (),
                    progress: Callable[[str, int, int, dict | None], None] | None = None) -> np.ndarray:
    """Label maps int32 (N, H, W) of `images` uint8 (N, H, W, 3) by `seg`, computed once into `cache_dir`.

    `depths` (N, H, W), `features` (teacher maps of the same views), `object_ids` (N, H, W) and `paths` (image
    files) are handed to the segmenter when given. `progress("masks NAME", done, N, stats)` follows the views
    (never on a cache hit). The result is memory-mapped from the cache file.
    """
    images = _np(images)
    if images.ndim != 4 or images.shape[-1] != 3 or images.dtype != np.uint8:
        raise ValueError(f"images must be uint8 (N, H, W, 3), got {images.dtype} {images.shape}")
    depths, object_ids = _np(depths), _np(object_ids)
    if seg.uses_object_ids and object_ids is None:
        raise TeacherError(f"segmenter {seg.name} needs ground-truth object ids; only generated scenes have them")
    n, h, w = images.shape[:3]
    cache_dir = Path(cache_dir)
    cache_dir.mkdir(parents=True, exist_ok=True)
    key = _key(seg, images, depths, features, object_ids)
    npy = cache_dir / f"{key}.npy"
    if npy.is_file():
        try:
            labels = np.load(npy, mmap_mode="r")
            if labels.shape == (n, h, w) and labels.dtype == np.int32:
                return labels
        except (OSError, ValueError):
            pass
    with atomic_path(npy) as tmp:
        out = np.lib.format.open_memmap(tmp, mode="w+", dtype=np.int32, shape=(n, h, w))
        regions = 0
        for i in range(n):
            inputs = SegmentInputs(images[i], None if depths is None else depths[i],
                                   None if features is None else np.asarray(features.maps[i], np.float32),
                                   None if object_ids is None else object_ids[i], i, str(paths[i]) if paths else "")
            labels = np.asarray(seg.segment(inputs))
            if labels.shape != (h, w):
                raise TeacherError(f"segmenter {seg.name} returned labels of shape {labels.shape} for a "
                                   f"{h}x{w} image (view {i})")
            out[i] = labels
            regions += int(labels.max())
            if progress is not None:
                progress(f"masks {seg.name.split('(')[0]}", i + 1, n, {"regions/view": regions / (i + 1)})
        out.flush()
        del out
    meta = {"segmenter": seg.name, "shape": [n, h, w], "format": CACHE_FORMAT, "images": [str(p) for p in paths]}
    atomic_write_text(cache_dir / f"{key}.json", json.dumps(meta, indent=1) + "\n", durable=False)
    return np.load(npy, mmap_mode="r")
