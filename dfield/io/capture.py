"""From a folder of photos or a video to a posed scene folder (dfield process-images).

    input   photos as they are (turned upright by EXIF, shrunk to max_size where needed), or video frames picked
            by `dfield.io.frames.extract_frames` (sharpest per window, blurry ones skipped)
    sfm     `dfield.io.sfm.run_sfm` (pycolmap): features, matching, incremental mapping
    check   at least max(3, min_registered x inputs) images must register
    images  each registered image undistorted to one pinhole camera (`dfield.data.distortion`; principal point
            at the centre, focal zoomed so no pixel comes from outside the photo), same size as the input
    frame   rotated so the cameras' mean up is +z, shifted and scaled so the 1st..99th percentile box of the
            sparse points is [-1, 1]^3 (the box the COLMAP reader would make)
    write   SCENE/images/, SCENE/sparse/0/ (COLMAP text, PINHOLE), points.ply, and the file the readers pick:
            poses_bounds.npy (LLFF, modelled in NDC) for forward-facing captures, transforms.json (nerfstudio)
            for the rest; SCENE/sfm.json: the summary; SCENE/colmap/: COLMAP's database, raw models, frames

A capture is forward-facing when every camera looks within FORWARD_SPREAD_DEG of the cameras' mean direction.
"""

from __future__ import annotations

import json
import shutil
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from pathlib import Path

import numpy as np
from PIL import Image

from dfield.data.alignment import transform_poses, up_rotation
from dfield.data.colmap import near_far, normalisation
from dfield.data.distortion import lens_camera, undistort_image, undistorted_intrinsics
from dfield.errors import DataError
from dfield.io.atomic import atomic_write_text
from dfield.io.export import save_ply
from dfield.io.frames import extract_frames, is_video, list_photos, prepare_photos, save_image
from dfield.io.scene_writer import (
    OPENCV_FROM_OPENGL,
    PosedScene,
    write_colmap_text,
    write_poses_bounds,
    write_transforms,
)
from dfield.io.sfm import SfmOptions, SfmResult, run_sfm

Progress = Callable[[str, int, int, dict | None], None]
FORMATS = ("auto", "llff", "nerfstudio", "colmap")
FORWARD_SPREAD_DEG = 35.0
OUTPUTS = ("images", "sparse", "colmap", "transforms.json", "poses_bounds.npy", "points.ply", "sfm.json")


def _quiet(label: str, done: int, total: int, stats: dict | None = None) -> None:
    pass


@dataclass
class CaptureOptions:
    """What `process_images` does beside SfM (`sfm`): video frames (one per window of `every` frames, or about
    `num_frames` of them; blurry ones below `blur_threshold` x the median sharpness skipped), the longest image
    side, the share of images that must register, and which scene file to write (`FORMATS`)."""

    every: int = 0
    num_frames: int = 100
    blur_threshold: float = 0.3
    max_size: int = 1600
    min_registered: float = 0.5
    format: str = "auto"
    sfm: SfmOptions = field(default_factory=SfmOptions)


def _prepare_out(out: Path, overwrite: bool) -> None:
    if out.exists() and not out.is_dir():
        raise DataError(f"{out}: exists and is not a folder")
    ours = [out / name for name in OUTPUTS if (out / name).exists()]
    if ours and not overwrite:
        raise DataError(f"{out}: already holds a processed scene ({ours[0].name}); --overwrite replaces it")
    for p in ours:
        shutil.rmtree(p) if p.is_dir() else p.unlink()
    out.mkdir(parents=True, exist_ok=True)


def view_spread_deg(c2w: np.ndarray) -> float:
    """Largest angle in degrees between a camera's viewing direction (-z) and the mean viewing direction.

    Example:
        >>> view_spread_deg(np.tile(np.eye(4)[:3], (3, 1, 1)))
        0.0
    """
    d = -c2w[:, :, 2] / np.linalg.norm(c2w[:, :, 2], axis=1, keepdims=True)
    m = d.sum(0)
    if np.linalg.norm(m) < 1e-9:
        return 180.0
    return float(np.degrees(np.arccos(np.clip(d @ (m / np.linalg.norm(m)), -1, 1))).max())


def _c2w(res: SfmResult) -> np.ndarray:
    """OpenGL camera-to-world poses of the registered images, in SfM's world frame."""
    out = []
    for im in res.images:
        c2w = np.concatenate([im.rotation.T, (-im.rotation.T @ im.translation)[:, None]], 1)
        c2w[:, :3] = c2w[:, :3] @ OPENCV_FROM_OPENGL
        out.append(c2w)
    return np.stack(out)


def _failure(out: Path, summary: dict, message: str) -> DataError:
    summary["error"] = message
    atomic_write_text(out / "sfm.json", json.dumps(summary, indent=2) + "\n")
    return DataError(message)


def process_images(source: Path, out: Path, options: CaptureOptions | None = None, overwrite: bool = False,
                   progress: Progress = _quiet) -> dict:
    """Pose the photos in folder `source` (or the frames of video file `source`) and write the scene `out` (see
    the module docstring). Returns the summary also written to `out`/sfm.json.

    Raises:
        DataError: an empty folder, an unreadable photo or video, too few images, structure from motion failed or
            registered too few of the images (its summary is still written, with the error), or `out` already
            holds a processed scene (without `overwrite`).
    """
    opt = options or CaptureOptions()
    if opt.format not in FORMATS:
        raise ValueError(f"format must be one of {FORMATS}, got {opt.format!r}")
    if not 0 <= opt.min_registered <= 1:
        raise ValueError(f"min_registered must be in [0, 1], got {opt.min_registered}")
    source, out = Path(source), Path(out)
    if not source.exists():
        raise DataError(f"{source}: no such folder or video file")
    t0 = time.perf_counter()
    video = is_video(source)
    photos = None if video else list_photos(source)  # fails early on an empty folder, before touching `out`
    _prepare_out(out, overwrite)
    work = out / "colmap"
    summary: dict = {"input": str(source), "kind": "video" if video else "photos"}
    if video:
        frames = extract_frames(source, work / "frames", every=opt.every, count=opt.num_frames,
                                max_size=opt.max_size, blur_threshold=opt.blur_threshold, progress=progress)
        image_dir, names = frames.folder, frames.names
        summary["video"] = {"frames": frames.video_frames, "fps": frames.fps, "size": list(frames.size),
                            "window": frames.window, "picked": len(frames.names) + len(frames.blurry),
                            "blurry_skipped": frames.blurry}
    else:
        image_dir, names = prepare_photos(photos, work / "photos", opt.max_size, progress)
    summary["images"] = len(names)
    sizes = {}
    for n in names:
        with Image.open(image_dir / n) as im:
            sizes.setdefault(im.size, n)
    if len(sizes) > 1:
        (a, na), (b, nb) = list(sizes.items())[:2]
        raise DataError(f"{image_dir}: images of different sizes ({na} is {a[0]}x{a[1]}, {nb} is {b[0]}x{b[1]}); "
                        "a scene needs one size: crop or rotate them alike")
    t_frames = time.perf_counter() - t0

    res = run_sfm(image_dir, names, work, opt.sfm, from_video=video, progress=progress)
    need = max(3, int(np.ceil(opt.min_registered * len(names))))
    summary.update(registered=len(res.images), failed=res.failed,
                   mean_reprojection_error_px=round(res.mean_reprojection_error, 4), points=int(len(res.xyz)),
                   matching=res.stats["matching"], pairs=res.stats["pairs"],
                   verified_pairs=res.stats["verified_pairs"], models=res.stats["models"])
    if len(res.images) < need:
        failed = ", ".join(res.failed[:6]) + (", ..." if len(res.failed) > 6 else "")
        raise _failure(out, summary, f"{source}: structure from motion registered only {len(res.images)} of "
                                     f"{len(names)} images (need {need}; --min-registered {opt.min_registered}); "
                                     f"not registered: {failed}")

    # One pinhole camera per COLMAP camera, centred, zoomed so no output pixel falls outside the photo.
    t1 = time.perf_counter()
    lenses = {cid: lens_camera(m, p, w, h) for cid, (m, w, h, p) in res.cameras.items()}
    pinhole = {cid: undistorted_intrinsics(lens, centre=True) for cid, lens in lenses.items()}
    (out / "images").mkdir()
    for i, im in enumerate(res.images):
        with Image.open(image_dir / im.name) as f:
            rgb = np.asarray(f.convert("RGB"))
        und, _ = undistort_image(rgb, lenses[im.camera_id], pinhole[im.camera_id])
        save_image(out / "images" / im.name, und)
        progress("undistort", i + 1, len(res.images), None)
    t_undistort = time.perf_counter() - t1

    # Up is +z, the points' robust box is [-1, 1]^3.
    c2w = _c2w(res)
    rot, up = up_rotation(c2w)
    c2w = transform_poses(c2w, 1.0, rot, np.zeros(3))
    xyz = res.xyz @ rot.T
    centre, scale, aabb = normalisation(c2w[:, :, 3], xyz)
    c2w[:, :, 3] = (c2w[:, :, 3] - centre) * scale
    xyz = (xyz - centre) * scale
    index = {int(p): i for i, p in enumerate(res.point_ids)}
    observed = [np.array([index[int(p)] for p in im.point_ids], np.int64) for im in res.images]
    near, far = near_far(c2w, [xyz[o] for o in observed])
    (w, h) = lenses[res.images[0].camera_id].width, lenses[res.images[0].camera_id].height
    k = np.array([pinhole[im.camera_id] for im in res.images])
    scene = PosedScene([im.name for im in res.images], c2w, k, w, h, xyz, res.rgb, res.point_error, observed)
    spread = view_spread_deg(c2w)
    forward = spread <= FORWARD_SPREAD_DEG
    fmt = opt.format
    llff_ok = scene.shared_intrinsics() and abs(k[0, 0] - k[0, 1]) <= 1e-6 * k[0, 0]
    if fmt == "auto":
        fmt = "llff" if forward and llff_ok else "nerfstudio"
    if fmt == "llff" and not llff_ok:
        raise _failure(out, summary, f"{source}: the LLFF format needs one camera with fx = fy for all images "
                                     "(--single-camera, a camera model with one focal length); use --format nerfstudio")
    applied = np.concatenate([scale * rot, (-scale * centre)[:, None]], 1)

    write_colmap_text(out / "sparse" / "0", scene)
    save_ply(out / "points.ply", xyz, res.rgb)
    if fmt == "llff":
        write_poses_bounds(out / "poses_bounds.npy", scene)
    elif fmt == "nerfstudio":
        write_transforms(out / "transforms.json", scene, "images", aabb, near, far,
                         {"applied_transform": np.round(applied, 10).tolist(), "ply_file_path": "points.ply"})

    first = res.cameras[res.images[0].camera_id]
    per_image = {im.name: im for im in res.images}
    summary.update(
        scene_type="forward-facing" if forward else "object/360", view_spread_deg=round(spread, 2), format=fmt,
        camera={"model": first[0], "cameras": len(res.cameras), "params": [round(float(v), 6) for v in first[3]],
                "width": first[1], "height": first[2]},
        pinhole={"fx": float(k[0, 0]), "fy": float(k[0, 1]), "cx": float(k[0, 2]), "cy": float(k[0, 3]),
                 "width": w, "height": h},
        up=np.round(up, 6).tolist(), scale=float(scale), applied_transform=np.round(applied, 10).tolist(),
        aabb=np.round(aabb, 6).tolist(), near=round(float(near), 6), far=round(float(far), 6),
        per_image=[{"name": n, "observations": int(len(per_image[n].point_ids)),
                    "reprojection_error_px": round(per_image[n].error, 4)} for n in scene.names],
        options=asdict(opt),
        seconds={"frames": round(t_frames, 2), "features": round(res.stats["features_s"], 2),
                 "matching": round(res.stats["matching_s"], 2), "mapping": round(res.stats["mapping_s"], 2),
                 "undistort": round(t_undistort, 2), "total": round(time.perf_counter() - t0, 2)},
    )
    atomic_write_text(out / "sfm.json", json.dumps(summary, indent=2) + "\n")
    return summary
