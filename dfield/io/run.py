"""A run folder is self-describing: config.json + scene.json + checkpoints/ are all that render, eval,
query and edit need (the scene's images are only read again when a command compares against them).

    RUN/config.json      TrainConfig
    RUN/scene.json       bounds, background, NDC settings and training cameras of the scene
    RUN/checkpoints/     step_NNNNNN/ folders and a `latest` pointer (see checkpoint.py)
    RUN/log.jsonl        one line per logged step: loss, PSNR, rays/s, seconds
    RUN/eval.json        written by `dfield eval`

This module also reads the run's data (`load_train_data`, `load_eval_data`) for the commands that compare
against it: training, evaluation, distillation, queries and edits.
"""

from __future__ import annotations

import dataclasses
import json
from dataclasses import asdict, dataclass, field
from pathlib import Path

import torch

from dfield.config import FeatureConfig, TrainConfig, from_dict, to_dict
from dfield.core.contraction import Contraction
from dfield.data import load_dataset
from dfield.data.dataset import Cameras, Dataset
from dfield.errors import RunError
from dfield.io.atomic import atomic_write_text
from dfield.io.checkpoint import latest_checkpoint, load_checkpoint
from dfield.models.base import Model
from dfield.models.blended import BlendedModel
from dfield.models.grid import GridModel
from dfield.models.nerf import NeRFModel


@dataclass
class SceneInfo:
    """What a run keeps of its scene (scene.json), as JSON-able lists: bounds, background, NDC settings, image
    size, source and the training cameras, so a run renders without its dataset."""

    aabb: list
    near: float
    far: float
    background: list
    ndc: bool = False
    ndc_focal: float = 0.0
    ndc_size: list = field(default_factory=lambda: [0, 0])
    width: int = 0
    height: int = 0
    format: str = ""
    source: str = ""
    train_c2w: list = field(default_factory=list)
    train_intrinsics: list = field(default_factory=list)  # [fx, fy, cx, cy] per view
    object_names: dict = field(default_factory=dict)
    scene_type: str = "object"  # object, forward (NDC) or unbounded (contracted)
    scene_from_source: list | None = None  # (4, 4) similarity from the reader's coordinates to the scene's

    @staticmethod
    def from_dataset(d: Dataset) -> "SceneInfo":
        """The scene info of a dataset (the training split: its cameras become `train_c2w` / `train_intrinsics`)."""
        c = d.cameras
        return SceneInfo(
            aabb=d.aabb.tolist(), near=d.near, far=d.far, background=list(d.background), ndc=d.ndc,
            ndc_focal=d.ndc_focal, ndc_size=list(d.ndc_size), width=d.width, height=d.height, format=d.format,
            source=str(d.source), train_c2w=c.c2w.tolist(),
            train_intrinsics=torch.stack([c.fx, c.fy, c.cx, c.cy], -1).tolist(),
            object_names={str(k): v for k, v in d.object_names.items()}, scene_type=d.scene_type,
            scene_from_source=None if d.scene_from_source is None else d.scene_from_source.tolist(),
        )

    def train_cameras(self) -> Cameras:
        """The training cameras as a (CPU, float32) Cameras."""
        k = torch.tensor(self.train_intrinsics, dtype=torch.float32)
        return Cameras(torch.tensor(self.train_c2w, dtype=torch.float32), k[:, 0], k[:, 1], k[:, 2], k[:, 3], self.width, self.height)

    def save(self, path: Path) -> None:
        """Write as JSON to `path`, atomically."""
        atomic_write_text(path, json.dumps(asdict(self)))

    @staticmethod
    def load(path: Path) -> "SceneInfo":
        """Read a scene.json written by `save` (one written before scene types is forward when NDC, else object)."""
        info = json.loads(Path(path).read_text())
        info.setdefault("scene_type", "forward" if info.get("ndc") else "object")
        return SceneInfo(**info)


def build_model(cfg: TrainConfig, scene: SceneInfo) -> Model:
    """A fresh model of the kind and shape `cfg` asks for, over the scene's box (weights not loaded)."""
    aabb = torch.tensor(scene.aabb, dtype=torch.float32)
    if cfg.model in ("grid", "blended"):
        grid = cfg.grid
        if cfg.features.teacher:
            grid = dataclasses.replace(grid, field=dataclasses.replace(grid.field, feature_dim=cfg.features.dim))
        if cfg.model == "blended":  # a guided edit (dfield guide-edit): the grid model, frozen, plus its edit fields
            if scene.scene_type == "unbounded":
                raise RunError("guided edits (dfield guide-edit) model bounded scenes only; this run's scene is "
                               "unbounded (contracted)")
            return BlendedModel(aabb, scene.near, scene.far, scene.background, grid, cfg.features.teacher_dim, cfg.blend)
        contraction = Contraction(grid.contraction) if scene.scene_type == "unbounded" else None
        return GridModel(aabb, scene.near, scene.far, scene.background, grid, teacher_dim=cfg.features.teacher_dim,
                         contraction=contraction)
    if cfg.model == "nerf":
        if scene.scene_type == "unbounded":
            raise RunError("the nerf baseline models bounded scenes only: use --model grid for an unbounded scene, or "
                           "--scene-type object")
        return NeRFModel(scene.near, scene.far, scene.background, cfg.nerf)
    raise ValueError(f"unknown model {cfg.model!r}: expected 'grid' or 'nerf'")


def load_model_state(model: Model, tensors: dict[str, torch.Tensor], meta: dict) -> None:
    """Reshape the model as the checkpoint recorded, then load weights and extra buffers."""
    model.restructure(meta.get("structure", {}))
    model.load_extra_state({k[len("extra."):]: v for k, v in tensors.items() if k.startswith("extra.")})
    sd = {k: v for k, v in tensors.items() if not k.startswith("extra.")}
    missing, unexpected = model.load_state_dict(sd, strict=False)
    if missing or unexpected:
        raise RunError(f"checkpoint does not match the model: missing {missing[:5]}, unexpected {unexpected[:5]}")


def model_tensors(model: Model) -> dict[str, torch.Tensor]:
    """Everything a checkpoint holds of a model: its state dict and its extra state (under `extra.`)."""
    return {**model.state_dict(), **{f"extra.{k}": v for k, v in model.extra_state().items()}}


def with_checkpoint_features(cfg: TrainConfig, meta: dict) -> TrainConfig:
    """`cfg` with the feature settings a checkpoint was saved with, which win over config.json: `dfield distill`
    writes the checkpoint before the config, and a kill in between must leave a run that still opens."""
    if "features" in meta:
        return dataclasses.replace(cfg, features=from_dict(FeatureConfig, meta["features"]))
    return cfg


@dataclass
class Run:
    """An opened run folder: its config (with the checkpoint's feature settings), scene, model in eval mode,
    the checkpoint's step and meta."""

    path: Path
    cfg: TrainConfig
    scene: SceneInfo
    model: Model
    step: int
    meta: dict


def open_run(path, device: str = "cpu", checkpoint: Path | None = None) -> Run:
    """Load a trained run for rendering/evaluation (weights only, model in eval mode)."""
    path = Path(path)
    for name in ("config.json", "scene.json"):
        if not (path / name).is_file():
            raise RunError(f"{path}: not a dfield run folder ({name} missing)")
    cfg = load_config(path / "config.json")
    scene = SceneInfo.load(path / "scene.json")
    ckpt = checkpoint or latest_checkpoint(path / "checkpoints")
    if ckpt is None:
        raise RunError(f"{path}: no checkpoint yet (train first, or wait for the first checkpoint)")
    tensors, _, meta = load_checkpoint(ckpt, device)
    cfg = with_checkpoint_features(cfg, meta)
    model = build_model(cfg, scene).to(device)
    load_model_state(model, tensors, meta)
    model.eval()
    return Run(path, cfg, scene, model, meta["step"], meta)


# ------------------------------------------------------------------------------------------- config and data


def save_config(cfg: TrainConfig, path: Path) -> None:
    """Write `cfg` as JSON, atomically."""
    atomic_write_text(path, json.dumps(to_dict(cfg), indent=1))


def load_config(path: Path) -> TrainConfig:
    """Read a config.json written by `save_config` (unknown keys ignored, missing ones take their defaults). A
    config saved before scene types takes its run's scene type from the scene.json beside it."""
    d = json.loads(Path(path).read_text())
    data = d.get("data", {})
    if isinstance(data, dict) and "scene_type" not in data:
        scene = Path(path).parent / "scene.json"
        data["scene_type"] = SceneInfo.load(scene).scene_type if scene.is_file() else "auto"
        data["llff_mode"] = "auto"  # what it meant then (ndc: NDC, contract: a box) is in the scene type now
    return from_dict(TrainConfig, d)


def load_train_data(cfg: TrainConfig) -> Dataset:
    """The training split of the run's scene, as the run was trained on it."""
    d = cfg.data
    return load_dataset(d.path, "train", d.downscale, background=d.background, holdout_every=d.holdout_every,
                        llff_mode=d.llff_mode, scene_type=d.scene_type)


def load_eval_data(cfg: TrainConfig, split: str = "test", every: int | None = None) -> Dataset:
    """A split of the run's scene, thinned to every `every`-th view (default: the run's `data.test_every`)."""
    d = cfg.data
    data = load_dataset(d.path, split, d.downscale, background=d.background, holdout_every=d.holdout_every,
                        llff_mode=d.llff_mode, scene_type=d.scene_type)
    every = d.test_every if every is None else every
    if every < 1:
        raise ValueError(f"every must be at least 1, got {every}")
    if every > 1:
        data = data.subset(torch.arange(0, len(data), every))
    return data
