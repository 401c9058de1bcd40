"""One viewer frame: render a browser camera (in chunks, abandoned as soon as the camera moves on), and turn
the frame's buffers into what the user asked to see (RGB, depth, feature PCA, query relevance or overlay,
feature clusters) without rendering again."""

from __future__ import annotations

import time
from collections.abc import Callable
from dataclasses import dataclass, replace

import numpy as np
import torch

from dfield.core.rays import Rays, camera_image_rays
from dfield.core.rendering import VisibleSamples, composite_samples
from dfield.data.dataset import Cameras
from dfield.io.export import cluster_palette, colorize_depth, turbo
from dfield.query.spec import OPAQUE
from dfield.view.camera import ViewCamera

MODES = ("rgb", "depth", "features", "relevance", "overlay", "clusters")
TINT = np.array([1.0, 0.1, 0.6])  # the overlay colour of `dfield query`


class Cancelled(Exception):
    """The camera moved (or the scene changed) while a frame was rendering: it is stale, drop it."""


@dataclass
class LaterFeatures:
    """What a frame rendered without features keeps so that `add_features` can composite them without marching
    again: its rays, per chunk of `chunk` rays the samples its colour was composited from, and the feature
    function of the model that rendered it (points (M, 3) -> (M, C))."""

    rays: Rays
    samples: list[VisibleSamples]
    chunk: int
    features: Callable[[torch.Tensor], torch.Tensor]


@dataclass
class Frame:
    """A rendered browser view: rgb (H, W, 3), depth (H, W, expected distance, opacity-normalised), acc (H, W),
    the model's rendered features (H, W, C, or None), the camera they were rendered from, and (`later`) what
    `add_features` needs when the features were put off."""

    view: ViewCamera
    cameras: Cameras
    rgb: torch.Tensor
    depth: torch.Tensor
    acc: torch.Tensor
    feature: torch.Tensor | None
    seconds: float
    later: LaterFeatures | None = None

    @property
    def size(self) -> tuple[int, int]:
        """(width, height) in pixels."""
        return self.cameras.width, self.cameras.height

    def pixel(self, screen_xy) -> tuple[int, int]:
        """The pixel (x, y) under a screen position given as fractions of the canvas (0..1, top-left origin)."""
        w, h = self.size
        return min(w - 1, max(0, int(screen_xy[0] * w))), min(h - 1, max(0, int(screen_xy[1] * h)))

    def point(self, xy) -> torch.Tensor | None:
        """The 3D point (world) rendered at pixel (x, y), or None where the pixel is empty space."""
        x, y = xy
        if float(self.acc[y, x]) <= OPAQUE:
            return None
        rays = camera_image_rays(self.cameras, 0, None)
        k = y * self.size[0] + x
        return rays.origins[k] + rays.directions[k] * self.depth[y, x]


@torch.no_grad()
def render_frame(model, view: ViewCamera, max_side: int, features: bool = True, ndc=None,
                 cancelled: Callable[[], bool] = lambda: False, chunk: int = 4096, device: str = "cpu",
                 later: bool = False) -> Frame:
    """Render `view` at `max_side` pixels on its longer side; `cancelled()` is asked before every chunk of rays
    and a True raises Cancelled, so a moving camera never waits for a stale frame.

    `later` (with `features` False, on a model with features): keep the samples the colour came from, so that
    `add_features` gives the features afterwards for the cost of the feature branch alone. The viewer shows the
    colour that much sooner (a quarter of a 256x256 frame's time is its features) and adds them while the user
    looks."""
    t0 = time.perf_counter()
    cameras = view.cameras(max_side)
    rays = camera_image_rays(cameras, 0, ndc).to(device)
    features = features and model.has_features
    later = later and not features and model.has_features
    outs = []
    for s in range(0, len(rays), chunk):
        if cancelled():
            raise Cancelled
        outs.append(model.render_rays(rays[s:s + chunk], features=features, visible=later))
    kept = [o.pop("visible") for o in outs if "visible" in o]
    out = {k: torch.cat([o[k] for o in outs]).cpu() for k in outs[0]}
    w, h = cameras.width, cameras.height
    acc = out["acc"].reshape(h, w)
    depth = (out["depth"].reshape(h, w) / acc.clamp(min=1e-6))
    feat = out["feature"].reshape(h, w, -1) if features and "feature" in out else None
    pending = LaterFeatures(rays, kept, chunk, model.as_field().features) if later and len(kept) == len(outs) else None
    return Frame(view, cameras, out["rgb"].reshape(h, w, 3).clamp(0, 1), depth, acc, feat, time.perf_counter() - t0,
                 pending)


@torch.no_grad()
def add_features(frame: Frame, cancelled: Callable[[], bool] = lambda: False) -> Frame:
    """`frame` with the features `render_frame(..., features=True)` would have given it, composited from the
    samples it kept (`later`); `cancelled()` is asked before every chunk. A frame that kept none is returned as
    it is."""
    if frame.later is None:
        return frame
    t0 = time.perf_counter()
    fn, rays, step = frame.later.features, frame.later.rays, frame.later.chunk
    parts = []
    for k, seen in enumerate(frame.later.samples):
        if cancelled():
            raise Cancelled
        r = rays[k * step:(k + 1) * step]
        parts.append(composite_samples(fn, r, seen) if len(seen.ray) else None)  # None: this chunk sees nothing
    width = next((p.shape[1] for p in parts if p is not None), None)
    if width is None:
        width = fn(rays.origins[:1]).shape[-1]
    parts = [p if p is not None else rays.origins.new_zeros(min(step, len(rays) - k * step), width)
             for k, p in enumerate(parts)]
    w, h = frame.size
    feat = torch.cat(parts).cpu().reshape(h, w, -1)
    return replace(frame, feature=feat, later=None, seconds=frame.seconds + time.perf_counter() - t0)


def compose(frame: Frame, mode: str, probability: torch.Tensor | None = None, threshold: float = 0.5,
            pca=None, cluster_ids: torch.Tensor | None = None) -> np.ndarray:
    """(H, W, 3) uint8 image of a frame in one of MODES. `probability` (H, W) is the query's relevance (the
    relevance and overlay modes show RGB without one); `pca` maps (H, W, D) decoded features to colours;
    `cluster_ids` (H, W) are the features' cluster indices (-1: none)."""
    rgb = frame.rgb.numpy().astype(np.float64)
    opaque = (frame.acc > OPAQUE).numpy()
    if mode == "depth":
        img = colorize_depth(frame.depth.numpy(), frame.acc.numpy())
    elif mode == "features" and pca is not None:
        img = pca.numpy() * frame.acc.numpy()[..., None] + (1 - frame.acc.numpy()[..., None])
    elif mode == "relevance" and probability is not None:
        img = turbo(probability.numpy()) * opaque[..., None] + rgb * (~opaque[..., None])
    elif mode == "overlay" and probability is not None:
        sel = ((probability.numpy() > threshold) & opaque)[..., None]
        img = np.where(sel, 0.5 * rgb + 0.5 * TINT, rgb)
    elif mode == "clusters" and cluster_ids is not None:
        ids = cluster_ids.numpy()
        palette = cluster_palette(int(ids.max()) + 1 if ids.size else 1)
        img = np.where((ids >= 0)[..., None] & opaque[..., None], palette[np.clip(ids, 0, None)], rgb)
    else:
        img = rgb
    return (np.clip(img, 0, 1) * 255 + 0.5).astype(np.uint8)
