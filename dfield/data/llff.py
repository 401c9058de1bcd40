"""LLFF scenes: `poses_bounds.npy` + `images*/`, loaded as the original NeRF loader does (in world space; the
scene type, `dfield.data.scene_type`, then models forward-facing ones in NDC)."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import torch

from dfield.data.dataset import Cameras, DataError, Dataset
from dfield.data.images import list_images, pick_image_folder, read_image_stack
from dfield.data.poses import average_pose
from dfield.data.splits import holdout_indices

# The world-space box of an LLFF scene modelled as a bounded object (--scene-type object).
WORLD_AABB = ((-2.0, -2.0, -2.0), (2.0, 2.0, 2.0))
BOUND_FACTOR = 0.75  # NeRF's bd_factor: after rescaling, the nearest bound sits at 1 / 0.75


def recenter(c2w: np.ndarray) -> np.ndarray:
    """Express (N, 3, 4) poses in the frame of their average pose (NeRF's recenter_poses)."""
    avg = np.eye(4)
    avg[:3] = average_pose(torch.from_numpy(c2w)).numpy()
    full = np.concatenate([c2w, np.broadcast_to([[[0, 0, 0, 1.0]]], (len(c2w), 1, 4))], 1)
    return (np.linalg.inv(avg) @ full)[:, :3]


def read_poses_bounds(path: Path) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """c2w (N, 3, 4) in OpenGL axes, bounds (N, 2), hwf (3,) of the full-size images, all unscaled."""
    if not path.is_file():
        raise DataError(f"{path}: not found")
    with open(path, "rb") as f:
        if f.read(6) != b"\x93NUMPY":
            raise DataError(f"{path}: not a .npy array file")
    try:
        arr = np.load(path, allow_pickle=False)
    except (OSError, ValueError, EOFError) as e:
        raise DataError(f"{path}: cannot read ({e})") from None
    if arr.ndim != 2 or arr.shape[1] != 17 or arr.shape[0] == 0:
        raise DataError(f"{path}: expected an (N, 17) array (3x5 pose + near, far per image), got shape {arr.shape}")
    arr = arr.astype(np.float64)
    if not np.isfinite(arr).all():
        raise DataError(f"{path}: has non-finite values")
    poses = arr[:, :15].reshape(-1, 3, 5)
    bounds = arr[:, 15:]
    if (bounds <= 0).any():
        raise DataError(f"{path}: near/far bounds must be positive")
    # LLFF columns are [down, right, back]; OpenGL wants [right, up, back].
    poses = np.concatenate([poses[:, :, 1:2], -poses[:, :, 0:1], poses[:, :, 2:]], -1)
    return poses[:, :, :4], bounds, poses[0, :, 4]


def read_llff(root: Path, split: str = "train", downscale: float = 1.0, background=(1.0, 1.0, 1.0),
              holdout_every: int = 8) -> Dataset:
    """Read one split of an LLFF scene (poses_bounds.npy and images*/), as the original NeRF loader does.

    Poses are scaled so the nearest bound sits at 1 / 0.75 and recentred on their average pose; every
    `holdout_every`-th image is held out for val/test. The dataset is in world space inside `WORLD_AABB`, with
    near/far from the padded depth bounds; `dfield.data.scene_type.to_forward` turns it into NDC.

    Raises:
        DataError: missing or malformed files, or images that do not match the poses.
    """
    root = Path(root)
    npy = root / "poses_bounds.npy"
    c2w, bounds, (hwf_h, hwf_w, focal) = read_poses_bounds(npy)
    folder, rest = pick_image_folder(root, downscale)
    paths = list_images(folder)
    if len(paths) != len(c2w):
        raise DataError(f"{folder}: {len(paths)} images, but {npy.name} has {len(c2w)} poses")

    scale = 1.0 / (bounds.min() * BOUND_FACTOR)
    c2w = c2w.copy()
    c2w[:, :, 3] *= scale
    bounds = bounds * scale
    c2w = recenter(c2w)

    chosen = np.array(holdout_indices(len(c2w), split, holdout_every, str(root)))

    images = read_image_stack([paths[i] for i in chosen], rest, background)  # checks that the sizes match
    height, width = images.shape[1:3]
    if abs(width / height - hwf_w / hwf_h) > 0.02 * hwf_w / hwf_h:
        raise DataError(f"{folder}: images are {width}x{height}, but {npy.name} says {hwf_w:g}x{hwf_h:g}")
    f = focal * width / hwf_w  # the pose file's focal is for the full-size images
    n = len(chosen)
    cameras = Cameras(c2w=torch.from_numpy(c2w[chosen]).float(), fx=torch.full((n,), f), fy=torch.full((n,), f),
                      cx=torch.full((n,), width / 2), cy=torch.full((n,), height / 2), width=width, height=height)
    # Depth bounds survive the rigid recentring; pad them a little as NeRF's loaders do.
    return Dataset(images=images, cameras=cameras, image_paths=[paths[i] for i in chosen],
                   aabb=torch.tensor(WORLD_AABB), near=float(0.9 * bounds.min()), far=float(1.1 * bounds.max()),
                   background=tuple(background), split=split, source=str(root), format="llff",
                   scene_c2w=torch.from_numpy(c2w).float())
