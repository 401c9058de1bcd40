"""Rendered views kept for queries: render a view once, query it many times.

A view's low-dimensional features (fp16), rgb, depth and opacity are kept in memory and on disk under
RUN/cache/render/<checkpoint>/<camera>.safetensors, keyed by the weights and the camera, so a new query on an
already rendered view is one decode and one softmax. A new checkpoint gets a new folder; old ones are removed.
"""

from __future__ import annotations

import hashlib
import shutil
from dataclasses import dataclass
from pathlib import Path

import torch
from safetensors.torch import load_file, save_file

from dfield.core.image_rendering import render_image
from dfield.data.dataset import Cameras
from dfield.io.atomic import atomic_path
from dfield.io.run import Run, model_tensors

CACHE_FORMAT = 1  # bump when what a cached render holds, or how its key is made, changes


# ------------------------------------------------------------------------------------------- render cache


@dataclass
class RenderedView:
    """One rendered view as a query needs it: rgb, depth and opacity in float32, low-dim features in fp16."""

    rgb: torch.Tensor  # (H, W, 3)
    depth: torch.Tensor  # (H, W), weighted sum of sample distances (not divided by opacity)
    acc: torch.Tensor  # (H, W) opacity
    feature: torch.Tensor  # (H, W, C) low-dim rendered features, fp16 (halves memory and disk; far below query noise)

    def tensors(self) -> dict[str, torch.Tensor]:
        """The four images by name (rgb, depth, acc, feature), as saved to the cache file."""
        return {"rgb": self.rgb, "depth": self.depth, "acc": self.acc, "feature": self.feature}


def checkpoint_key(run: Run) -> str:
    """Step plus a hash of the weights: a retrained or resumed run never reuses renders of other weights."""
    h = hashlib.sha1(f"dfield-render-cache-v{CACHE_FORMAT}".encode())
    for name, t in sorted(model_tensors(run.model).items()):
        h.update(name.encode())
        h.update(t.detach().cpu().contiguous().view(torch.uint8).numpy().tobytes())
    return f"step{run.step:06d}-{h.hexdigest()[:12]}"


def camera_key(cameras: Cameras, i: int, ndc) -> str:
    """A 20-hex-digit key of camera `i`: a hash of the image size, the NDC settings, its pose and intrinsics."""
    h = hashlib.sha1(f"{cameras.width}x{cameras.height}|{ndc}".encode())
    for t in (cameras.c2w[i], cameras.fx[i], cameras.fy[i], cameras.cx[i], cameras.cy[i]):
        h.update(t.detach().cpu().float().numpy().tobytes())
    return h.hexdigest()[:20]


class RenderCache:
    """Rendered views of one run's weights, by camera; `renders` counts the views actually rendered."""

    def __init__(self, run: Run, disk: bool = True):
        self.run = run
        self.memory: dict[str, RenderedView] = {}
        self.renders = 0
        self.folder = Path(run.path) / "cache" / "render" / checkpoint_key(run) if disk else None
        self._pruned = False

    def get(self, cameras: Cameras, i: int, ndc=None) -> RenderedView:
        """Camera `i`, from memory, else from disk, else rendered (and kept in both)."""
        key = camera_key(cameras, i, ndc)
        view = self.memory.get(key) or self._load(key)
        if view is None:
            view = self._render(cameras, i, ndc)
            self.renders += 1
            self._save(key, view)
        self.memory[key] = view
        return view

    def _render(self, cameras: Cameras, i: int, ndc) -> RenderedView:
        device = next(self.run.model.parameters()).device
        o = render_image(self.run.model, cameras, i, ndc, device=device, features=True)
        return RenderedView(o["rgb"].float(), o["depth"].float(), o["acc"].float(), o["feature"].half())

    def _load(self, key: str) -> RenderedView | None:
        if self.folder is None or not (self.folder / f"{key}.safetensors").is_file():
            return None
        try:
            t = load_file(str(self.folder / f"{key}.safetensors"))
            return RenderedView(t["rgb"], t["depth"], t["acc"], t["feature"])
        except (OSError, KeyError, RuntimeError):
            return None  # a damaged cache file is rendered again

    def _save(self, key: str, view: RenderedView) -> None:
        if self.folder is None:
            return
        try:
            self.folder.mkdir(parents=True, exist_ok=True)
            if not self._pruned:  # renders of earlier checkpoints can never be hit again
                for old in self.folder.parent.iterdir():
                    if old.is_dir() and old != self.folder:
                        shutil.rmtree(old, ignore_errors=True)
                self._pruned = True
            with atomic_path(self.folder / f"{key}.safetensors") as tmp:
                save_file({k: v.contiguous() for k, v in view.tensors().items()}, tmp)
        except OSError:
            pass  # a read-only run folder still queries, from memory only
