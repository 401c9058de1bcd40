"""Checkpoints that survive a kill at any moment.

A checkpoint is a folder `step_NNNNNN/` holding `model.safetensors` (weights and model buffers),
`trainer.safetensors` (optimiser moments, RNG states) and `meta.json` (step, seconds, model structure,
optimiser hyper-parameters). It is written under a temporary name and renamed into place, and the
`latest` pointer is replaced atomically afterwards, so a reader only ever sees complete checkpoints.
"""

from __future__ import annotations

import json
import os
import shutil
from pathlib import Path

import torch
from safetensors.torch import load_file, save_file

from dfield.io.atomic import atomic_write_text, fsync_file


def _contiguous(tensors: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    return {k: v.detach().to("cpu").contiguous() for k, v in tensors.items()}


def save_checkpoint(folder: Path, step: int, model_tensors: dict, trainer_tensors: dict, meta: dict, keep: int = 2) -> Path:
    """Write `folder/step_NNNNNN/` (model and trainer tensors as safetensors, `meta` + step as JSON) atomically,
    point `latest` at it and keep only the `keep` newest checkpoints. Returns the checkpoint folder."""
    folder.mkdir(parents=True, exist_ok=True)
    final = folder / f"step_{step:06d}"
    tmp = folder / f".step_{step:06d}.tmp{os.getpid()}"
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir()
    save_file(_contiguous(model_tensors), str(tmp / "model.safetensors"))
    save_file(_contiguous(trainer_tensors), str(tmp / "trainer.safetensors"))
    (tmp / "meta.json").write_text(json.dumps({**meta, "step": step}, indent=1))
    for f in tmp.iterdir():  # make the data durable before the rename publishes it
        fsync_file(f)
    # Replacing a checkpoint of the same step (features added to a finished run): the old one moves aside
    # under a name latest_checkpoint still finds, so a kill before the new one is in place loses nothing.
    displaced = folder / f"step_{step:06d}.old"
    if final.exists():
        shutil.rmtree(displaced, ignore_errors=True)
        os.replace(final, displaced)
    os.replace(tmp, final)
    atomic_write_text(folder / "latest", final.name)
    shutil.rmtree(displaced, ignore_errors=True)
    _prune(folder, keep)
    return final


def _prune(folder: Path, keep: int) -> None:
    done = sorted(p for p in folder.glob("step_*") if p.is_dir())
    for old in done[:-keep]:
        shutil.rmtree(old, ignore_errors=True)


def latest_checkpoint(folder: Path) -> Path | None:
    """The checkpoint `latest` points at, else the newest complete one, else None."""
    pointer = folder / "latest"
    if pointer.is_file():
        cand = folder / pointer.read_text().strip()
        if (cand / "meta.json").is_file():
            return cand
    done = sorted(p for p in folder.glob("step_*") if (p / "meta.json").is_file())
    return done[-1] if done else None


def load_checkpoint(path: Path, device="cpu") -> tuple[dict, dict, dict]:
    """(model tensors on `device`, trainer tensors on the CPU, meta) of a checkpoint folder."""
    meta = json.loads((path / "meta.json").read_text())
    model = load_file(str(path / "model.safetensors"), device=str(device))
    trainer_file = path / "trainer.safetensors"
    trainer = load_file(str(trainer_file)) if trainer_file.is_file() else {}
    return model, trainer, meta


def optimizer_tensors(opt: torch.optim.Optimizer) -> tuple[dict[str, torch.Tensor], list[dict]]:
    """Split an optimiser state into tensors (for safetensors) and JSON-able group settings."""
    sd = opt.state_dict()
    tensors = {}
    for pid, st in sd["state"].items():
        for k, v in st.items():
            tensors[f"optim.{pid}.{k}"] = torch.as_tensor(v)
    return tensors, sd["param_groups"]


def restore_optimizer(opt: torch.optim.Optimizer, tensors: dict[str, torch.Tensor], groups: list[dict], device) -> None:
    """Load what `optimizer_tensors` split off back into `opt` (moments moved to `device`)."""
    state: dict[int, dict] = {}
    for key, v in tensors.items():
        if key.startswith("optim."):
            _, pid, k = key.split(".", 2)
            state.setdefault(int(pid), {})[k] = v if k == "step" else v.to(device)
    # The kernel choice is this optimiser's, not the checkpoint's: one written before Adam was fused, or on another
    # device, must not carry its choice over.
    groups = [{**saved, **{k: own[k] for k in ("fused", "foreach") if k in own}} for saved, own in zip(groups, opt.param_groups)]
    opt.load_state_dict({"state": state, "param_groups": groups})
