"""Camera pose helpers shared by the readers, the scene generator and the camera paths: one `look_at` and one
`average_pose`, both in the OpenGL convention of `dfield.data.dataset` (camera looks down -z, +y up, +x right)."""

from __future__ import annotations

import torch


def normalize(v: torch.Tensor) -> torch.Tensor:
    """Unit vectors along the last axis (zero vectors stay zero)."""
    return v / v.norm(dim=-1, keepdim=True).clamp_min(1e-12)


def look_at(eye: torch.Tensor, target: torch.Tensor, up: torch.Tensor) -> torch.Tensor:
    """Camera-to-world poses looking from each eye at the target.

    Args:
        eye: (N, 3) camera centres.
        target: (3,) or (N, 3) points to look at.
        up: (3,) or (N, 3) world up; the camera's +y is `up` made orthogonal to the viewing axis.

    Returns:
        (N, 3, 4) float64 c2w with columns [right, up, back, eye]: -z points at the target.

    Example:
        >>> c2w = look_at(torch.tensor([[0.0, -4.0, 0.0]]), torch.zeros(3), torch.tensor([0.0, 0.0, 1.0]))
        >>> c2w[0, :, 2] + 0.0  # back axis: away from the target
        tensor([ 0., -1.,  0.], dtype=torch.float64)
    """
    eye = torch.as_tensor(eye).double()
    fwd = normalize(torch.as_tensor(target).double() - eye)
    up = torch.as_tensor(up).double().expand_as(fwd)
    right = torch.linalg.cross(fwd, up)
    # Looking straight along `up` leaves the roll undefined; any perpendicular axis will do there.
    bad = right.norm(dim=-1) < 1e-6
    if bad.any():
        alt = torch.tensor([1.0, 0.0, 0.0], dtype=fwd.dtype).expand_as(fwd)
        alt = torch.where((fwd * alt).sum(-1, keepdim=True).abs() > 0.9, torch.tensor([0.0, 1.0, 0.0], dtype=fwd.dtype), alt)
        right = torch.where(bad[:, None], torch.linalg.cross(fwd, alt), right)
    right = normalize(right)
    back = -fwd
    true_up = torch.linalg.cross(back, right)
    return torch.stack([right, true_up, back, eye], dim=-1)


def average_pose(c2w: torch.Tensor) -> torch.Tensor:
    """The mean pose of (N, 3, 4) c2w as NeRF's `poses_avg`: mean centre, mean back axis, mean up made
    orthogonal to it. Returns (3, 4) float64.

    Example:
        >>> average_pose(torch.eye(4)[:3][None].repeat(5, 1, 1)).tolist()[0]
        [1.0, 0.0, 0.0, 0.0]
    """
    c2w = torch.as_tensor(c2w).double()
    centre = c2w[:, :, 3].mean(0)
    back = normalize(c2w[:, :, 2].sum(0))
    right = normalize(torch.linalg.cross(c2w[:, :, 1].sum(0), back))
    return torch.stack([right, normalize(torch.linalg.cross(back, right)), back, centre], dim=-1)
