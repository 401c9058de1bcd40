"""Typed training configuration: the dataclasses the CLI is generated from and every run folder stores as
config.json (`dfield.io.run.save_config` / `load_config`), and their conversion to and from plain dicts.

Sits above the models (it holds their settings) and below io (which reads and writes it)."""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from pathlib import Path
from typing import Annotated, Literal

import tyro

from dfield.models.blended import BlendConfig
from dfield.models.grid import GridModelConfig
from dfield.models.nerf import NeRFModelConfig


@dataclass
class DataConfig:
    """Where the scene is and how it is loaded: folder, downscaling, background, LLFF mode and test split."""

    path: tyro.conf.Positional[Path] = Path(".")
    """Scene folder: Blender/nerfstudio transforms*.json, LLFF poses_bounds.npy, or COLMAP sparse/0."""
    downscale: float = 1.0
    """Load images this many times smaller (4: 400 px -> 100 px)."""
    background: Literal["white", "black"] = "white"
    """Colour transparent pixels are composited onto, and the colour rendered where rays see nothing."""
    scene_type: Literal["auto", "object", "forward", "unbounded"] = "auto"
    """object: a bounded scene in a box (Blender-like, plain backdrop); forward: a forward-facing capture, modelled
    in NDC (LLFF); unbounded: a 360-degree capture with far surroundings, scaled so the object of interest fills
    the unit ball, the rest contracted (mip-NeRF 360). auto: forward when every camera looks within 30 degrees of
    one direction, else object when the image borders are a plain backdrop, else unbounded. A new run saves what
    auto chose, and trains with that scene type's defaults (see --scene-defaults)."""
    llff_mode: Literal["auto", "ndc", "contract"] = "auto"
    """LLFF scenes, older spelling of --scene-type: ndc = forward, contract = unbounded, auto = --scene-type."""
    holdout_every: int = 8
    """For formats without explicit splits: every Nth image is held out for testing."""
    test_every: int = 1
    """Evaluate on every Nth test view (8 gives the 25-view lego protocol)."""


@dataclass
class FeatureConfig:
    """The feature field distilled from a 2D teacher: teacher, width, loss and when it starts."""

    teacher: str = ""
    """2D teacher to distil into a 3D feature field: '' (none), synthetic, dinov2, clip, files:FOLDER."""
    dim: int = 32
    """Width of the 3D feature field; a learned linear decoder maps it to the teacher's width."""
    weight: float = 1.0
    """lambda in loss = photometric + lambda * feature loss. Density never sees the feature loss (stop-grad)
    and the feature parameters see only it, so with Adam lambda barely matters; it is kept for the paper's form."""
    loss: Literal["l2", "l1"] = "l2"
    start_step: int = 0
    """Radiance first: the feature loss starts at this step (0: joint training from the start)."""
    smooth: str = "auto"
    """Smoother targets: auto (the default: the best variant of the smoothing ablation that needs no weights,
    dfield.features.targets.DEFAULT_SMOOTH, recorded resolved in the run's config), none (the teacher's maps as
    they are), segments:SEGMENTER (blur inside each region of a segmenter's masks: segments:felzenszwalb (offline),
    segments:litemedsam, segments:sam:CHECKPOINT, segments:gt (generated scenes), segments:files:FOLDER), or
    bilateral[:sigma_space=3,sigma_color=0.03] (RGB-guided; what auto is today)."""
    smooth_on: Literal["auto", "renders", "photos"] = "auto"
    """What the masks (and the bilateral guide) are made on: the radiance field's renders of the training views when
    features start (the paper's radiance-first order), or the input photos; auto: renders when start_step > 0."""
    smooth_mode: Literal["blur", "mean"] = "blur"
    """Inside a region: a Gaussian blur of smooth_sigma pixels restricted to it, or the region's mean."""
    smooth_sigma: float = 4.0
    """Gaussian sigma of segment blur, in image pixels."""
    patch: int = 0
    """Once features start, draw rays as P x P pixel patches (same rays per batch) instead of at random (0)."""
    tv: float = 0.0
    """Weight of total variation on rendered (decoded) feature patches; needs patch >= 2. Not the grid TV options
    (grid.tv_density / grid.tv_app), which regularise the volumes."""
    teacher_dim: int = 0
    """Filled in from the teacher when a run is created."""
    method: tyro.conf.Suppress[Literal["joint", "fit", "lift"]] = "joint"
    """How the features were made: joint (trained with the radiance field, from start_step), fit (`dfield distill`:
    a field trained on the frozen radiance field) or lift (`dfield distill --method lift`: per-voxel averages of
    teacher features in teacher space, no learned field, dim 0). Set by the commands, not a training option."""


@dataclass
class TrainConfig:
    """A whole training run: data, model (grid or nerf) and its settings, features, schedule and resources."""

    data: Annotated[DataConfig, tyro.conf.OmitArgPrefixes] = field(default_factory=DataConfig)
    model: Literal["grid", "nerf"] = "grid"
    """grid: factorised TensoRF-style field (fast on a CPU); nerf: the original PE-MLP NeRF (reference).
    ("blended": a guided edit's run, written by `dfield guide-edit`; not trained with `dfield train`.)"""
    grid: GridModelConfig = field(default_factory=GridModelConfig)
    nerf: NeRFModelConfig = field(default_factory=NeRFModelConfig)
    features: FeatureConfig = field(default_factory=FeatureConfig)
    blend: tyro.conf.Suppress[BlendConfig] = field(default_factory=BlendConfig)
    """A guided edit's fields (model "blended" only; set by `dfield guide-edit`)."""
    iterations: int = 4500
    batch_rays: int = 1024
    """Rays per step. 1024 x 4500 steps beat 2048 x 3000 at every 150/300/600 s mark of bench/fit_speed.py on lego
    and fern, and at 150/300 s on a 200 px generated scene (0.14 dB lower when both have finished): twice the
    optimiser steps per second early, when the coarse grid makes steps cheap. With several processes (--nproc,
    torchrun) it is the batch of all of them together, each computing its share."""
    lr_final_ratio: float = 0.1
    """Learning rates decay exponentially to this fraction of their start over the run."""
    ray_streams: int = 0
    """Random ray streams each step's batch is split over (0: one per process the run starts with). Processes share
    the streams out and checkpoints keep every stream's state, so a run resumed with another number of processes
    draws the same rays; the batch, learning rates and steps are per optimiser step, whatever the processes."""
    checkpoint_every: int = 500
    log_every: int = 25
    max_seconds: float = 0.0
    """Stop after this many seconds of training (0: no limit). Evaluation time is not counted. With fit_to_budget the
    schedule is fitted to the budget; the grid's coarse-to-fine steps stay counted in steps."""
    fit_to_budget: bool = True
    """With max_seconds: once the grid's structure has settled, time the steps and move `iterations` so the
    learning-rate schedule ends at the budget (continuing from where it is), instead of ending early and idling or
    being cut before it has decayed. Off when `iterations` was changed from its default (then it is what you asked).
    Lego 100 px, budgets 150 / 300 / 600 s: README "Measured figures"."""
    lr_anchor: tyro.conf.Suppress[tuple[int, float]] = (0, 0.0)
    """(step, fraction of the learning-rate decay done there) where fit_to_budget moved `iterations`: the decay
    continues from that fraction over the new remaining steps, so the rate does not jump. (0, 0.0): not moved."""
    seed: int = 0
    device: str = "cpu"
    threads: int = 0
    """CPU threads for PyTorch (0: PyTorch's default)."""
    scene_defaults: bool = True
    """Train forward-facing and unbounded scenes with their own tuned settings (SCENE_DEFAULTS in dfield/config.py)
    wherever an option is left at its default (object scenes' defaults are the ones shown)."""


# Settings tuned per scene type on this project's 2-core CPU (README "Measured figures"), applied by
# `apply_scene_defaults` to a new run's options that are still at their (object scene) defaults.
SCENE_DEFAULTS: dict[str, dict[str, object]] = {
    "object": {},
    # fern (bench/fit_speed.py, 300 s): 23.07 dB with the object defaults, 23.60 with these. NDC depth needs far
    # fewer cells than the image plane, and view-dependent colour from positional encodings of features and view
    # directions buys nothing on 17 nearby views but costs time.
    "forward": {"grid.voxel_aspect": (1.0, 1.0, 4.0), "grid.field.feat_freqs": 0, "grid.field.view_freqs": 0},
    # Generated 360-degree scene, 128 px, 45 s: with the object defaults every ray's weight starts below the 1e-3
    # that buys a sample its colour, the samples nearest the camera cross it first, and the scene collapses into
    # clouds at the near plane (test 12.5 dB, median depth 0.5 of 3); with 1e-4 it does not (19.7 dB, depth 3.1;
    # the random background made no measurable difference there, README "Scene types").
    # Far content is faint per sample, so empty space stays marked at 1e-4 once settled too (objects: 1e-2 then).
    "unbounded": {"grid.weight_threshold": 1e-4, "grid.random_background": True, "grid.occupancy_threshold_late": 1e-4},
}


def _dotted(cfg, key: str):
    *path, name = key.split(".")
    for part in path:
        cfg = getattr(cfg, part)
    return cfg, name


def apply_scene_defaults(cfg: "TrainConfig", scene_type: str) -> dict[str, object]:
    """Give `cfg` the `SCENE_DEFAULTS` of `scene_type` for every setting still at its TrainConfig() default (a value
    set on purpose stays); returns the settings changed, by dotted name.

    Example:
        >>> cfg = TrainConfig()
        >>> sorted(apply_scene_defaults(cfg, "object"))
        []
    """
    base, changed = TrainConfig(), {}
    for key, value in SCENE_DEFAULTS.get(scene_type, {}).items():
        owner, name = _dotted(cfg, key)
        default_owner, _ = _dotted(base, key)
        if getattr(owner, name) == getattr(default_owner, name) and getattr(owner, name) != value:
            setattr(owner, name, value)
            changed[key] = value
    return changed


def to_dict(cfg) -> dict:
    """A (nested) dataclass -> JSON-able dict (paths as strings, tuples as lists)."""

    def conv(v):
        if dataclasses.is_dataclass(v):
            return {f.name: conv(getattr(v, f.name)) for f in dataclasses.fields(v)}
        if isinstance(v, Path):
            return str(v)
        if isinstance(v, tuple):
            return [conv(x) for x in v]
        return v

    return conv(cfg)


def from_dict(cls, d: dict):
    """Rebuild a (nested) dataclass from `to_dict` output; unknown keys are ignored, missing keep defaults."""
    kwargs = {}
    hints = {f.name: f for f in dataclasses.fields(cls)}
    for name, f in hints.items():
        if name not in d:
            continue
        v = d[name]
        default = f.default_factory() if f.default_factory is not dataclasses.MISSING else f.default
        if dataclasses.is_dataclass(default):
            v = from_dict(type(default), v)
        elif isinstance(default, tuple):
            v = tuple(v)
        elif isinstance(default, Path):
            v = Path(v)
        kwargs[name] = v
    return cls(**kwargs)
