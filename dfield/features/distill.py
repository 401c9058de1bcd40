"""Add features to a trained run and save them into it (what `dfield distill` does): features second (a feature
field fitted on the frozen radiance field, dfield.features.fitting) or one-pass lifting (dfield.features.lifting).

The result goes into the run folder: a new checkpoint at the same step holding the feature field (or the lifted
grid), config.json's `features` section, and RUN/distill.json. Radiance weights are untouched.
"""

from __future__ import annotations

import dataclasses
import json
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import torch
from safetensors.torch import load_file

from dfield.config import to_dict
from dfield.core.metrics import PeakMemory
from dfield.core.rays import RayBatcher
from dfield.data.dataset import Dataset
from dfield.errors import RunError
from dfield.features.fitting import SamplePool, fit_features, ray_feature_loss
from dfield.features.lifting import lift_features
from dfield.features.segmenters import make_segmenter
from dfield.features.smoothing import SmoothSpec
from dfield.features.targets import render_views, resolve_smooth, smooth_targets
from dfield.features.teachers import cached_features, feature_cache_dir, make_teacher
from dfield.io.atomic import atomic_write_text
from dfield.io.checkpoint import latest_checkpoint, save_checkpoint
from dfield.io.run import load_config, load_train_data, model_tensors, open_run, save_config
from dfield.models.grid import GridModel

Progress = Callable[[str, int, int, dict | None], None]


@dataclass
class Distilled:
    """What `distill` made: the run, its model as saved, and the summary written to RUN/distill.json."""

    run: Path
    model: GridModel  # as saved: what open_run(run).model renders
    summary: dict  # what RUN/distill.json holds
    checkpoint: Path | None = None  # the checkpoint it wrote


def distill(run, teacher: str, method: str = "fit", iterations: int = 1000, dim: int = 32, batch_rays: int = 2048,
            loss: str = "l2", lift_voxels: int = 96**3, device: str = "cpu", threads: int = 0,
            smooth: str = "auto", smooth_on: str = "renders", smooth_mode: str = "blur", smooth_sigma: float = 4.0,
            patch: int = 0, tv: float = 0.0, progress: Progress | None = None) -> Distilled:
    """Add teacher features to a trained run and save them into it.

    method "fit" trains a `dim`-wide feature field and decoder on the frozen radiance field for `iterations`
    steps of `batch_rays` rays; "lift" averages teacher features into `lift_voxels` cells in one pass.
    `smooth` (a --features.smooth spec; "auto": dfield.features.targets.DEFAULT_SMOOTH, "none": raw targets) smooths
    the teacher targets first, with masks made on the trained field's renders of the training views
    (`smooth_on="renders"`, the paper's order) or on the photos; `patch` and `tv`
    draw fit rays as patches with total variation on them (fit only).
    Any features the run had before are replaced. Everything is checked before anything is written.
    `progress(label, done, total, stats)` is called as teacher maps are computed and as fitting/lifting runs.

    Example:
        >>> d = distill("runs/toy", "synthetic", method="lift")   # doctest: +SKIP
        >>> d.summary["seconds"], d.summary["lift_cells"]         # doctest: +SKIP
    """
    _check_options(method, loss, iterations, dim, batch_rays, lift_voxels)
    smooth = resolve_smooth(smooth)
    if smooth_on not in ("renders", "photos") or patch < 0 or tv < 0 or (tv > 0 and patch < 2) or smooth_sigma <= 0:
        raise ValueError(f"bad smoothing options: smooth_on {smooth_on!r} (renders|photos), patch {patch} (>= 0; "
                         f">= 2 with tv), tv {tv} (>= 0), smooth_sigma {smooth_sigma} (> 0)")
    if smooth:
        spec = SmoothSpec.parse(smooth)
        if spec.kind == "segments":
            make_segmenter(spec.segmenter)
    if threads > 0:
        torch.set_num_threads(threads)
    run = Path(run)
    if (run / "config.json").is_file() and (model := load_config(run / "config.json").model) != "grid":
        raise RunError(f"{run}: feature fields need a grid model; this run is --model {model}")
    with PeakMemory() as mem:
        ckpt = latest_checkpoint(run / "checkpoints")
        r = open_run(run, device, checkpoint=ckpt)  # RunError for a missing folder or no checkpoint
        t = make_teacher(teacher)
        data = load_train_data(r.cfg)
        t0 = time.perf_counter()
        maps = cached_features(t, data, feature_cache_dir(), progress=progress)
        teacher_s = time.perf_counter() - t0
        smooth_s, pool, pool_s = 0.0, None, 0.0
        if smooth:
            t1 = time.perf_counter()
            renders = None
            if smooth_on == "renders" and method == "fit":
                # One march finds every pixel's visible samples for the fit and renders the views for the masks.
                t2 = time.perf_counter()
                pool = SamplePool(r.model, data, progress=progress, renders=True)
                renders, pool_s = pool.renders, time.perf_counter() - t2
            elif smooth_on == "renders":
                renders = render_views(r.model, data, device, progress=progress)
            maps = smooth_targets(maps, data, smooth, renders, smooth_sigma, smooth_mode, progress=progress)
            smooth_s = time.perf_counter() - t1 - pool_s  # the march is the fit's (it would run there anyway)
        before = _optimised_params(r.model)
        if method == "fit":
            stats = _fit(r.model, data, maps, t.dim, dim, iterations, batch_rays, loss, r.cfg.seed, patch, tv, progress,
                         pool)
            stats["seconds"] += pool_s
        else:
            stats = _lift(r.model, data, maps, lift_voxels, batch_rays, loss, r.cfg.seed, progress)
    features = dataclasses.replace(r.cfg.features, teacher=teacher, dim=dim if method == "fit" else 0, loss=loss,
                                   teacher_dim=t.dim, method=method, smooth=smooth, smooth_on=smooth_on,
                                   smooth_mode=smooth_mode, smooth_sigma=smooth_sigma,
                                   patch=patch if method == "fit" else 0, tv=tv if method == "fit" else 0.0)
    summary = {"method": method, "teacher": teacher, "teacher_name": t.name, "teacher_dim": t.dim,
               "dim": features.dim, "step": r.step, "views": len(data), "teacher_seconds": teacher_s,
               "smooth": smooth, "smooth_seconds": smooth_s,
               **stats, "peak_rss_bytes": mem.rss_bytes}
    saved = _save(run, ckpt, r.model, before, features, summary)
    return Distilled(run, r.model, summary, saved)


def _check_options(method, loss, iterations, dim, batch_rays, lift_voxels) -> None:
    if method not in ("fit", "lift"):
        raise ValueError(f"unknown method {method!r}: expected 'fit' or 'lift'")
    if loss not in ("l2", "l1"):
        raise ValueError(f"unknown loss {loss!r}: expected 'l2' or 'l1'")
    for name, value, low in (("iterations", iterations, 1), ("dim", dim, 1), ("batch-rays", batch_rays, 1),
                             ("lift-voxels", lift_voxels, 8)):
        if value < low:
            raise ValueError(f"--{name} must be at least {low}, got {value}")


def _fit(model: GridModel, data: Dataset, maps, teacher_dim, dim, iterations, batch_rays, loss, seed, patch, tv,
         progress, pool: SamplePool | None = None) -> dict:
    model.add_feature_field(dim, teacher_dim)
    stats = fit_features(model, data, maps, iterations, batch_rays, loss=loss, seed=seed, patch=patch, tv=tv,
                         progress=progress, pool=pool)
    return {"seconds": stats["seconds"], "iterations": iterations, "loss": stats["loss"], "loss_kind": loss,
            "loss_note": "last training batch"}


def _lift(model: GridModel, data: Dataset, maps, n_voxels, batch_rays, loss, seed, progress) -> dict:
    model.set_lifted_features(lift_features(model, data, maps, n_voxels=n_voxels, progress=progress))
    lifted = model.lifted
    # No training loss to report: the same measure on one batch of training rays makes it comparable with fit.
    rays, _, ids = RayBatcher(data, batch_rays, seed=seed).sample()
    with torch.no_grad():
        value = ray_feature_loss(model, data, maps, rays.to(model.field.aabb.device), ids, loss).item()
    cells = int((lifted.rows > 0).sum())
    return {"seconds": lifted.seconds, "iterations": 0, "loss": value, "loss_kind": loss,
            "loss_note": f"one batch of {batch_rays} training rays", "lift_res": list(lifted.res),
            "lift_cells": cells, "lift_dims": lifted.grid.shape[1], "lift_bytes": cells * (lifted.grid.shape[1] * 2 + 4)}


def _optimised_params(model: GridModel) -> list[torch.nn.Parameter]:
    """The trainer's optimiser order: optimiser state in a checkpoint is indexed by position in this list."""
    return [p for g in model.param_groups() for p in g["params"]]


def _carry_optimizer(trainer_t: dict, groups: list[dict], before: list, model: GridModel) -> tuple[dict, list[dict]]:
    """Re-index the trainer's Adam state for the model's new parameter list, so `dfield resume` continues with
    the radiance moments it had. Parameters that are new (the feature branch) start without state; groups that
    are new (feature_grid/feature_network) start from the model's own settings."""
    new_groups = model.param_groups()
    if sum(len(g["params"]) for g in groups) != len(before):
        raise RunError("the checkpoint's optimiser state does not match the model; was it written by dfield train?")
    where = {id(p): j for j, p in enumerate(p for g in new_groups for p in g["params"])}
    carried = {k: v for k, v in trainer_t.items() if not k.startswith("optim.")}
    for key, v in trainer_t.items():
        if key.startswith("optim."):
            _, pid, name = key.split(".", 2)
            j = where.get(id(before[int(pid)]))
            if j is not None:
                carried[f"optim.{j}.{name}"] = v
    old = {g.get("name"): g for g in groups}
    template = groups[0]
    out, start = [], 0
    for g in new_groups:
        n = len(g["params"])
        settings = old.get(g["name"]) or {**template, "lr": g["lr"], "initial_lr": g["lr"], "name": g["name"]}
        out.append({**settings, "params": list(range(start, start + n))})
        start += n
    return carried, out


def _save(run: Path, ckpt: Path, model: GridModel, before: list, features, summary: dict) -> Path:
    """Checkpoint first (it records its feature settings, which win over config.json), then the config, then
    distill.json: a kill at any point leaves a run that opens, with the old or the new features."""
    meta = json.loads((ckpt / "meta.json").read_text())
    trainer_file = ckpt / "trainer.safetensors"
    trainer_t = load_file(str(trainer_file)) if trainer_file.is_file() else {}
    trainer_t, groups = _carry_optimizer(trainer_t, meta["optimizer_groups"], before, model)
    meta.update({"structure": model.structure(), "optimizer_groups": groups, "features": to_dict(features),
                 "distill": summary})
    saved = save_checkpoint(run / "checkpoints", meta["step"], model_tensors(model), trainer_t, meta)
    cfg = load_config(run / "config.json")
    cfg.features = features
    save_config(cfg, run / "config.json")
    atomic_write_text(run / "distill.json", json.dumps(summary, indent=1))
    return saved
