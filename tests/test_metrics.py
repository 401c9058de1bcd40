import math

import numpy as np
import pytest
import torch

from dfield.core.metrics import LPIPS, PeakMemory, lpips_fn, miou, pixel_accuracy, psnr, ssim


def _img(seed, h=40, w=52):
    g = torch.Generator().manual_seed(seed)
    return torch.rand(h, w, 3, generator=g)


def test_psnr_known_values():
    gt = torch.full((8, 9, 3), 0.5)
    assert psnr(gt + 0.1, gt) == pytest.approx(20.0, abs=1e-4)
    assert psnr(gt - 0.01, gt) == pytest.approx(40.0, abs=1e-3)
    assert psnr(gt, gt) == math.inf


def test_psnr_mask_counts_only_selected_pixels():
    gt = torch.zeros(10, 10, 3)
    pred = gt.clone()
    pred[:5] = 0.1  # error only in the top half
    mask = torch.zeros(10, 10, dtype=torch.bool)
    mask[5:] = True
    assert psnr(pred, gt, mask=mask) == math.inf
    assert psnr(pred, gt, mask=~mask) == pytest.approx(20.0, abs=1e-4)
    # whole image: half the pixels carry mse 0.01 -> 10 log10(200)
    assert psnr(pred, gt) == pytest.approx(10 * math.log10(200), abs=1e-4)
    assert math.isnan(psnr(pred, gt, mask=torch.zeros(10, 10, dtype=torch.bool)))


def test_ssim_identity_and_skimage():
    from skimage.metrics import structural_similarity

    a = _img(0)
    # a structured image plus noise, so SSIM lands mid-range rather than near 0 or 1
    yy, xx = torch.meshgrid(torch.linspace(0, 1, 40), torch.linspace(0, 1, 52), indexing="ij")
    base = torch.stack([xx, yy, (xx + yy) / 2], -1)
    b = (base + 0.15 * (a - 0.5)).clamp(0, 1)
    assert ssim(base, base) == pytest.approx(1.0, abs=1e-9)
    for x, y in [(base, b), (a, _img(1)), (b, a)]:
        ref = structural_similarity(
            x.numpy(), y.numpy(), gaussian_weights=True, sigma=1.5,
            use_sample_covariance=False, channel_axis=-1, data_range=1,
        )
        assert ssim(x, y) == pytest.approx(ref, abs=1e-3)
    assert 0.2 < ssim(base, b) < 0.99


def test_lpips_is_available_or_explains_why():
    fn, reason = lpips_fn("cpu")
    if fn is None:
        assert isinstance(reason, str) and reason and "\n" not in reason
    else:
        assert isinstance(fn, LPIPS)
        x = _img(2, 64, 64)
        assert fn(x, x) == pytest.approx(0.0, abs=1e-4)
        assert fn(x, _img(3, 64, 64)) > 0.05


def test_miou_and_pixel_accuracy():
    gt = torch.tensor([[0, 0, 1, 1],
                       [0, 0, 1, 1],
                       [2, 2, 2, 2]])
    pred = torch.tensor([[0, 0, 1, 1],
                         [0, 1, 1, 1],
                         [2, 2, 2, 0]])
    mean, per = miou(pred, gt)
    # id 0: inter 3, union 5; id 1: inter 4, union 5; id 2: inter 3, union 4
    assert per == pytest.approx({0: 3 / 5, 1: 4 / 5, 2: 3 / 4})
    assert mean == pytest.approx((3 / 5 + 4 / 5 + 3 / 4) / 3)
    assert pixel_accuracy(pred, gt) == pytest.approx(10 / 12)

    # ids absent from both maps are skipped, not counted as 0 or 1
    mean7, per7 = miou(pred, gt, ids=[1, 2, 7])
    assert set(per7) == {1, 2} and mean7 == pytest.approx((4 / 5 + 3 / 4) / 2)

    # ignore: gt pixels with that id drop out entirely (numpy input works too)
    mean_i, per_i = miou(pred.numpy(), gt.numpy(), ignore=0)
    assert set(per_i) == {1, 2}
    assert per_i[1] == pytest.approx(4 / 4)  # the wrong "1" sat on an ignored gt pixel
    assert per_i[2] == pytest.approx(3 / 4)
    assert pixel_accuracy(pred, gt, ignore=0) == pytest.approx(7 / 8)


def test_peak_memory_sees_an_allocation():
    with PeakMemory() as pm:
        buf = np.ones(64 * 2**20 // 8)  # 64 MiB, touched
        del buf
    assert pm.rss_bytes is not None and pm.rss_bytes > 64 * 2**20
    if not torch.cuda.is_available():
        assert pm.cuda_bytes is None
    assert "MiB" in pm.summary()


def test_lpips_refuses_without_cached_alexnet(tmp_path, monkeypatch):
    # A stand-in `lpips` package whose linear weights exist but whose AlexNet is not in the hub cache:
    # the factory must give a reason instead of building the model (which would download).
    import sys
    import types

    pkg = tmp_path / "lpips"
    (pkg / "weights" / "v0.1").mkdir(parents=True)
    (pkg / "weights" / "v0.1" / "alex.pth").write_bytes(b"")
    fake = types.ModuleType("lpips")
    fake.__file__ = str(pkg / "__init__.py")
    fake.LPIPS = lambda *a, **k: pytest.fail("must not build the model")
    monkeypatch.setitem(sys.modules, "lpips", fake)
    monkeypatch.setattr(torch.hub, "get_dir", lambda: str(tmp_path / "hub"))
    fn, reason = lpips_fn("cpu")
    assert fn is None and "AlexNet" in reason and "not downloading" in reason


def test_boundary_f_by_hand():
    from dfield.core.metrics import boundary_f, mask_boundary

    a = torch.zeros(10, 10, dtype=torch.bool)
    a[2:6, 2:6] = True
    assert int(mask_boundary(a).sum()) == 12  # a 4x4 square: 16 pixels, 4 inside
    assert boundary_f(a, a) == 1.0
    shifted = torch.zeros_like(a)
    shifted[2:6, 4:8] = True  # two columns right
    assert boundary_f(a, shifted, tolerance=2) == 1.0
    # tolerance 0: the boundaries share rows 2 and 5 at columns 4 and 5 only (4 of 12 pixels each way): P = R = 1/3
    assert boundary_f(a, shifted, tolerance=0) == pytest.approx(1 / 3)
    assert boundary_f(a, torch.zeros_like(a)) == 0.0
    assert boundary_f(torch.zeros_like(a), torch.zeros_like(a)) is None
    full = torch.ones(4, 4, dtype=torch.bool)
    assert int(mask_boundary(full).sum()) == 12  # the image border counts as outside
