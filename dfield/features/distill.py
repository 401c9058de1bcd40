"""Features second: distil a teacher into a feature field on top of an already trained, frozen radiance field.

Only the feature volume, its basis and the decoder learn; density and colour stay bit-for-bit as trained.
This is the radiance-first/features-second schedule, and the fair baseline one-pass lifting is compared to.

`distill(RUN, teacher)` (the `dfield distill` command) does either on a run folder and saves the result
into it: a new checkpoint at the same step holding the feature field (or the lifted grid), config.json's
`features` section, and RUN/distill.json.
"""

from __future__ import annotations

import dataclasses
import json
import time
from dataclasses import dataclass
from pathlib import Path

import torch

from dfield.data.dataset import Dataset
from dfield.fields.vm import VMVolume
from dfield.models.grid import GridModel
from dfield.core.rays import RayBatcher

def add_feature_field(model: GridModel, dim: int, teacher_dim: int, comp: int = 16) -> None:
    """Give a trained model a fresh feature volume at its grid resolution, and a decoder."""
    f = model.field
    f.cfg.feature_dim = dim
    f.cfg.feature_comp = comp
    device = f.aabb.device
    f.feature_vol = VMVolume(comp, f.res, f.cfg.init_scale).to(device)
    f.feature_basis = torch.nn.Linear(3 * comp, dim, bias=False).to(device)
    model.decoder = torch.nn.Linear(dim, teacher_dim).to(device)


def drop_feature_field(model: GridModel) -> None:
    """Remove a learned feature field and its decoder (lifted features replace them)."""
    f = model.field
    f.cfg.feature_dim = 0
    f.feature_vol = None
    if "feature_basis" in f._modules:
        del f.feature_basis
    model.decoder = None
    model.feature_source = None


def ray_feature_loss(model: GridModel, data: Dataset, maps, rays, ids: torch.Tensor, loss: str = "l2") -> torch.Tensor:
    """Mean l2/l1 gap between the decoded rendered features of `rays` and the teacher at their pixels `ids`
    (flat ids over `data`'s views, as RayBatcher draws them)."""
    hw = data.height * data.width
    cam, pix = ids // hw, ids % hw
    out = model.render_rays(rays, None, features=True)
    goal = maps.sample(cam, (pix % data.width).float() + 0.5, (pix // data.width).float() + 0.5).to(out["feature"].device)
    diff = model.decode(out["feature"]) - goal
    return (diff.abs() if loss == "l1" else diff**2).mean()


def fit_features(model: GridModel, data: Dataset, maps, iterations: int = 1000, batch_rays: int = 2048,
                 lr_grid: float = 0.02, lr_network: float = 1e-3, loss: str = "l2", seed: int = 0,
                 progress=None) -> dict:
    """Train only the feature branch against teacher `maps` of `data`'s views. Returns seconds and final loss."""
    for p in model.parameters():
        p.requires_grad_(False)
    grid = [model.field.feature_vol.planes, model.field.feature_vol.lines]
    net = list(model.field.feature_basis.parameters()) + list(model.decoder.parameters())
    for p in grid + net:
        p.requires_grad_(True)
    opt = torch.optim.Adam([{"params": grid, "lr": lr_grid}, {"params": net, "lr": lr_network}], betas=(0.9, 0.99))
    batcher = RayBatcher(data, batch_rays, seed=seed)
    device = model.field.aabb.device
    t0 = time.perf_counter()
    last = float("nan")
    for step in range(iterations):
        for g, base in zip(opt.param_groups, (lr_grid, lr_network)):
            g["lr"] = base * 0.1 ** (step / iterations)
        rays, _, ids = batcher.sample()
        value = ray_feature_loss(model, data, maps, rays.to(device), ids, loss)
        opt.zero_grad(set_to_none=True)
        value.backward()
        opt.step()
        last = value.item()
        if progress is not None:
            progress(step + 1, last)
    for p in model.parameters():
        p.requires_grad_(True)
    return {"seconds": time.perf_counter() - t0, "loss": last, "iterations": iterations}


# ------------------------------------------------------------------------------------ dfield distill


@dataclass
class Distilled:
    run: Path
    model: GridModel  # as saved: what open_run(run).model renders
    summary: dict  # what RUN/distill.json holds


def distill(run, teacher: str, method: str = "fit", iterations: int = 1000, dim: int = 32, batch_rays: int = 2048,
            loss: str = "l2", lift_voxels: int = 96**3, device: str = "cpu", threads: int = 0,
            progress: bool = True) -> Distilled:
    """Add teacher features to a trained run and save them into it (what `dfield distill` does).

    method "fit" trains a `dim`-wide feature field and decoder on the frozen radiance field for `iterations`
    steps of `batch_rays` rays; "lift" averages teacher features into `lift_voxels` cells in one pass.
    Any features the run had before are replaced. Everything is checked before anything is written."""
    from rich.console import Console

    from dfield.io.checkpoint import latest_checkpoint
    from dfield.config import load_config
    from dfield.core.metrics import PeakMemory
    from dfield.io.run import RunError, open_run
    from dfield.features.teachers import cached_features, make_teacher
    from dfield.training.trainer import feature_cache_dir, load_train_data

    _check_options(method, loss, iterations, dim, batch_rays, lift_voxels)
    if threads > 0:
        torch.set_num_threads(threads)
    console = Console(stderr=True, quiet=not progress)
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
        before = _optimised_params(r.model)
        console.print(f"{method} {t.name} features ({t.dim}-d) on {len(data)} views of {data.width}x{data.height} -> {run}")
        if method == "fit":
            stats = _fit(r.model, data, maps, t.dim, dim, iterations, batch_rays, loss, r.cfg.seed, progress)
        else:
            stats = _lift(r.model, data, maps, lift_voxels, batch_rays, loss, r.cfg.seed, progress)
    features = dataclasses.replace(r.cfg.features, teacher=teacher, dim=dim if method == "fit" else 0, loss=loss,
                                   teacher_dim=t.dim, method=method)
    summary = {"method": method, "teacher": teacher, "teacher_name": t.name, "teacher_dim": t.dim,
               "dim": features.dim, "step": r.step, "views": len(data), "teacher_seconds": teacher_s,
               **stats, "peak_rss_bytes": mem.rss_bytes}
    saved = _save(run, ckpt, r.model, before, features, summary)
    _report(run, summary, saved)
    return Distilled(run, r.model, summary)


def _check_options(method, loss, iterations, dim, batch_rays, lift_voxels) -> None:
    if method not in ("fit", "lift"):
        raise ValueError(f"unknown method {method!r}: expected 'fit' or 'lift'")
    if loss not in ("l2", "l1"):
        raise ValueError(f"unknown loss {loss!r}: expected 'l2' or 'l1'")
    for name, value, low in (("iterations", iterations, 1), ("dim", dim, 1), ("batch-rays", batch_rays, 1),
                             ("lift-voxels", lift_voxels, 8)):
        if value < low:
            raise ValueError(f"--{name} must be at least {low}, got {value}")


def _fit(model: GridModel, data: Dataset, maps, teacher_dim, dim, iterations, batch_rays, loss, seed, progress) -> dict:
    from dfield.app.progress import TrainProgress

    model.feature_source = None
    add_feature_field(model, dim, teacher_dim)
    with TrainProgress(iterations, enabled=progress, label="distill") as bar:
        stats = fit_features(model, data, maps, iterations, batch_rays, loss=loss, seed=seed,
                             progress=lambda step, value: bar.update(step, {"loss": value}))
    return {"seconds": stats["seconds"], "iterations": iterations, "loss": stats["loss"], "loss_kind": loss,
            "loss_note": "last training batch"}


def _lift(model: GridModel, data: Dataset, maps, n_voxels, batch_rays, loss, seed, progress) -> dict:
    from dfield.features.lifting import lift_features
    from dfield.app.progress import TrainProgress

    drop_feature_field(model)
    with TrainProgress(len(data), enabled=progress, label="lift") as bar:
        lifted = lift_features(model, data, maps, n_voxels=n_voxels, progress=lambda n: bar.update(n, None))
    model.feature_source = lifted.to(model.field.aabb.device)
    # No training loss to report: the same measure on one batch of training rays makes it comparable with fit.
    rays, _, ids = RayBatcher(data, batch_rays, seed=seed).sample()
    with torch.no_grad():
        value = ray_feature_loss(model, data, maps, rays.to(model.field.aabb.device), ids, loss).item()
    cells = int((lifted.rows > 0).sum())
    return {"seconds": lifted.seconds, "iterations": 0, "loss": value, "loss_kind": loss,
            "loss_note": f"one batch of {batch_rays} training rays", "lift_res": list(lifted.res),
            "lift_cells": cells, "lift_bytes": cells * (lifted.grid.shape[1] * 2 + 4)}


def _optimised_params(model: GridModel) -> list[torch.nn.Parameter]:
    """The trainer's optimiser order: optimiser state in a checkpoint is indexed by position in this list."""
    return [p for g in model.param_groups() for p in g["params"]]


def _carry_optimizer(trainer_t: dict, groups: list[dict], before: list, model: GridModel) -> tuple[dict, list[dict]]:
    """Re-index the trainer's Adam state for the model's new parameter list, so `dfield resume` continues with
    the radiance moments it had. Parameters that are new (the feature branch) start without state; groups that
    are new (feature_grid/feature_network) start from the model's own settings."""
    from dfield.io.run import RunError

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
    from safetensors.torch import load_file

    from dfield.io.checkpoint import atomic_write_text, save_checkpoint
    from dfield.config import load_config, save_config, to_dict
    from dfield.io.run import model_tensors

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


def _report(run: Path, summary: dict, saved: Path) -> None:
    if summary["method"] == "fit":
        what = f"{summary['iterations']} steps"
    else:
        what = f"{summary['lift_cells']} cells of {'x'.join(map(str, summary['lift_res']))}"
    print(f"{summary['method']}: {summary['teacher']} features ({what}) in {summary['seconds']:.1f} s "
          f"(+{summary['teacher_seconds']:.1f} s teacher maps); final {summary['loss_kind']} loss {summary['loss']:.4f}; "
          f"peak RSS {summary['peak_rss_bytes'] / 2**30:.2f} GiB")
    print(f"wrote {saved} and {run / 'distill.json'}")
    print(f"next: dfield render {run} --mode features    (PCA of the features)")
    print(f"      dfield eval {run}                      (3D segmentation mIoU vs the teacher on generated scenes)")
