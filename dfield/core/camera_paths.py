"""Novel-view camera paths for rendering videos: an orbit for 360° scenes, a spiral for forward-facing ones.

All poses are camera-to-world in the OpenGL convention of `dfield.data.dataset` (camera looks down -z,
+y up, +x right); intrinsics are copied from the first training camera. `look_at` and `average_pose` are
`dfield.data.poses`'.
"""

from __future__ import annotations

import math

import torch

from dfield.data.dataset import Cameras
from dfield.data.poses import average_pose, look_at, normalize


def _with_poses(cameras: Cameras, c2w: torch.Tensor) -> Cameras:
    n = c2w.shape[0]
    first = lambda t: t[:1].expand(n).clone()  # noqa: E731
    return Cameras(
        c2w=c2w.to(torch.float32).to(cameras.c2w.device),
        fx=first(cameras.fx), fy=first(cameras.fy), cx=first(cameras.cx), cy=first(cameras.cy),
        width=cameras.width, height=cameras.height,
    )


def look_at_centre(cameras: Cameras) -> torch.Tensor:
    """The point closest (least squares) to all optical axes: solves sum_i (I - d_i d_i^T)(p - o_i) = 0."""
    c2w = cameras.c2w.double().cpu()
    o, d = c2w[:, :, 3], normalize(-c2w[:, :, 2])
    proj = torch.eye(3, dtype=torch.float64) - d[:, :, None] * d[:, None, :]  # (N, 3, 3)
    a = proj.sum(0)
    b = (proj @ o[:, :, None]).sum(0)[:, 0]
    # pinv around the mean origin: if the axes are (nearly) parallel the centre is only fixed across
    # them, and this picks the solution nearest the cameras instead of an arbitrary far point.
    mean_o = o.mean(0)
    return mean_o + torch.linalg.pinv(a, rtol=1e-6) @ (b - a @ mean_o)


def estimate_up(cameras: Cameras) -> torch.Tensor:
    """World up as seen by the cameras. Captures rarely roll the camera, so every camera x axis is
    nearly horizontal and up is the direction most perpendicular to all of them; this is exact for
    Blender scenes, where the plain mean of the y axes tilts towards wherever more cameras are.
    The sign (and, if all x axes are parallel, the direction) comes from the mean y axis."""
    c2w = cameras.c2w.double().cpu()
    x, mean_y = normalize(c2w[:, :, 0]), c2w[:, :, 1].mean(0)
    evals, evecs = torch.linalg.eigh(x.T @ x)  # ascending
    if evals[1] < 1e-2 * len(x):  # x axes (nearly) parallel: only the dominant one is known
        dom = evecs[:, 2]
        up = mean_y - (mean_y @ dom) * dom
    else:
        up = evecs[:, 0] * torch.sign(evecs[:, 0] @ mean_y + 1e-12)
    return normalize(up)


def orbit_path(cameras: Cameras, n_frames: int = 60, elevation: float | None = None) -> Cameras:
    """Circle around the point the cameras look at, at their mean distance and mean elevation
    (or `elevation` in degrees), about the mean camera up vector. Starts near the first camera."""
    c2w = cameras.c2w.double().cpu()
    centre = look_at_centre(cameras)
    up = estimate_up(cameras)
    offs = c2w[:, :, 3] - centre
    radius = offs.norm(dim=-1).mean()
    if elevation is None:
        elev = torch.asin((normalize(offs) @ up).clamp(-1, 1)).mean().item()
    else:
        elev = math.radians(elevation)

    e1 = offs[0] - (offs[0] @ up) * up
    if e1.norm() < 1e-6 * max(radius.item(), 1e-12):  # first camera sits on the up axis
        e1 = torch.linalg.cross(up, torch.tensor([1.0, 0.0, 0.0], dtype=up.dtype))
        if e1.norm() < 1e-6:
            e1 = torch.linalg.cross(up, torch.tensor([0.0, 1.0, 0.0], dtype=up.dtype))
    e1 = normalize(e1)
    e2 = torch.linalg.cross(up, e1)

    t = torch.arange(n_frames, dtype=torch.float64) * (2 * math.pi / n_frames)
    dirs = math.cos(elev) * (torch.cos(t)[:, None] * e1 + torch.sin(t)[:, None] * e2) + math.sin(elev) * up
    eyes = centre + radius * dirs
    return _with_poses(cameras, look_at(eyes, centre, up))


def spiral_path(
    cameras: Cameras,
    n_frames: int = 60,
    near: float | None = None,
    far: float | None = None,
    focus_depth: float | None = None,
    rots: float = 2.0,
    zrate: float = 0.5,
) -> Cameras:
    """NeRF's LLFF `render_path_spiral`: `rots` loops around the average pose, radii from the 90th
    percentile of camera offsets (in the average pose's frame), every view aimed at a focus point
    `focus_depth` in front of the average pose.

    Focus depth: given, else NeRF's blend of near/far bounds (1 / (0.25/(0.9 near) + 0.75/(5 far))),
    else the depth of the least-squares look-at point when it is in front of the cameras (parallel
    axes give none), else ten times the cameras' spread: a guess, so pass bounds when you have them.
    `near`/`far` are world-space scene depths (the LLFF bounds after rescaling), not the 0..1 of an NDC
    Dataset; bounds that cannot be depths (near <= 0 or far <= near) are ignored."""
    c2w = cameras.c2w.double().cpu()
    avg = average_pose(cameras.c2w.cpu())
    rot, centre = avg[:, :3], avg[:, 3]
    if focus_depth is None:
        if near is not None and far is not None and 0 < near < far:
            close, inf = 0.9 * near, 5.0 * far
            focus_depth = 1.0 / (0.25 / close + 0.75 / inf)
        else:
            depth = -((look_at_centre(cameras) - centre) @ rot[:, 2]).item()
            spread = (c2w[:, :, 3] - centre).norm(dim=-1).max().item()
            focus_depth = depth if depth > 0 and math.isfinite(depth) else max(spread, 1e-3) * 10
    local = (c2w[:, :, 3] - centre) @ rot  # offsets in the average pose's frame
    rads = torch.quantile(local.abs(), 0.9, dim=0)
    up = normalize(c2w[:, :, 1].sum(0))
    focus = centre - focus_depth * rot[:, 2]

    theta = torch.linspace(0.0, 2 * math.pi * rots, n_frames + 1, dtype=torch.float64)[:-1]
    circle = torch.stack([torch.cos(theta), -torch.sin(theta), -torch.sin(theta * zrate)], -1) * rads
    eyes = centre + circle @ rot.T
    return _with_poses(cameras, look_at(eyes, focus, up))
