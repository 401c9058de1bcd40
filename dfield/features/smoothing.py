"""Smoother feature targets (Smoothness in Distilled Feature Fields): teacher maps are noisy and blur across
object edges, so the targets a field is distilled from are first smoothed, edge-aware.

- **segments**: per view, a segmenter's regions (dfield.features.segmenters) steer the blur. Inside region k the
  target is the normalised convolution of the teacher features F (bilinearly upsampled to image pixels) with a
  Gaussian G of `sigma` pixels, restricted to the region's mask M_k,

      T(p) = sum_q G(p - q) M_k(q) F(q) / sum_q G(p - q) M_k(q)      for p in region k,

  or the region's mean feature (mode "mean"). Pixels under no region keep F exactly. No value crosses a mask edge.
- **bilateral**: the joint bilateral filter of F guided by the RGB image I, the edge-aware baseline:

      T(p) = sum_q w(p, q) F(q) / sum_q w(p, q),
      w(p, q) = exp(-|p - q|^2 / (2 sigma_space^2) - |I(p) - I(q)|^2 / (2 sigma_color^2)),  |p - q|_inf <= 2 sigma_space.

Segment-blurred targets are image-resolution fp16 maps (N, H, W, D); bilateral ones are stored as each pixel's
weights on the few teacher cells its window reads (dfield.features.windowed_maps), a K x K instead of a D-wide
vector. Both are cached on disk like the teacher maps and sampled by the trainer as raw maps are (`sample`).
"""

from __future__ import annotations

import hashlib
import json
import math
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

from dfield.errors import TeacherError
from dfield.features.specs import parse_spec
from dfield.features.teachers.cache import FeatureMaps
from dfield.features.windowed_maps import WindowedMaps, apply_windows
from dfield.io.atomic import atomic_path, atomic_write_text

Progress = Callable[[str, int, int, dict | None], None]


@dataclass
class SmoothSpec:
    """A parsed `--features.smooth` value: "segments:<segmenter spec>" or "bilateral[:sigma_space=S,sigma_color=C]"
    (defaults 3 pixels and 0.03: on generated scenes sigma_color 0.03 beat 0.05 and 0.1, README "Smooth features").

    Example:
        >>> SmoothSpec.parse("segments:felzenszwalb:scale=50").segmenter
        'felzenszwalb:scale=50'
        >>> SmoothSpec.parse("bilateral:sigma_space=2").sigma_space
        2.0
    """

    kind: str  # "segments" or "bilateral"
    segmenter: str = ""
    sigma_space: float = 3.0  # bilateral: spatial sigma, image pixels
    sigma_color: float = 0.03  # bilateral: RGB sigma, colours in [0, 1]

    @classmethod
    def parse(cls, spec: str) -> "SmoothSpec":
        """Read a spec string; TeacherError (a one-line user error) when it is malformed."""
        try:
            kind, arg, settings = parse_spec(spec)
        except ValueError as e:
            raise TeacherError(f"--features.smooth: {e}") from None
        if kind == "segments":
            if not arg:
                raise TeacherError(f"--features.smooth {spec!r}: name a segmenter, e.g. segments:felzenszwalb, "
                                   "segments:litemedsam, segments:gt or segments:files:<folder>")
            return cls("segments", segmenter=arg)
        if kind == "bilateral":
            unknown = set(settings) - {"sigma_space", "sigma_color"}
            if arg or unknown:
                raise TeacherError(f"--features.smooth {spec!r}: bilateral takes sigma_space=, sigma_color=")
            out = cls("bilateral", sigma_space=float(settings.get("sigma_space", cls.sigma_space)),
                      sigma_color=float(settings.get("sigma_color", cls.sigma_color)))
            if out.sigma_space <= 0 or out.sigma_color <= 0:
                raise TeacherError(f"--features.smooth {spec!r}: sigmas must be positive")
            return out
        raise TeacherError(f"--features.smooth {spec!r}: expected segments:<segmenter> or bilateral[:...]")


def upsample_features(fmap: torch.Tensor, height: int, width: int) -> torch.Tensor:
    """(h, w, D) -> (H, W, D) float32, bilinear with cell centres spread over the image and edges clamped: the
    values FeatureMaps.sample returns at the image's pixel centres."""
    x = torch.as_tensor(fmap).float().permute(2, 0, 1)[None]
    if x.shape[2:] == (height, width):
        return x[0].permute(1, 2, 0).contiguous()
    return F.interpolate(x, size=(height, width), mode="bilinear", align_corners=False)[0].permute(1, 2, 0).contiguous()


def _gaussian(sigma: float) -> torch.Tensor:
    r = max(1, math.ceil(3 * sigma))
    x = torch.arange(-r, r + 1, dtype=torch.float32)
    g = torch.exp(-0.5 * (x / sigma) ** 2)
    return g / g.sum()


def _blur(x: torch.Tensor, g: torch.Tensor) -> torch.Tensor:
    """Separable zero-padded Gaussian of (C, H, W)."""
    c, r = x.shape[0], len(g) // 2
    x = F.conv2d(x[None], g.view(1, 1, 1, -1).expand(c, 1, 1, -1), padding=(0, r), groups=c)
    return F.conv2d(x, g.view(1, 1, -1, 1).expand(c, 1, -1, 1), padding=(r, 0), groups=c)[0]


def blur_within_labels(features: torch.Tensor, labels: torch.Tensor, sigma: float = 4.0,
                       mode: str = "blur") -> torch.Tensor:
    """Features (H, W, D) smoothed inside each region of `labels` (H, W) ints (0: no region), never across one.

    mode "blur": the Gaussian normalised convolution restricted to the region (module docstring); "mean": the
    region's mean. Pixels with label 0 are returned unchanged, bit for bit.

    Example:
        >>> f = torch.tensor([[[0.], [2.], [10.]]]); lab = torch.tensor([[1, 1, 0]])
        >>> blur_within_labels(f, lab, mode="mean")[0, :, 0].tolist()
        [1.0, 1.0, 10.0]
    """
    if mode not in ("blur", "mean"):
        raise ValueError(f"mode must be 'blur' or 'mean', got {mode!r}")
    labels = torch.as_tensor(labels).long()
    if labels.shape != features.shape[:2]:
        raise ValueError(f"labels {tuple(labels.shape)} and features {tuple(features.shape)} differ in size")
    out = features.clone()
    if int(labels.max()) <= 0:
        return out
    g = _gaussian(sigma) if mode == "blur" else None
    flat = labels.reshape(-1)
    order = torch.argsort(flat, stable=True)
    counts = torch.bincount(flat)
    starts = torch.cumsum(counts, 0) - counts
    w = labels.shape[1]
    for k in range(1, len(counts)):
        if counts[k] == 0:
            continue
        pix = order[starts[k]:starts[k] + counts[k]]
        ys, xs = pix // w, pix % w
        if mode == "mean":
            out[ys, xs] = features[ys, xs].mean(0)
            continue
        y0, y1, x0, x1 = int(ys.min()), int(ys.max()) + 1, int(xs.min()), int(xs.max()) + 1
        m = (labels[y0:y1, x0:x1] == k).float()
        crop = features[y0:y1, x0:x1].permute(2, 0, 1) * m
        num = _blur(torch.cat([crop, m[None]]), g)
        val = (num[:-1] / num[-1:].clamp(min=1e-12)).permute(1, 2, 0)
        out[ys, xs] = val[ys - y0, xs - x0]
    return out


def joint_bilateral(features: torch.Tensor, guide: torch.Tensor, sigma_space: float = 3.0,
                    sigma_color: float = 0.1) -> torch.Tensor:
    """Joint bilateral filter of features (H, W, D) guided by an image (H, W, C) in [0, 1] (module docstring).

    Offsets beyond the image take no weight (no padding values enter). Memory O(H W D): one offset at a time.

    Example:
        >>> f = torch.tensor([[[0.], [1.]]]); rgb = torch.tensor([[[0., 0, 0], [1., 1, 1]]])
        >>> joint_bilateral(f, rgb, sigma_space=1, sigma_color=0.1)[0, :, 0].tolist()
        [0.0, 1.0]
    """
    h, w, _ = features.shape
    num = torch.zeros_like(features, dtype=torch.float32)
    den = torch.zeros(h, w, 1)
    for _, _, src, dst, wgt in _bilateral_weights(guide, sigma_space, sigma_color):
        num[dst] += wgt[..., None] * features[src]
        den[dst] += wgt[..., None]
    return num / den


def _bilateral_weights(guide: torch.Tensor, sigma_space: float, sigma_color: float):
    """For each offset (dy, dx) within 2 sigma_space: (dy, dx, src, dst, weights), where dst are the pixels whose
    neighbour at that offset lies inside the image, src those neighbours, and weights (dst's shape) the bilateral
    weights of the pairs."""
    guide = torch.as_tensor(guide).float()
    h, w = guide.shape[:2]
    r = bilateral_radius(sigma_space)
    for dy in range(-r, r + 1):
        for dx in range(-r, r + 1):
            ty0, ty1, tx0, tx1 = max(0, -dy), min(h, h - dy), max(0, -dx), min(w, w - dx)
            if ty1 <= ty0 or tx1 <= tx0:
                continue
            src = (slice(ty0 + dy, ty1 + dy), slice(tx0 + dx, tx1 + dx))
            dst = (slice(ty0, ty1), slice(tx0, tx1))
            diff = (guide[src] - guide[dst]).square().sum(-1)
            yield dy, dx, src, dst, torch.exp(-(dx * dx + dy * dy) / (2 * sigma_space**2) - diff / (2 * sigma_color**2))


def _interp_matrix(n_in: int, n_out: int) -> torch.Tensor:
    """(n_out, n_in) weights of the 1D linear interpolation upsample_features uses (F.interpolate's own)."""
    eye = torch.eye(n_in)[None]  # (1, n_in, n_in): each column one input sample
    return F.interpolate(eye, size=n_out, mode="linear", align_corners=False)[0].T.contiguous()


def _window_rows(u: torch.Tensor, r: int) -> tuple[torch.Tensor, torch.Tensor, int]:
    """For interpolation weights u (N_out, n_in): per output index p, the first input index A(p) any output within
    r of p reads, the local weights R (2r+1, N_out, K) of output p + d on inputs A(p) .. A(p) + K - 1, and K."""
    n_out, n_in = u.shape
    nz = u > 0
    first = torch.where(nz.any(1), nz.float().argmax(1), torch.zeros(n_out, dtype=torch.long))
    last = n_in - 1 - torch.where(nz.any(1), nz.flip(1).float().argmax(1), torch.zeros(n_out, dtype=torch.long))
    p = torch.arange(n_out)
    lo = torch.stack([first[(p + d).clamp(0, n_out - 1)] for d in range(-r, r + 1)]).amin(0)
    hi = torch.stack([last[(p + d).clamp(0, n_out - 1)] for d in range(-r, r + 1)]).amax(0)
    k = int((hi - lo).max()) + 1
    padded = torch.cat([u, u.new_zeros(n_out, k)], 1)  # windows that run past the last input read zeros
    cols = lo[:, None] + torch.arange(k)  # (N_out, K)
    rows = []
    for d in range(-r, r + 1):
        q = p + d
        valid = ((q >= 0) & (q < n_out)).float()[:, None]
        rows.append(padded[q.clamp(0, n_out - 1)[:, None], cols] * valid)
    return lo, torch.stack(rows), k


def bilateral_windows(cells: tuple[int, int], guide: torch.Tensor, sigma_space: float = 3.0,
                      sigma_color: float = 0.1) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """The joint bilateral filter of upsampled teacher maps as fixed weights on teacher cells: for an (h, w) = `cells`
    grid and an (H, W, C) guide in [0, 1], (anchor_y (H,), anchor_x (W,), coef (H, W, Ky, Kx)) such that

        joint_bilateral(upsample_features(F, H, W), guide)[y, x] = sum_ij coef[y, x, i, j] F[anchor_y[y] + i, anchor_x[x] + j]

    for every (h, w, D) map F (`apply_windows`). Both steps are linear in the features, so each output pixel reads
    only the K x K teacher cells its window touches (K = ceil((4 sigma_space + 1) / (H / h)) + 1 or so); the weights
    depend on the guide alone. Cells past the map's edge (anchor + i >= h) have weight 0.

    Example:
        >>> ay, ax, coef = bilateral_windows((4, 4), torch.rand(16, 16, 3), sigma_space=1.5)
        >>> coef.shape[:2], bool(torch.allclose(coef.sum((2, 3)), torch.ones(16, 16)))
        (torch.Size([16, 16]), True)
    """
    guide = torch.as_tensor(guide).float()
    (h, w), (hh, ww) = cells, guide.shape[:2]
    r = bilateral_radius(sigma_space)
    ay, ry, ky = _window_rows(_interp_matrix(h, hh), r)  # ry (2r+1, H, Ky)
    ax, rx, kx = _window_rows(_interp_matrix(w, ww), r)  # rx (2r+1, W, Kx)
    coef = torch.zeros(hh, ww, ky, kx)
    den = torch.zeros(hh, ww)
    # Offsets come row by row (dy outer): sum each row's dx terms, then spread them over the cell rows.
    part, row = torch.zeros(hh, ww, kx), None
    for dy, dx, _, dst, wgt in _bilateral_weights(guide, sigma_space, sigma_color):
        if row is not None and dy != row:
            coef += ry[row + r][:, None, :, None] * part[:, :, None, :]
            part.zero_()
        row = dy
        den[dst] += wgt
        part[dst] += wgt[..., None] * rx[dx + r][None, dst[1]]
    coef += ry[row + r][:, None, :, None] * part[:, :, None, :]
    return ay, ax, coef / den[..., None, None]


def window_layout(cells: tuple[int, int], image: tuple[int, int],
                  sigma_space: float) -> tuple[torch.Tensor, torch.Tensor, int, int]:
    """(anchor_y (H,), anchor_x (W,), Ky, Kx) of `bilateral_windows` for (h, w) `cells` and an (H, W) `image`: they
    depend on the sizes and the radius only, so stored windows need not keep them."""
    r = bilateral_radius(sigma_space)
    ay, _, ky = _window_rows(_interp_matrix(cells[0], image[0]), r)
    ax, _, kx = _window_rows(_interp_matrix(cells[1], image[1]), r)
    return ay, ax, ky, kx


def bilateral_radius(sigma_space: float) -> int:
    """Half-width in pixels of the bilateral window: offsets up to 2 sigma_space along each axis."""
    return max(1, math.ceil(2 * sigma_space))


def joint_bilateral_upsampled(fmap: torch.Tensor, guide: torch.Tensor, sigma_space: float = 3.0,
                              sigma_color: float = 0.1) -> torch.Tensor:
    """joint_bilateral(upsample_features(fmap, H, W), guide) without the upsampled maps: (h, w, D) teacher cells
    and an (H, W, C) guide -> (H, W, D), through `bilateral_windows`: the D-wide work is K^2 passes instead of
    (4 sigma_space + 1)^2. Same values up to rounding.

    Example:
        >>> f, rgb = torch.rand(4, 4, 8), torch.rand(16, 16, 3)
        >>> ref = joint_bilateral(upsample_features(f, 16, 16), rgb)
        >>> torch.allclose(joint_bilateral_upsampled(f, rgb), ref, atol=1e-5)
        True
    """
    fmap = torch.as_tensor(fmap).float()
    return apply_windows(fmap, *bilateral_windows(fmap.shape[:2], guide, sigma_space, sigma_color))


def smoothed_maps(raw: FeatureMaps, images, spec: SmoothSpec, cache_dir: Path, labels=None, sigma: float = 4.0,
                  mode: str = "blur", key_extra: str = "",
                  progress: Progress | None = None) -> FeatureMaps | WindowedMaps:
    """Smoothed targets of teacher `raw` maps, computed once into `cache_dir`: segment blur as image-resolution maps
    (N, H, W, D) fp16 (FeatureMaps), the bilateral filter as windows onto the teacher cells (WindowedMaps, a
    K x K weight per pixel instead of D features); both are sampled alike.

    `images` uint8 (N, H, W, 3) are the views (photos or renders) the targets belong to; `labels` int (N, H, W)
    are the segment label maps (spec.kind "segments"). The cache key holds the raw maps' key, the images, the
    labels and every setting; `key_extra` adds anything else the caller wants in it.
    `progress("smooth", done, N, None)` follows the views (never on a cache hit).
    """
    images = images.numpy() if isinstance(images, torch.Tensor) else np.asarray(images)
    n, h, w = images.shape[:3]
    if len(raw) != n:
        raise ValueError(f"{len(raw)} teacher maps for {n} images")
    if spec.kind == "segments" and (labels is None or tuple(labels.shape) != (n, h, w)):
        raise ValueError(f"segment smoothing needs (N, H, W) = {(n, h, w)} labels")
    version = "v2-windows" if spec.kind == "bilateral" else "v1"
    hsh = hashlib.sha1(f"dfield-smooth-{version}\0{spec}\0{sigma}\0{mode}\0{key_extra}\0".encode())
    hsh.update(raw.path.stem.encode() if raw.path is not None else np.ascontiguousarray(raw.maps).tobytes())
    for i in range(n):
        hsh.update(np.ascontiguousarray(images[i]).tobytes())
        if labels is not None:
            hsh.update(np.ascontiguousarray(labels[i]).astype(np.int32).tobytes())
    cache_dir = Path(cache_dir)
    npy = cache_dir / f"{hsh.hexdigest()}.npy"
    if spec.kind == "bilateral":
        return _bilateral_windows_cached(raw, images, spec, npy, progress)
    name = f"{raw.teacher}+{spec.kind}"
    if npy.is_file():
        try:
            maps = np.load(npy, mmap_mode="r")
            if maps.shape == (n, h, w, raw.dim) and maps.dtype == np.float16:
                return FeatureMaps(maps, raw.image_size, name, npy)
        except (OSError, ValueError):
            pass
    cache_dir.mkdir(parents=True, exist_ok=True)
    with atomic_path(npy) as tmp:
        out = np.lib.format.open_memmap(tmp, mode="w+", dtype=np.float16, shape=(n, h, w, raw.dim))
        for i in range(n):
            f = blur_within_labels(upsample_features(raw.view(i), h, w), torch.from_numpy(np.array(labels[i])),
                                   sigma, mode)
            out[i] = f.numpy().astype(np.float16)
            if progress is not None:
                progress("smooth", i + 1, n, None)
        out.flush()
        del out
    atomic_write_text(npy.with_suffix(".json"), json.dumps({"teacher": raw.teacher, "smooth": str(spec), "sigma": sigma,
                                                             "mode": mode, "shape": [n, h, w, raw.dim]}) + "\n",
                      durable=False)
    return FeatureMaps(np.load(npy, mmap_mode="r"), raw.image_size, name, npy)


def open_windows(raw: FeatureMaps, npy: Path, sigma_space: float, name: str = "") -> WindowedMaps | None:
    """The bilateral windows stored at `npy` (N, H, W, Ky, Kx) fp16 over `raw`'s cells, or None when the file is
    missing, unreadable or of another shape."""
    try:
        coef = np.load(npy, mmap_mode="r")
    except (OSError, ValueError):
        return None
    (ww, hh), (cw, ch) = raw.image_size, raw.resolution
    ay, ax, ky, kx = window_layout((ch, cw), (hh, ww), sigma_space)
    if coef.dtype != np.float16 or coef.shape != (len(raw), hh, ww, ky, kx):
        return None
    return WindowedMaps(raw, coef, ay.numpy(), ax.numpy(), name or f"{raw.teacher}+bilateral", Path(npy))


def _bilateral_windows_cached(raw: FeatureMaps, images: np.ndarray, spec: SmoothSpec, npy: Path,
                              progress: Progress | None) -> WindowedMaps:
    found = open_windows(raw, npy, spec.sigma_space)
    if found is not None:
        return found
    n, hh, ww = images.shape[:3]
    cw, ch = raw.resolution
    shape = (n, hh, ww, *window_layout((ch, cw), (hh, ww), spec.sigma_space)[2:])
    npy.parent.mkdir(parents=True, exist_ok=True)
    with atomic_path(npy) as tmp:
        out = np.lib.format.open_memmap(tmp, mode="w+", dtype=np.float16, shape=shape)
        for i in range(n):
            guide = torch.from_numpy(np.asarray(images[i])).float() / 255.0
            out[i] = bilateral_windows((ch, cw), guide, spec.sigma_space, spec.sigma_color)[2].numpy().astype(np.float16)
            if progress is not None:
                progress("smooth", i + 1, n, None)
        out.flush()
        del out
    atomic_write_text(npy.with_suffix(".json"), json.dumps({"teacher": raw.teacher, "smooth": str(spec),
                                                             "windows": list(shape)}) + "\n", durable=False)
    return open_windows(raw, npy, spec.sigma_space)
