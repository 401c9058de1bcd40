"""Feature targets of a run: the teacher's maps as they are, or smoothed (dfield.features.smoothing) on either the
input photos or the radiance field's renders of the training views (radiance first, then features).

    maps = smooth_targets(raw_maps, data, "segments:felzenszwalb", renders=render_views(model, data))
"""

from __future__ import annotations

import json
from collections.abc import Callable
from pathlib import Path

import numpy as np
import torch

from dfield.core.image_rendering import ndc_of, render_image
from dfield.data.dataset import Dataset
from dfield.errors import TeacherError
from dfield.features.segmenters import cached_segments, make_segmenter, segment_cache_dir
from dfield.features.smoothing import SmoothSpec, open_windows, smoothed_maps
from dfield.features.teachers.cache import FeatureMaps, feature_cache_dir
from dfield.features.windowed_maps import WindowedMaps
from dfield.io.atomic import atomic_write_text
from dfield.models.base import Model

Progress = Callable[[str, int, int, dict | None], None]

# What "auto" (the default of `dfield train --features.teacher ...` and `dfield distill`) smooths the targets with:
# the winner of bench/smoothness.py on the generated scenes among the variants that need no weights (README "Smooth
# features"). The RGB-guided bilateral filter with a narrow colour sigma raised 3D click IoU, its worst object,
# boundary F, 2D queries and mIoU on four generated scenes, with 3D patch IoU equal or higher (-0.004 on one); the
# offline Felzenszwalb regions cut objects into pieces and patch TV lowered the 2D query masks.
DEFAULT_SMOOTH = "bilateral:sigma_space=3,sigma_color=0.03"


def resolve_smooth(spec: str) -> str:
    """A --features.smooth value as it is used: "auto" -> DEFAULT_SMOOTH, "none" or "" -> "" (raw targets), any
    other spec unchanged.

    Example:
        >>> resolve_smooth("none"), resolve_smooth("bilateral")
        ('', 'bilateral')
    """
    spec = str(spec).strip()
    if spec == "auto":
        spec = DEFAULT_SMOOTH
    return "" if spec in ("", "none", "auto") else spec


@torch.no_grad()
def render_views(model: Model, data: Dataset, device="cpu", chunk: int = 8192,
                 progress: Progress | None = None) -> dict[str, np.ndarray]:
    """The model's renders of every view of `data`: rgb uint8 (N, H, W, 3) and depth float32 (N, H, W)."""
    rgb, depth = [], []
    for i in range(len(data)):
        out = render_image(model, data.cameras, i, ndc_of(data), chunk, device)
        rgb.append((out["rgb"].clamp(0, 1) * 255).round().to(torch.uint8).numpy())
        depth.append(out["depth"].float().numpy())
        if progress is not None:
            progress("render views", i + 1, len(data), None)
    return {"rgb": np.stack(rgb), "depth": np.stack(depth)}


def smooth_targets(raw: FeatureMaps, data: Dataset, smooth: str, renders: dict[str, np.ndarray] | None = None,
                   sigma: float = 4.0, mode: str = "blur", progress: Progress | None = None) -> FeatureMaps | WindowedMaps:
    """`raw` teacher maps of `data`'s views smoothed by `smooth` (a --features.smooth spec), on the `renders`
    (from `render_views`) when given, else on the photos. Masks and targets are cached on disk."""
    spec = SmoothSpec.parse(smooth)
    images = renders["rgb"] if renders is not None else data.images.numpy()
    depth = renders["depth"] if renders is not None else None
    labels = None
    if spec.kind == "segments":
        seg = make_segmenter(spec.segmenter)
        labels = cached_segments(seg, images, segment_cache_dir(), depths=depth, features=raw,
                                 object_ids=data.object_ids, paths=[str(p) for p in data.image_paths],
                                 progress=progress)
    return smoothed_maps(raw, images, spec, feature_cache_dir() / "smoothed", labels, sigma, mode, progress=progress)


def save_targets_record(run_dir: Path, maps: FeatureMaps | WindowedMaps, source: str, step: int,
                        smooth: str = "") -> None:
    """Remember in RUN/targets.json which smoothed maps a run trains on, so a resumed run reuses them (renders made
    again from later weights would differ). `smooth` is the spec that made them (windowed targets need it back)."""
    record = {"path": str(maps.path), "teacher": maps.teacher, "source": source, "step": step,
              "image_size": list(maps.image_size)}
    if isinstance(maps, WindowedMaps):
        record.update(kind="windows", cells=str(maps.cells.path), cells_teacher=maps.cells.teacher,
                      cells_shape=list(maps.cells.maps.shape), shape=list(maps.coef.shape), smooth=smooth)
    else:
        record["shape"] = list(maps.maps.shape)
    atomic_write_text(Path(run_dir) / "targets.json", json.dumps(record, indent=1) + "\n")


def load_targets_record(run_dir: Path) -> FeatureMaps | WindowedMaps | None:
    """The smoothed maps RUN/targets.json names, or None when there is no record or its file is gone or changed."""
    f = Path(run_dir) / "targets.json"
    if not f.is_file():
        return None
    try:
        rec = json.loads(f.read_text())
        if rec.get("kind") == "windows":
            cells = np.load(rec["cells"], mmap_mode="r")
            if list(cells.shape) != rec.get("cells_shape") or cells.dtype != np.float16:
                return None
            raw = FeatureMaps(cells, tuple(rec["image_size"]), rec.get("cells_teacher", ""), Path(rec["cells"]))
            maps = open_windows(raw, Path(rec["path"]), SmoothSpec.parse(rec["smooth"]).sigma_space, rec.get("teacher", ""))
            return maps if maps is not None and list(maps.coef.shape) == rec.get("shape") else None
        maps = np.load(rec["path"], mmap_mode="r")
    except (OSError, ValueError, KeyError, TeacherError):
        return None
    if list(maps.shape) != rec.get("shape") or maps.dtype != np.float16:
        return None
    return FeatureMaps(maps, tuple(rec["image_size"]), rec.get("teacher", ""), Path(rec["path"]))
