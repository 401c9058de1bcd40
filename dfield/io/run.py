"""A run folder is self-describing: config.json + scene.json + checkpoints/ are all that render, eval,
query and edit need (the scene's images are only read again when a command compares against them).

    RUN/config.json      TrainConfig
    RUN/scene.json       bounds, background, NDC settings and training cameras of the scene
    RUN/checkpoints/     step_NNNNNN/ folders and a `latest` pointer (see checkpoint.py)
    RUN/log.jsonl        one line per logged step: loss, PSNR, rays/s, seconds
    RUN/eval.json        written by `dfield eval`
"""

from __future__ import annotations

import json
from dataclasses import asdict, dataclass, field
from pathlib import Path

import torch

from dfield.io.checkpoint import atomic_write_text, latest_checkpoint, load_checkpoint
from dfield.config import FeatureConfig, TrainConfig, from_dict, load_config
from dfield.data.dataset import Cameras, Dataset
from dfield.models.base import Model


class RunError(ValueError):
    """A run folder that is missing, incomplete or unreadable."""


@dataclass
class SceneInfo:
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

    @staticmethod
    def from_dataset(d: Dataset) -> "SceneInfo":
        c = d.cameras
        return SceneInfo(
            aabb=d.aabb.tolist(), near=d.near, far=d.far, background=list(d.background), ndc=d.ndc,
            ndc_focal=d.ndc_focal, ndc_size=list(d.ndc_size), width=d.width, height=d.height, format=d.format,
            source=str(d.source), train_c2w=c.c2w.tolist(),
            train_intrinsics=torch.stack([c.fx, c.fy, c.cx, c.cy], -1).tolist(),
            object_names={str(k): v for k, v in d.object_names.items()},
        )

    def train_cameras(self) -> Cameras:
        k = torch.tensor(self.train_intrinsics, dtype=torch.float32)
        return Cameras(torch.tensor(self.train_c2w, dtype=torch.float32), k[:, 0], k[:, 1], k[:, 2], k[:, 3], self.width, self.height)

    def save(self, path: Path) -> None:
        atomic_write_text(path, json.dumps(asdict(self)))

    @staticmethod
    def load(path: Path) -> "SceneInfo":
        return SceneInfo(**json.loads(Path(path).read_text()))


def build_model(cfg: TrainConfig, scene: SceneInfo) -> Model:
    aabb = torch.tensor(scene.aabb, dtype=torch.float32)
    if cfg.model == "grid":
        import dataclasses

        from dfield.models.grid import GridModel

        grid = cfg.grid
        if cfg.features.teacher:
            grid = dataclasses.replace(grid, field=dataclasses.replace(grid.field, feature_dim=cfg.features.dim))
        return GridModel(aabb, scene.near, scene.far, scene.background, grid, teacher_dim=cfg.features.teacher_dim)
    if cfg.model == "nerf":
        from dfield.models.nerf import NeRFModel

        return NeRFModel(scene.near, scene.far, scene.background, cfg.nerf)
    raise ValueError(f"unknown model {cfg.model!r}: expected 'grid' or 'nerf'")


def load_model_state(model: Model, tensors: dict[str, torch.Tensor], meta: dict) -> None:
    """Reshape the model as the checkpoint recorded, then load weights and extra buffers."""
    model.restructure(meta.get("structure", {}))
    extra_keys = [k for k in tensors if k.startswith("extra.")]
    if hasattr(model, "load_extra_state"):
        model.load_extra_state({k[len("extra."):]: tensors[k] for k in extra_keys})
    sd = {k: v for k, v in tensors.items() if not k.startswith("extra.")}
    missing, unexpected = model.load_state_dict(sd, strict=False)
    if missing or unexpected:
        raise RunError(f"checkpoint does not match the model: missing {missing[:5]}, unexpected {unexpected[:5]}")


def model_tensors(model: Model) -> dict[str, torch.Tensor]:
    out = dict(model.state_dict())
    if hasattr(model, "extra_state"):
        out.update({f"extra.{k}": v for k, v in model.extra_state().items()})
    return out


def with_checkpoint_features(cfg: TrainConfig, meta: dict) -> TrainConfig:
    """The feature settings a checkpoint was saved with win over config.json: `dfield distill` writes the
    checkpoint before the config, and a kill in between must leave a run that still opens."""
    if "features" in meta:
        cfg.features = from_dict(FeatureConfig, meta["features"])
    return cfg


@dataclass
class Run:
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
