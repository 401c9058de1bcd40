"""One entry point for every scene format: detect it, check the options, call its reader, model it as its scene
type (object, forward-facing or unbounded; `dfield.data.scene_type`)."""

from __future__ import annotations

import math
from pathlib import Path

from dfield.data.blender import read_blender
from dfield.data.colmap import find_model, read_colmap
from dfield.data.dataset import DataError, Dataset
from dfield.data.llff import read_llff
from dfield.data.scene_type import SCENE_TYPES, apply_scene_type
from dfield.data.splits import SPLITS

FORMATS = ("blender", "llff", "colmap")
BACKGROUNDS = {"white": (1.0, 1.0, 1.0), "black": (0.0, 0.0, 0.0)}
LLFF_MODES = ("auto", "ndc", "contract")
LLFF_MODE_SCENE_TYPES = {"ndc": "forward", "contract": "unbounded"}


def detect_format(path: Path) -> str:
    """"blender", "llff" or "colmap" from the files in `path` (a scene folder or its transforms json)."""
    path = Path(path)
    if path.is_file():
        if path.suffix == ".json":
            return "blender"
        if path.name == "poses_bounds.npy":
            return "llff"
        raise DataError(f"{path}: not a scene; give the scene folder")
    if not path.is_dir():
        raise DataError(f"{path}: no such folder")
    if (path / "transforms.json").is_file() or any(path.glob("transforms_*.json")):
        return "blender"
    # LLFF scenes often carry the COLMAP model they came from; poses_bounds.npy is what they mean to use.
    if (path / "poses_bounds.npy").is_file():
        return "llff"
    if find_model(path) is not None:
        return "colmap"
    names = sorted(p.name for p in path.iterdir())
    if not names:
        raise DataError(f"{path}: folder is empty")
    shown = ", ".join(names[:8]) + (", ..." if len(names) > 8 else "")
    raise DataError(f"{path}: unknown scene format (found {shown}); expected transforms*.json (Blender), "
                    "poses_bounds.npy (LLFF) or sparse/0/cameras.bin|txt (COLMAP)")


def requested_scene_type(scene_type: str, llff_mode: str, fmt: str) -> str:
    """The scene type asked for by `scene_type` and, for LLFF scenes, the older `llff_mode` (ndc: forward, contract:
    unbounded; other formats ignore it). Raises DataError when the two disagree."""
    if scene_type not in SCENE_TYPES:
        raise ValueError(f"scene_type must be one of {SCENE_TYPES}, got {scene_type!r}")
    if llff_mode not in LLFF_MODES:
        raise ValueError(f"llff_mode must be one of {LLFF_MODES}, got {llff_mode!r}")
    implied = LLFF_MODE_SCENE_TYPES.get(llff_mode) if fmt == "llff" else None
    if implied is None:
        return scene_type
    if scene_type not in ("auto", implied):
        raise DataError(f"--llff-mode {llff_mode} means --scene-type {implied}, but --scene-type {scene_type} was "
                        "given; drop one of them")
    return implied


def load_dataset(path, split: str = "train", downscale: float = 1.0, *, background="white", holdout_every: int = 8,
                 llff_mode: str = "auto", scene_type: str = "auto", format: str | None = None) -> Dataset:
    """Read one split of the scene at `path`; images come out `downscale` times smaller (a factor >= 1).

    `scene_type` (object, forward, unbounded, or auto: detected from the whole scene's cameras and the images'
    borders) decides the coordinates the scene is modelled in (`dfield.data.scene_type`); the result records it in
    `Dataset.scene_type`. For LLFF scenes `llff_mode` ndc / contract is the older spelling of forward / unbounded.
    """
    path = Path(path)
    if split not in SPLITS:
        raise ValueError(f"split must be one of {SPLITS}, got {split!r}")
    if not (isinstance(downscale, (int, float)) and math.isfinite(downscale) and downscale >= 1):
        raise ValueError(f"downscale must be a number >= 1, got {downscale!r}")
    if isinstance(background, str):
        if background not in BACKGROUNDS:
            raise ValueError(f"background must be one of {tuple(BACKGROUNDS)} or an RGB triple, got {background!r}")
        bg = BACKGROUNDS[background]
    else:
        bg = tuple(float(c) for c in background)
        if len(bg) != 3 or not all(0 <= c <= 1 for c in bg):
            raise ValueError(f"background RGB must be 3 values in [0, 1], got {background!r}")
    if not (isinstance(holdout_every, int) and holdout_every >= 1):
        raise ValueError(f"holdout_every must be an integer >= 1, got {holdout_every!r}")
    if llff_mode not in LLFF_MODES:
        raise ValueError(f"llff_mode must be one of {LLFF_MODES}, got {llff_mode!r}")
    if scene_type not in SCENE_TYPES:
        raise ValueError(f"scene_type must be one of {SCENE_TYPES}, got {scene_type!r}")
    fmt = format or detect_format(path)
    if fmt not in FORMATS:
        raise ValueError(f"format must be one of {FORMATS}, got {fmt!r}")
    if not path.exists():
        raise DataError(f"{path}: no such file or folder")
    kind = requested_scene_type(scene_type, llff_mode, fmt)

    if fmt == "blender":
        data = read_blender(path, split, downscale, bg, holdout_every)
    elif fmt == "llff":
        data = read_llff(path.parent if path.is_file() else path, split, downscale, bg, holdout_every)
    else:
        data = read_colmap(path, split, downscale, bg, holdout_every)
    return apply_scene_type(data, kind)
