"""Structure from motion with pycolmap (COLMAP 4): SIFT features, exhaustive or sequential matching, incremental
mapping; the result as plain numpy arrays.

    features: extract_features in chunks (one shared camera, or one per image), so progress can be reported
    pairs:    all pairs (exhaustive: unordered photos), or each image with its `overlap` successors plus
              2^k-apart images (COLMAP's quadratic overlap) and every `overlap`-th image with each other
              (sequential: video frames; the last part closes loops without a vocabulary tree)
    matching: match_image_pairs on chunks of those pairs (SIFT, geometric verification)
    mapping:  incremental_mapping; the largest model is kept, images outside it count as failed

Everything runs on the CPU (pycolmap's PyPI wheels have no CUDA). COLMAP's own log is silenced below errors.
"""

from __future__ import annotations

import itertools
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from dfield.data.distortion import distort, lens_camera
from dfield.errors import DataError, DfieldError

Progress = Callable[[str, int, int, dict | None], None]
MATCHING = ("auto", "exhaustive", "sequential")
CAMERA_MODELS = ("SIMPLE_PINHOLE", "PINHOLE", "SIMPLE_RADIAL", "RADIAL", "OPENCV")
EXHAUSTIVE_UP_TO = 60  # video frames: all pairs up to this many (cheap), sequential above


def _quiet(label: str, done: int, total: int, stats: dict | None = None) -> None:
    pass


@dataclass
class SfmOptions:
    """How `run_sfm` runs: matching (auto: exhaustive for photos and short videos, sequential for longer videos),
    COLMAP camera model, one camera for all images or one each, SIFT features per image, sequential overlap,
    CPU threads (0: all) and the random seed (runs with the same seed and threads give the same model)."""

    matching: str = "auto"
    camera_model: str = "SIMPLE_RADIAL"
    single_camera: bool = True
    max_features: int = 8192
    overlap: int = 10
    threads: int = 0
    seed: int = 0


@dataclass
class SfmImage:
    """A registered image: name, camera id, world-to-camera rotation (3, 3) and translation (3,) in COLMAP's
    (OpenCV) camera axes, the 3D points it observes with where it observed them, and its mean reprojection
    error in pixels."""

    name: str
    camera_id: int
    rotation: np.ndarray
    translation: np.ndarray
    point_ids: np.ndarray  # (M,) ids into SfmResult.point_ids
    xy: np.ndarray  # (M, 2) observed keypoints, pixels (centres at +0.5)
    error: float = 0.0


@dataclass
class SfmResult:
    """The reconstruction: cameras {id: (model, width, height, params)}, registered images sorted by name, 3D
    points (ids, xyz, rgb, mean reprojection error), the input images that did not register, and statistics."""

    cameras: dict[int, tuple[str, int, int, np.ndarray]]
    images: list[SfmImage]
    point_ids: np.ndarray  # (P,) int64
    xyz: np.ndarray  # (P, 3)
    rgb: np.ndarray  # (P, 3) uint8
    point_error: np.ndarray  # (P,)
    failed: list[str] = field(default_factory=list)
    stats: dict = field(default_factory=dict)

    @property
    def mean_reprojection_error(self) -> float:
        """Mean over all observations of the distance between keypoint and reprojected 3D point, pixels."""
        n = sum(len(im.point_ids) for im in self.images)
        return sum(im.error * len(im.point_ids) for im in self.images) / max(n, 1)


def image_pairs(names: list[str], sequential: bool, overlap: int = 10) -> list[tuple[str, str]]:
    """The image pairs to match (see the module docstring), each once, in a stable order.

    Example:
        >>> len(image_pairs([f"{i}" for i in range(5)], sequential=False))
        10
        >>> image_pairs([f"{i}" for i in range(6)], sequential=True, overlap=2)  # doctest: +NORMALIZE_WHITESPACE
        [('0', '1'), ('0', '2'), ('1', '2'), ('1', '3'), ('2', '3'), ('2', '4'), ('3', '4'), ('3', '5'), ('4', '5'),
         ('0', '4'), ('0', '5'), ('2', '5')]
    """
    n = len(names)
    if not sequential:
        return list(itertools.combinations(names, 2))
    seen, out = set(), []

    def add(i, j):
        if i != j and j < n and (min(i, j), max(i, j)) not in seen:
            seen.add((min(i, j), max(i, j)))
            out.append((names[min(i, j)], names[max(i, j)]))

    for i in range(n):
        for k in range(1, overlap + 1):
            add(i, i + k)
        for k in range(overlap):
            add(i, i + 2**k)
    keyframes = range(0, n, max(overlap, 1))
    for i, j in itertools.combinations(keyframes, 2):
        add(i, j)
    # The last frame as a keyframe too, so a capture that ends where it began closes its loop.
    for i in keyframes:
        add(i, n - 1)
    return out


def _pycolmap():
    try:
        # Lazy: only process-images needs it, and an install without it must still train (and say what is missing).
        import pycolmap
    except ImportError:
        raise DfieldError("structure from motion needs pycolmap: pip install 'pycolmap>=4,<5' "
                          "(bash scripts/setup.sh installs it)") from None
    pycolmap.logging.minloglevel = 3  # COLMAP logs every step, and its errors, itself; dfield reports its own
    return pycolmap


def _reprojection(cam: tuple, rotation: np.ndarray, translation: np.ndarray, xyz: np.ndarray) -> np.ndarray:
    """(M, 2) pixels where the camera (COLMAP model, width, height, params) sees world points (M, 3)."""
    lens = lens_camera(cam[0], cam[3], cam[1], cam[2])
    p = xyz @ rotation.T + translation
    z = np.where(np.abs(p[:, 2]) < 1e-12, 1e-12, p[:, 2])
    xd, yd = distort(p[:, 0] / z, p[:, 1] / z, lens.coeffs)
    return np.stack([lens.fx * xd + lens.cx, lens.fy * yd + lens.cy], 1)


def run_sfm(image_dir: Path, names: list[str], work_dir: Path, options: SfmOptions | None = None,
            from_video: bool = False, progress: Progress = _quiet) -> SfmResult:
    """Reconstruct the cameras of the images `names` in `image_dir`; COLMAP's database and model go to
    `work_dir` (database.db, sparse/N). Photos are matched exhaustively; video frames (`from_video`) too up to
    EXHAUSTIVE_UP_TO frames, sequentially above (`options.matching` overrides).

    Raises:
        DataError: fewer than 3 images, a camera model that is not supported, or structure from motion failed
            (no verified pair, or no model could be started).
        DfieldError: pycolmap is not installed.
    """
    opt = options or SfmOptions()
    if opt.matching not in MATCHING:
        raise ValueError(f"matching must be one of {MATCHING}, got {opt.matching!r}")
    if opt.camera_model not in CAMERA_MODELS:
        raise ValueError(f"camera_model must be one of {CAMERA_MODELS}, got {opt.camera_model!r}")
    if len(names) < 3:
        raise DataError(f"{image_dir}: structure from motion needs at least 3 images, got {len(names)}")
    pc = _pycolmap()
    pc.set_random_seed(opt.seed)
    work_dir = Path(work_dir)
    work_dir.mkdir(parents=True, exist_ok=True)
    db = work_dir / "database.db"
    db.unlink(missing_ok=True)  # a database from an earlier run would add its images again
    threads = opt.threads if opt.threads > 0 else -1
    stats, t0 = {}, time.perf_counter()

    # Features, a chunk of images at a time; a single camera is made by the first chunk and reused.
    reader = pc.ImageReaderOptions()
    reader.camera_model = opt.camera_model
    extraction = pc.FeatureExtractionOptions()
    extraction.num_threads = threads
    extraction.sift.max_num_features = opt.max_features
    mode = pc.CameraMode.SINGLE if opt.single_camera else pc.CameraMode.PER_IMAGE
    chunk = 8
    for i in range(0, len(names), chunk):
        pc.extract_features(db, image_dir, image_names=names[i:i + chunk], camera_mode=mode, reader_options=reader,
                            extraction_options=extraction, device=pc.Device.cpu)
        if opt.single_camera and i == 0:
            with pc.Database.open(db) as d:
                reader.existing_camera_id = d.read_all_cameras()[0].camera_id
        progress("features", min(i + chunk, len(names)), len(names), None)
    stats["features_s"] = time.perf_counter() - t0

    with pc.Database.open(db) as d:
        ids = {im.name: im.image_id for im in d.read_all_images()}
        keypoints = {name: d.num_keypoints_for_image(ids[name]) for name in names if name in ids}
    missing = [n for n in names if n not in ids]
    if missing:
        raise DataError(f"{image_dir / missing[0]}: COLMAP could not read this image"
                        + (f" (and {len(missing) - 1} more)" if len(missing) > 1 else ""))

    # Matching, on explicit pairs so progress can be reported.
    sequential = opt.matching == "sequential" or (opt.matching == "auto" and from_video
                                                  and len(names) > EXHAUSTIVE_UP_TO)
    pairs = image_pairs(names, sequential, opt.overlap)
    matching = pc.FeatureMatchingOptions()
    matching.num_threads = threads
    t1 = time.perf_counter()
    step = 64
    pairs_file = work_dir / "pairs.txt"
    for i in range(0, len(pairs), step):
        pairs_file.write_text("".join(f"{a} {b}\n" for a, b in pairs[i:i + step]))
        pairing = pc.ImportedPairingOptions()
        pairing.match_list_path = pairs_file
        pc.match_image_pairs(db, matching_options=matching, pairing_options=pairing, device=pc.Device.cpu)
        progress("matching", min(i + step, len(pairs)), len(pairs), None)
    pairs_file.unlink(missing_ok=True)
    stats["matching_s"] = time.perf_counter() - t1
    with pc.Database.open(db) as d:
        # Pairs whose matches survived geometric verification (the database also keeps those that did not).
        verified = sum(len(g.inlier_matches) > 0 for g in d.read_two_view_geometries()[1])
    stats.update(matching="sequential" if sequential else "exhaustive", pairs=len(pairs), verified_pairs=verified,
                 mean_keypoints=float(np.mean(list(keypoints.values()))))
    if verified == 0:
        raise DataError(f"{image_dir}: structure from motion failed: no two of the {len(names)} images share enough "
                        "matching features (the photos need overlap, texture, and sharp focus)")

    # Incremental mapping: each registered image moves the bar.
    mapping = pc.IncrementalPipelineOptions()
    mapping.num_threads = threads
    mapping.random_seed = opt.seed
    mapping.min_model_size = 3  # our own check on how many registered comes afterwards, with a clear message
    registered = [0]  # of the model being built; a new model (after a failed one) starts again from its pair

    def on_pair():
        registered[0] = 2
        progress("mapping", 2, len(names), None)

    def on_image():
        registered[0] += 1
        progress("mapping", min(registered[0], len(names)), len(names), None)

    sparse = work_dir / "sparse"
    sparse.mkdir(exist_ok=True)
    t2 = time.perf_counter()
    recs = pc.incremental_mapping(db, image_dir, sparse, options=mapping, initial_image_pair_callback=on_pair,
                                  next_image_callback=on_image)
    stats["mapping_s"] = time.perf_counter() - t2
    if not recs:
        raise DataError(f"{image_dir}: structure from motion failed: no pair of the {len(names)} images could start "
                        f"a model ({verified} of {len(pairs)} pairs matched); the camera must move between photos "
                        "(turning on the spot cannot be triangulated) and the photos must overlap")
    key, rec = max(recs.items(), key=lambda kv: kv[1].num_reg_images())
    progress("mapping", len(names), len(names), None)
    stats.update(models=len(recs), model_index=int(key))
    return _result(rec, names, keypoints, stats)


def _result(rec, names: list[str], keypoints: dict[str, int], stats: dict) -> SfmResult:
    """numpy copy of a pycolmap Reconstruction, with per-image reprojection errors."""
    cameras = {int(cid): (c.model.name, int(c.width), int(c.height), np.array(c.params, np.float64))
               for cid, c in rec.cameras.items()}
    pid = np.array(sorted(rec.points3D.keys()), np.int64)
    pts = [rec.points3D[int(i)] for i in pid]
    xyz = np.array([p.xyz for p in pts], np.float64).reshape(-1, 3)
    rgb = np.array([p.color for p in pts], np.uint8).reshape(-1, 3)
    err = np.array([p.error for p in pts], np.float64)
    lookup = {int(i): k for k, i in enumerate(pid)}
    images = []
    for iid in rec.reg_image_ids():
        im = rec.images[iid]
        pose = im.cam_from_world()
        obs = im.get_observation_points2D()
        ids = np.array([p.point3D_id for p in obs], np.int64)
        xy = np.array([p.xy for p in obs], np.float64).reshape(-1, 2)
        r, t = np.array(pose.rotation.matrix()), np.array(pose.translation)
        e = 0.0
        if len(ids):
            proj = _reprojection(cameras[int(im.camera_id)], r, t, xyz[[lookup[int(i)] for i in ids]])
            e = float(np.linalg.norm(proj - xy, axis=1).mean())
        images.append(SfmImage(im.name, int(im.camera_id), r, t, ids, xy, e))
    images.sort(key=lambda im: im.name)
    done = {im.name for im in images}
    stats["keypoints"] = keypoints
    return SfmResult(cameras, images, pid, xyz, rgb, err, [n for n in names if n not in done], stats)
