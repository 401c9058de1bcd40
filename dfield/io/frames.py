"""The images structure from motion starts from: a folder of photos as they are, or frames picked from a video.

Video frames are picked one per window of consecutive frames (every Nth frame, or windows sized for a target
count): the sharpest of the window, so motion blur is avoided where the video allows. Sharpness is the variance
of the Laplacian of the grey image (Pech-Pacheco et al. 2000); a picked frame that is still blurry, below
`blur_threshold` times the median sharpness of the picked frames, is skipped.
"""

from __future__ import annotations

import contextlib
import io
import math
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import imageio_ffmpeg
import numpy as np
from PIL import Image, ImageOps

from dfield.data.images import IMAGE_EXTS
from dfield.errors import DataError
from dfield.io.atomic import atomic_path

VIDEO_EXTS = (".mp4", ".mov", ".m4v", ".avi", ".mkv", ".webm", ".mts", ".mpg", ".mpeg", ".wmv", ".3gp")

Progress = Callable[[str, int, int, dict | None], None]


def _quiet(label: str, done: int, total: int, stats: dict | None = None) -> None:
    pass


def sharpness(image: np.ndarray) -> float:
    """Variance of the 4-neighbour Laplacian of the grey image ((H, W, 3) or (H, W), any dtype): high for
    sharp detail, low for blur. Images over 1000 px are box-halved first (the measure only ranks frames).

    Example:
        >>> flat, edges = np.zeros((8, 8)), np.indices((8, 8)).sum(0) % 2 * 255.0
        >>> sharpness(flat), sharpness(edges) > 1000
        (0.0, True)
    """
    g = np.asarray(image, np.float32)
    if g.ndim == 3:
        g = g[..., :3] @ np.array([0.299, 0.587, 0.114], np.float32)
    while max(g.shape) > 1000:
        h, w = g.shape[0] // 2 * 2, g.shape[1] // 2 * 2
        g = g[:h, :w].reshape(h // 2, 2, w // 2, 2).mean((1, 3))
    lap = g[1:-1, :-2] + g[1:-1, 2:] + g[:-2, 1:-1] + g[2:, 1:-1] - 4 * g[1:-1, 1:-1]
    return float(lap.var()) if lap.size else 0.0


def fit_size(width: int, height: int, max_size: int) -> tuple[int, int]:
    """(width, height) shrunk (aspect kept) so the longer side is at most `max_size` (0: no limit).

    Example:
        >>> fit_size(4032, 3024, 1600), fit_size(640, 480, 1600)
        ((1600, 1200), (640, 480))
    """
    if max_size <= 0 or max(width, height) <= max_size:
        return width, height
    s = max_size / max(width, height)
    return max(1, round(width * s)), max(1, round(height * s))


def save_image(path: Path, image: np.ndarray, quality: int = 95) -> Path:
    """(H, W, 3) uint8 -> PNG or JPEG (by suffix; JPEG at `quality`), atomically."""
    with atomic_path(path) as tmp:
        if Path(path).suffix.lower() in (".jpg", ".jpeg"):
            Image.fromarray(image).save(tmp, format="JPEG", quality=quality)
        else:
            Image.fromarray(image).save(tmp, format="PNG")
    return Path(path)


def is_video(path: Path) -> bool:
    """Whether `path` is a file with a video extension (`VIDEO_EXTS`)."""
    return Path(path).is_file() and Path(path).suffix.lower() in VIDEO_EXTS


def list_photos(folder: Path) -> list[Path]:
    """The photos (png, jpg, jpeg, any case) directly in `folder`, sorted by name.

    Raises:
        DataError: the folder does not exist, or holds no photos (saying so if it holds videos instead).
    """
    folder = Path(folder)
    if folder.is_file():
        raise DataError(f"{folder}: not a folder of photos, nor a video ({', '.join(VIDEO_EXTS)})")
    if not folder.is_dir():
        raise DataError(f"{folder}: no such folder or video file")
    photos = sorted(p for p in folder.iterdir() if p.is_file() and p.suffix.lower() in IMAGE_EXTS)
    if photos:
        return photos
    videos = sorted(p.name for p in folder.iterdir() if p.suffix.lower() in VIDEO_EXTS)
    if videos:
        raise DataError(f"{folder}: no photos, but videos ({', '.join(videos[:3])}); give the video file itself")
    what = "is empty" if not any(folder.iterdir()) else f"holds no photos ({', '.join(IMAGE_EXTS)})"
    raise DataError(f"{folder}: {what}")


def prepare_photos(photos: list[Path], out_dir: Path, max_size: int = 0, progress: Progress = _quiet,
                   ) -> tuple[Path, list[str]]:
    """The folder and names structure from motion reads. Photos are used where they are unless one needs a
    change: then all are written to `out_dir`, turned upright by their EXIF orientation and shrunk to
    `max_size` (EXIF kept, so its focal length still guides SfM).

    Raises:
        DataError: a photo cannot be read.
    """
    sizes = []
    for p in photos:
        try:
            with Image.open(p) as im:
                sizes.append((im.size, im.getexif().get(0x0112, 1)))  # 0x0112: EXIF orientation
        except (OSError, SyntaxError, ValueError) as e:
            raise DataError(f"{p}: cannot read image ({e})") from None
    folders = {p.parent for p in photos}
    changed = any(o not in (0, 1) or fit_size(*s, max_size) != s for s, o in sizes)
    if not changed and len(folders) == 1:
        return photos[0].parent, [p.name for p in photos]
    out_dir.mkdir(parents=True, exist_ok=True)
    names = []
    for i, p in enumerate(photos):
        with Image.open(p) as im:
            exif = im.info.get("exif")
            up = ImageOps.exif_transpose(im).convert("RGB")
        up = up.resize(fit_size(*up.size, max_size), Image.LANCZOS) if fit_size(*up.size, max_size) != up.size else up
        with atomic_path(out_dir / p.name) as tmp:
            fmt = "JPEG" if p.suffix.lower() in (".jpg", ".jpeg") else "PNG"
            kwargs = {"quality": 95} if fmt == "JPEG" else {}
            up.save(tmp, format=fmt, **({"exif": up.getexif().tobytes()} if exif else {}), **kwargs)
        names.append(p.name)
        progress("prepare photos", i + 1, len(photos), None)
    return out_dir, names


@dataclass
class VideoFrames:
    """What `extract_frames` did: the frames it wrote (names, source frame indices, sharpness) and those it
    skipped as blurry, with the video's size, frame rate and frame count."""

    folder: Path
    names: list[str] = field(default_factory=list)
    indices: list[int] = field(default_factory=list)
    sharpness: list[float] = field(default_factory=list)
    blurry: list[int] = field(default_factory=list)  # source frame indices skipped as blurry
    video_frames: int = 0
    fps: float = 0.0
    size: tuple[int, int] = (0, 0)
    window: int = 1


def _open_video(path: Path):
    try:
        reader = imageio_ffmpeg.read_frames(str(path))
        with contextlib.redirect_stdout(io.StringIO()):  # it prints a note on rotated videos
            meta = next(reader)
    except (OSError, RuntimeError, StopIteration) as e:
        lines = [ln.strip() for ln in str(e).splitlines() if ln.strip() and not ln.startswith("===")]
        why = lines[-1] if lines else "no video stream"
        raise DataError(f"{path}: cannot read video ({why})") from None
    return reader, meta


def extract_frames(video: Path, out_dir: Path, every: int = 0, count: int = 100, max_size: int = 0,
                   blur_threshold: float = 0.3, ext: str = ".jpg", progress: Progress = _quiet) -> VideoFrames:
    """Pick frames of `video` into `out_dir` as frame_NNNNN`ext` (NNNNN: the frame's index in the video).

    One frame per window of `every` consecutive frames, or (every = 0) of windows sized so about `count`
    frames come out; from each window its sharpest frame (`sharpness`). Picked frames below `blur_threshold` x
    the median sharpness of the picked frames are then skipped (0 keeps them all). Frames are shrunk so the
    longer side is at most `max_size` (0: full size).

    Raises:
        DataError: the file cannot be decoded as a video, or it has no frames.
    """
    video, out_dir = Path(video), Path(out_dir)
    if not video.is_file():
        raise DataError(f"{video}: no such video file")
    reader, meta = _open_video(video)
    w, h = (int(v) for v in meta.get("size", (0, 0)))
    fps = float(meta.get("fps") or 0.0)
    duration = float(meta.get("duration") or 0.0)
    expected = max(1, round(fps * duration)) if fps > 0 and duration > 0 else 0
    if not expected and every <= 0:  # no duration in the header: count the frames (one more decoding pass)
        try:
            expected = imageio_ffmpeg.count_frames_and_secs(str(video))[0]
        except (OSError, RuntimeError):
            expected = 0
    window = frame_window(expected, every, count)
    out_dir.mkdir(parents=True, exist_ok=True)
    res = VideoFrames(out_dir, fps=fps, size=(w, h), window=window)
    best: tuple[float, int, np.ndarray] | None = None

    def flush():
        if best is None:
            return
        score, index, frame = best
        img = frame
        if fit_size(w, h, max_size) != (w, h):
            img = np.asarray(Image.fromarray(frame).resize(fit_size(w, h, max_size), Image.LANCZOS))
        name = f"frame_{index:05d}{ext}"
        save_image(out_dir / name, img)
        res.names.append(name)
        res.indices.append(index)
        res.sharpness.append(score)

    n = 0
    try:
        for raw in reader:
            frame = np.frombuffer(raw, np.uint8)
            if frame.size != w * h * 3:  # the header's size disagrees with the stream (rotated video)
                raise DataError(f"{video}: frame {n} has {frame.size} bytes, not {w}x{h}x3")
            frame = frame.reshape(h, w, 3)
            score = sharpness(frame)
            if n % window == 0:
                flush()
                best = None
            if best is None or score > best[0]:
                best = (score, n, frame.copy())
            n += 1
            if n % 10 == 0 or n == expected:
                progress("video frames", n, max(expected, n), None)
    except (OSError, RuntimeError) as e:
        if n == 0:
            raise DataError(f"{video}: cannot read video ({str(e).splitlines()[0]})") from None
        # A truncated video still gives the frames before the damage.
    finally:
        reader.close()
    flush()
    progress("video frames", n, n, None)
    res.video_frames = n
    if not res.names:
        raise DataError(f"{video}: the video has no frames")
    if blur_threshold > 0 and len(res.names) > 2:
        cut = blur_threshold * float(np.median(res.sharpness))
        keep = [i for i, s in enumerate(res.sharpness) if s >= cut]
        for i in sorted(set(range(len(res.names))) - set(keep)):
            (out_dir / res.names[i]).unlink(missing_ok=True)
            res.blurry.append(res.indices[i])
        res.names = [res.names[i] for i in keep]
        res.indices = [res.indices[i] for i in keep]
        res.sharpness = [res.sharpness[i] for i in keep]
    return res


def frame_window(total: int, every: int, count: int) -> int:
    """Frames per window: `every`, or (every = 0) the window that gives about `count` frames of `total`.

    Example:
        >>> frame_window(900, 0, 100), frame_window(900, 5, 100), frame_window(50, 0, 100)
        (9, 5, 1)
    """
    return every if every > 0 else max(1, math.floor(total / max(count, 1)))
