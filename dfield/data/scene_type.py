"""What kind of capture a scene is, and the coordinates each kind is modelled in.

- **object**: a bounded scene on a plain backdrop (Blender synthetic, generated scenes): world space inside the
  reader's box.
- **forward**: a forward-facing capture (LLFF): every camera looks the same way; modelled in normalised device
  coordinates (NDC), where the infinite depth range in front of the cameras becomes [-1, 1].
- **unbounded**: a 360-degree capture with content all around and far away: recentred on the point the cameras
  look at and scaled so the object of interest fills the unit ball; the model contracts everything beyond it
  (`dfield.core.contraction`).

`detect_scene_type` tells them apart from the cameras and the images (`--scene-type auto`); `apply_scene_type`
turns a reader's world-space Dataset into the chosen kind. Both look only at the whole scene's cameras
(`Dataset.scene_c2w`, every split), so every split of a scene is normalised the same way.
"""

from __future__ import annotations

import math
from dataclasses import replace

import numpy as np
import torch
from PIL import Image

from dfield.data.dataset import Dataset
from dfield.data.poses import average_pose

SCENE_TYPES = ("auto", "object", "forward", "unbounded")
# TensoRF's box for NDC space: x, y span the image plane (a little wider than [-1, 1] in y to keep the edges of
# wide-aspect views), z the whole [near, inf) depth range.
NDC_AABB = ((-1.5, -1.67, -1.0), (1.5, 1.67, 1.0))
CONTRACTED_AABB = ((-2.0, -2.0, -2.0), (2.0, 2.0, 2.0))
FORWARD_MAX_ANGLE_DEG = 30.0  # every camera's view within this of the mean view: forward-facing
BACKDROP_FRACTION = 0.9  # this share of border pixels within BACKDROP_TOLERANCE of their median: a plain backdrop
BACKDROP_TOLERANCE = 10  # of 255
UNBOUNDED_FAR = 1000.0  # in units of the unit ball; beyond it the contracted shell is a few samples thin
BALL_OF_CAMERA_DISTANCE = 0.5  # the unit ball is at most this fraction of the median camera distance


def focus_point(c2w: torch.Tensor) -> torch.Tensor:
    """(3,) float64 point closest (least squares) to every optical axis of (N, 3, 4) c2w; for (nearly) parallel
    axes, the one nearest the cameras' mean position.

    Example:
        >>> from dfield.data.poses import look_at
        >>> eyes = torch.tensor([[4.0, 0, 0], [0, 4.0, 0], [-4.0, 0, 1]])
        >>> p = focus_point(look_at(eyes, torch.tensor([0.0, 0, 1]), torch.tensor([0.0, 0, 1])))
        >>> (p.round(decimals=6) + 0.0).tolist()  # + 0.0: no -0.0
        [0.0, 0.0, 1.0]
    """
    c2w = torch.as_tensor(c2w).double()
    o = c2w[:, :, 3]
    d = -c2w[:, :, 2] / c2w[:, :, 2].norm(dim=-1, keepdim=True).clamp(min=1e-12)
    proj = torch.eye(3, dtype=torch.float64) - d[:, :, None] * d[:, None, :]
    a, b = proj.sum(0), (proj @ o[:, :, None]).sum(0)[:, 0]
    mean_o = o.mean(0)
    return mean_o + torch.linalg.pinv(a, rtol=1e-6) @ (b - a @ mean_o)


def view_spread_deg(c2w: torch.Tensor) -> float:
    """The largest angle in degrees between a camera's viewing direction and the mean viewing direction (180 when
    the views cancel out, as in a full orbit).

    Example:
        >>> from dfield.data.poses import look_at
        >>> eyes = torch.tensor([[0.0, -4, 0], [0.5, -4, 0], [-0.5, -4, 0]])
        >>> round(view_spread_deg(look_at(eyes, torch.zeros(3), torch.tensor([0.0, 0, 1]))), 1)
        7.1
    """
    d = -torch.as_tensor(c2w).double()[:, :, 2]
    d = d / d.norm(dim=-1, keepdim=True).clamp(min=1e-12)
    mean = d.mean(0)
    if mean.norm() < 1e-6:
        return 180.0
    cos = (d @ (mean / mean.norm())).clamp(-1, 1)
    return math.degrees(float(torch.acos(cos).max()))


def backdrop_fraction(images: torch.Tensor, views: int = 8, border: int = 2) -> float:
    """Share of the pixels on the image borders (`border` pixels wide, up to `views` evenly spaced views of
    (N, H, W, 3) uint8 images) within `BACKDROP_TOLERANCE` of their median colour: near 1 for an object rendered on
    a plain backdrop, low for photos whose borders show the surroundings."""
    n, h, w = images.shape[:3]
    if n == 0 or min(h, w) <= 2 * border:
        return 0.0
    idx = np.unique(np.linspace(0, n - 1, min(n, views)).round().astype(int))
    rings = []
    for i in idx:
        im = images[int(i)].numpy().astype(np.int16)
        rings += [im[:border].reshape(-1, 3), im[-border:].reshape(-1, 3), im[border:-border, :border].reshape(-1, 3),
                  im[border:-border, -border:].reshape(-1, 3)]
    px = np.concatenate(rings)
    median = np.median(px, axis=0)
    return float((np.abs(px - median).max(axis=1) <= BACKDROP_TOLERANCE).mean())


def transparent_fraction(paths, views: int = 4) -> float:
    """Share of pixels that are not fully opaque in up to `views` evenly spaced image files (0 without alpha)."""
    paths = list(paths)
    fractions = []
    for i in np.unique(np.linspace(0, len(paths) - 1, min(len(paths), views)).round().astype(int)):
        try:
            with Image.open(paths[int(i)]) as im:
                if im.mode not in ("RGBA", "LA", "PA") and "transparency" not in im.info:
                    fractions.append(0.0)
                    continue
                alpha = np.asarray(im.convert("RGBA"))[..., 3]
        except (OSError, ValueError):  # the reader has read these already; a race is not worth failing over
            continue
        fractions.append(float((alpha < 255).mean()))
    return float(np.mean(fractions)) if fractions else 0.0


def detect_scene_type(data: Dataset) -> tuple[str, str]:
    """("object" | "forward" | "unbounded", why) for a reader's world-space dataset.

    forward: every camera looks within `FORWARD_MAX_ANGLE_DEG` of the mean view direction. Otherwise the cameras
    surround the scene, and it is an object when its images have transparent pixels or their borders are a plain
    backdrop (renders composited on the background, a studio wall), unbounded when they show surroundings.
    """
    c2w = data.scene_c2w if data.scene_c2w is not None else data.cameras.c2w
    spread = view_spread_deg(c2w)
    if len(c2w) >= 2 and spread <= FORWARD_MAX_ANGLE_DEG:
        return "forward", f"all {len(c2w)} cameras look within {spread:.0f} degrees of one direction"
    clear = transparent_fraction(data.image_paths)
    if clear > 1e-3:
        return "object", (f"cameras surround the scene (views spread {spread:.0f} degrees) and {clear:.0%} of the "
                          "pixels are transparent")
    plain = backdrop_fraction(data.images)
    if plain >= BACKDROP_FRACTION:
        return "object", (f"cameras surround the scene (views spread {spread:.0f} degrees) and {plain:.0%} of the "
                          "image borders are a plain backdrop")
    return "unbounded", (f"cameras surround the scene (views spread {spread:.0f} degrees) and the image borders show "
                         f"surroundings (only {plain:.0%} plain backdrop)")


def _similarity(rotation: torch.Tensor, centre: torch.Tensor, scale: float) -> torch.Tensor:
    """(4, 4) float64 x -> scale * rotation^T (x - centre)."""
    m = torch.eye(4, dtype=torch.float64)
    m[:3, :3] = scale * rotation.T
    m[:3, 3] = -scale * rotation.T @ centre
    return m


def _transformed(data: Dataset, m: torch.Tensor, **changes) -> Dataset:
    """`data` with every pose (its split's and the whole scene's) mapped by the similarity `m` (4, 4)."""
    scale = float(m[:3, :3].norm(dim=0).mean())
    rot = m[:3, :3] / scale

    def move(c2w: torch.Tensor) -> torch.Tensor:
        c = c2w.double()
        return torch.cat([rot @ c[:, :, :3], (m[:3, :3] @ c[:, :, 3:] + m[:3, 3:])], -1).float()

    before = data.scene_from_source if data.scene_from_source is not None else torch.eye(4, dtype=torch.float64)
    return replace(data, cameras=replace(data.cameras, c2w=move(data.cameras.c2w)),
                   scene_c2w=None if data.scene_c2w is None else move(data.scene_c2w),
                   scene_from_source=m @ before, **changes)


def to_unbounded(data: Dataset) -> Dataset:
    """A world-space dataset recentred on the cameras' focus point and scaled so the object of interest fills the
    unit ball: its radius is the largest half-extent of the reader's box, at most `BALL_OF_CAMERA_DISTANCE` times
    the median camera distance. The box becomes the contracted cube, near shrinks to reach content close to the
    cameras, far becomes `UNBOUNDED_FAR`."""
    c2w = data.scene_c2w if data.scene_c2w is not None else data.cameras.c2w
    centre = focus_point(c2w)
    dist = float((c2w[:, :, 3].double() - centre).norm(dim=-1).median())
    half = float((data.aabb[1] - data.aabb[0]).max()) / 2
    radius = min(half, BALL_OF_CAMERA_DISTANCE * dist) if dist > 0 else half
    m = _similarity(torch.eye(3, dtype=torch.float64), centre, 1.0 / radius)
    near = max(1e-3, min(data.near, 0.2 * dist) / radius)
    return _transformed(data, m, aabb=torch.tensor(CONTRACTED_AABB), near=near, far=UNBOUNDED_FAR, ndc=False,
                        scene_type="unbounded")


def to_forward(data: Dataset) -> Dataset:
    """A dataset modelled in NDC. LLFF scenes come recentred and scaled by their reader (NeRF's loader); any other
    format is recentred on the average pose and scaled so its near bound is the NDC near plane (depth 1)."""
    if data.format != "llff":
        avg = average_pose(data.scene_c2w if data.scene_c2w is not None else data.cameras.c2w)
        m = _similarity(avg[:, :3], avg[:, 3], 1.0 / max(data.near, 1e-6))
        data = _transformed(data, m)
    return replace(data, aabb=torch.tensor(NDC_AABB), near=0.0, far=1.0, ndc=True,
                   ndc_focal=float(data.cameras.fx[0]), ndc_size=(data.width, data.height), scene_type="forward")


def apply_scene_type(data: Dataset, scene_type: str) -> Dataset:
    """A reader's world-space dataset modelled as `scene_type` (auto: `detect_scene_type`'s answer).

    Example:
        >>> apply_scene_type(data, "unbounded").aabb.tolist()[1]    # doctest: +SKIP
        [2.0, 2.0, 2.0]
    """
    if scene_type not in SCENE_TYPES:
        raise ValueError(f"scene_type must be one of {SCENE_TYPES}, got {scene_type!r}")
    note = ""
    if scene_type == "auto":
        scene_type, note = detect_scene_type(data)
    if scene_type == "forward":
        data = to_forward(data)
    elif scene_type == "unbounded":
        data = to_unbounded(data)
    return replace(data, scene_type=scene_type, scene_note=note)
