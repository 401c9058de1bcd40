"""Image, segmentation and resource metrics. Images are (H, W, 3) float tensors in [0, 1], CPU or CUDA."""

from __future__ import annotations

import math
import resource
import sys
from pathlib import Path

import torch
import torch.nn.functional as F


def _as_float(img) -> torch.Tensor:
    img = torch.as_tensor(img)
    if img.dtype == torch.uint8:
        return img.float() / 255.0
    return img.float()


def psnr(pred, gt, mask=None) -> float:
    """PSNR in dB for data range 1. With `mask` (H, W) bool, only the masked pixels count
    (used for edit locality: PSNR outside a selection should stay high)."""
    pred, gt = _as_float(pred), _as_float(gt).to(pred.device)
    err = (pred - gt) ** 2
    if mask is not None:
        mask = torch.as_tensor(mask, device=err.device).bool()
        if not mask.any():
            return float("nan")
        err = err[mask]
    mse = err.double().mean().item()
    return math.inf if mse == 0 else -10.0 * math.log10(mse)


def psnr_from_mse(mse: float) -> float:
    """PSNR in dB for data range 1 of a mean squared error (floored at 1e-12: 120 dB)."""
    return -10.0 * math.log10(max(mse, 1e-12))


def _gaussian_kernel(size: int, sigma: float, device) -> torch.Tensor:
    x = torch.arange(size, dtype=torch.float64, device=device) - (size - 1) / 2
    k = torch.exp(-0.5 * (x / sigma) ** 2)
    return k / k.sum()


def ssim(pred, gt, window: int = 11, sigma: float = 1.5, k1: float = 0.01, k2: float = 0.03) -> float:
    """SSIM as in the NeRF/TensoRF `rgb_ssim`: Gaussian window, 'valid' convolution, data range 1,
    mean over pixels and channels. Matches skimage with gaussian_weights=True, sigma=1.5,
    use_sample_covariance=False."""
    # float64 because sigma = E[x^2] - E[x]^2 loses most digits in float32 on smooth regions.
    pred = _as_float(pred).double()
    gt = _as_float(gt).double().to(pred.device)
    if pred.ndim == 2:
        pred, gt = pred[..., None], gt[..., None]
    c = pred.shape[-1]
    x = pred.permute(2, 0, 1)[None]  # (1, C, H, W)
    y = gt.permute(2, 0, 1)[None]
    k = _gaussian_kernel(window, sigma, pred.device)
    kh = k.view(1, 1, 1, -1).repeat(c, 1, 1, 1)
    kv = k.view(1, 1, -1, 1).repeat(c, 1, 1, 1)

    def filt(z):  # separable depthwise blur, no padding ('valid')
        return F.conv2d(F.conv2d(z, kh, groups=c), kv, groups=c)

    mu_x, mu_y = filt(x), filt(y)
    sxx = (filt(x * x) - mu_x**2).clamp_min(0)
    syy = (filt(y * y) - mu_y**2).clamp_min(0)
    sxy = filt(x * y) - mu_x * mu_y
    # Rounding can push |cov| above sqrt(var_x var_y); rgb_ssim clips it the same way.
    sxy = torch.sign(sxy) * torch.minimum(torch.sqrt(sxx * syy), sxy.abs())
    c1, c2 = k1**2, k2**2
    num = (2 * mu_x * mu_y + c1) * (2 * sxy + c2)
    den = (mu_x**2 + mu_y**2 + c1) * (sxx + syy + c2)
    return (num / den).mean().item()


# ---------------------------------------------------------------------------------------------- LPIPS

_ALEXNET_CKPT = "alexnet-owt-7be5be79.pth"  # the file torchvision's pretrained AlexNet is cached as


def _lpips_unavailable_reason() -> str | None:
    try:
        import lpips  # noqa: F401  (optional and slow: it imports torchvision)
    except Exception as e:  # not installed, or its torchvision import failed
        return f"lpips package not importable ({type(e).__name__}: {e})"
    lin = Path(lpips.__file__).parent / "weights" / "v0.1" / "alex.pth"
    if not lin.is_file():
        return f"lpips linear weights missing ({lin})"
    ckpt = Path(torch.hub.get_dir()) / "checkpoints" / _ALEXNET_CKPT
    if not ckpt.is_file():
        return f"AlexNet weights not cached ({ckpt}); not downloading"
    return None


class LPIPS:
    """LPIPS (AlexNet) from the `lpips` package, built only from weights already on disk.
    Call `LPIPS.create(device)`; it returns (None, reason) when the weights are not available."""

    def __init__(self, model, device):
        self.model = model
        self.device = device

    @classmethod
    def create(cls, device="cpu"):
        """(LPIPS on `device`, None), or (None, one-line reason) when lpips or its weights are not on disk.

        Never downloads: torch.hub downloads are blocked while the model is built."""
        reason = _lpips_unavailable_reason()
        if reason is not None:
            return None, reason
        import lpips  # optional and slow: it imports torchvision

        def no_download(*args, **kwargs):
            raise RuntimeError("download blocked")

        # The checks above should make torchvision load from cache; this makes sure no code path
        # quietly reaches the network anyway.
        saved = torch.hub.download_url_to_file
        torch.hub.download_url_to_file = no_download
        try:
            model = lpips.LPIPS(net="alex", verbose=False).eval().to(device)
        except Exception as e:
            return None, f"could not build LPIPS ({type(e).__name__}: {e})"
        finally:
            torch.hub.download_url_to_file = saved
        for p in model.parameters():
            p.requires_grad_(False)
        return cls(model, device), None

    @torch.no_grad()
    def __call__(self, pred, gt) -> float:
        def prep(img):  # (H, W, 3) in [0, 1] -> (1, 3, H, W) in [-1, 1], as LPIPS expects
            return (_as_float(img).to(self.device).permute(2, 0, 1)[None] * 2 - 1).clamp(-1, 1)

        return self.model(prep(pred), prep(gt)).item()


def lpips_fn(device="cpu"):
    """(callable(pred, gt) -> float, None) or (None, one-line reason)."""
    return LPIPS.create(device)


# ------------------------------------------------------------------------------------- segmentation


def _ids(a) -> torch.Tensor:
    return torch.as_tensor(a).long()


def intersection_union(pred, gt) -> tuple[int, int]:
    """Pixel counts of the intersection and the union of two boolean masks of one shape (pooled over all axes)."""
    pred, gt = torch.as_tensor(pred).bool(), torch.as_tensor(gt).bool().to(torch.as_tensor(pred).device)
    return int((pred & gt).sum().item()), int((pred | gt).sum().item())


def iou(pred, gt) -> float | None:
    """Intersection over union of two boolean masks, pooled over all pixels (None if both are empty).

    Example:
        >>> iou(torch.tensor([True, True, False]), torch.tensor([True, False, False]))
        0.5
    """
    inter, union = intersection_union(pred, gt)
    return None if union == 0 else inter / union


def miou(pred_ids, gt_ids, ids=None, ignore=None):
    """Mean IoU over `ids` (default: every id in pred or gt). Ids absent from both maps are skipped;
    pixels where gt == `ignore` do not count. Returns (mean_iou, {id: iou}); mean is nan if nothing counted."""
    pred, gt = _ids(pred_ids), _ids(gt_ids)
    gt = gt.to(pred.device)
    valid = torch.ones_like(gt, dtype=torch.bool) if ignore is None else gt != ignore
    pred, gt = pred[valid], gt[valid]
    if ids is None:
        ids = torch.unique(torch.cat([pred, gt])).tolist()
    per_id = {}
    for i in ids:
        if ignore is not None and i == ignore:
            continue
        value = iou(pred == i, gt == i)
        if value is not None:
            per_id[int(i)] = value
    mean = sum(per_id.values()) / len(per_id) if per_id else float("nan")
    return mean, per_id


def mask_boundary(mask: torch.Tensor) -> torch.Tensor:
    """Boundary pixels of boolean masks (..., H, W): mask pixels with a 4-neighbour outside the mask (the image
    border counts as outside)."""
    m = mask.bool()
    x = m.reshape(-1, 1, *m.shape[-2:]).float()
    cross = F.pad(x, (1, 1, 1, 1))
    four = torch.minimum(torch.minimum(cross[..., :-2, 1:-1], cross[..., 2:, 1:-1]),
                         torch.minimum(cross[..., 1:-1, :-2], cross[..., 1:-1, 2:]))
    return m & ~(four.reshape(m.shape) > 0)


def boundary_f(pred, gt, tolerance: int = 2) -> float | None:
    """Boundary F-score of boolean masks pred and gt (..., H, W): precision = share of predicted boundary pixels
    within `tolerance` pixels (Chebyshev) of a true boundary pixel, recall the other way round, F = 2PR / (P + R).
    None when neither has a boundary; 0 when only one has.

    Example:
        >>> a = torch.zeros(8, 8, dtype=torch.bool); a[2:6, 2:6] = True
        >>> boundary_f(a, a), boundary_f(a, torch.roll(a, 1, 1), tolerance=1), boundary_f(a, torch.zeros_like(a))
        (1.0, 1.0, 0.0)
    """
    bp, bg = mask_boundary(torch.as_tensor(pred)), mask_boundary(torch.as_tensor(gt))
    n_p, n_g = int(bp.sum()), int(bg.sum())
    if n_p == 0 and n_g == 0:
        return None
    if n_p == 0 or n_g == 0:
        return 0.0

    def near(b):
        x = b.reshape(-1, 1, *b.shape[-2:]).float()
        return (F.max_pool2d(x, 2 * tolerance + 1, stride=1, padding=tolerance) > 0).reshape(b.shape)

    precision = int((bp & near(bg)).sum()) / n_p
    recall = int((bg & near(bp)).sum()) / n_g
    return 0.0 if precision + recall == 0 else 2 * precision * recall / (precision + recall)


def pixel_accuracy(pred_ids, gt_ids, ignore=None) -> float:
    """Fraction of pixels whose predicted id equals the ground truth; pixels where gt == `ignore` do not count
    (nan if none counts)."""
    pred, gt = _ids(pred_ids), _ids(gt_ids)
    gt = gt.to(pred.device)
    valid = torch.ones_like(gt, dtype=torch.bool) if ignore is None else gt != ignore
    n = valid.sum().item()
    return float("nan") if n == 0 else (pred[valid] == gt[valid]).sum().item() / n


# ------------------------------------------------------------------------------------------- memory


def _vm_hwm_bytes() -> int | None:
    try:
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) * 1024
    except OSError:
        pass
    return None


def peak_rss_bytes() -> int:
    """Peak resident memory of this process. VmHWM first, because it can be reset (see PeakMemory);
    ru_maxrss (KiB on Linux, bytes on macOS) is the lifetime peak."""
    hwm = _vm_hwm_bytes()
    if hwm is not None:
        return hwm
    r = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return r if sys.platform == "darwin" else r * 1024


class PeakMemory:
    """Peak memory over a `with` block: `rss_bytes` (process resident set) and `cuda_bytes`
    (torch.cuda.max_memory_allocated, None without CUDA).

    The RSS peak is since the block started only where Linux lets us reset VmHWM
    (`rss_reset` says whether it did); otherwise it is the process's lifetime peak. The reset is
    process-wide, so a nested block also resets the RSS peak an enclosing block would report."""

    def __init__(self, device=None):
        self.device = torch.device(device) if device is not None else None
        self.rss_bytes: int | None = None
        self.cuda_bytes: int | None = None
        self.rss_reset = False

    def _cuda(self) -> bool:
        if not torch.cuda.is_available():
            return False
        return self.device is None or self.device.type == "cuda"

    def __enter__(self):
        try:
            Path("/proc/self/clear_refs").write_text("5")  # "5" resets the peak RSS (VmHWM)
            self.rss_reset = True
        except OSError:
            self.rss_reset = False
        if self._cuda():
            torch.cuda.reset_peak_memory_stats(self.device)
        return self

    def __exit__(self, *exc):
        self.read()
        return False

    def read(self) -> dict:
        """Record the peaks so far in `rss_bytes` / `cuda_bytes` and return them as a dict of those two keys."""
        self.rss_bytes = peak_rss_bytes()
        self.cuda_bytes = torch.cuda.max_memory_allocated(self.device) if self._cuda() else None
        return {"rss_bytes": self.rss_bytes, "cuda_bytes": self.cuda_bytes}

    def summary(self) -> str:
        """One line for logs, in MiB: 'peak RSS ... MiB[, peak CUDA allocated ... MiB]' (reads first if never read)."""
        if self.rss_bytes is None:
            self.read()
        s = f"peak RSS {self.rss_bytes / 2**20:.0f} MiB" + ("" if self.rss_reset else " (process lifetime)")
        if self.cuda_bytes is not None:
            s += f", peak CUDA allocated {self.cuda_bytes / 2**20:.0f} MiB"
        return s
