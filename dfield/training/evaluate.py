"""Evaluation of a trained run (what `dfield eval` does): image metrics on held-out views and, on generated scenes
with a feature field, 3D segmentation against the teacher's own maps; written to RUN/eval.json.

In a torch.distributed job (`dfield eval --nproc N`, torchrun) every process renders its share of the views and
rank 0 writes the figures of all of them.
"""

from __future__ import annotations

import json
import math
import time
from pathlib import Path

import torch

from dfield.core import ranks
from dfield.core.image_rendering import ndc_of, render_image
from dfield.core.metrics import lpips_fn, psnr, ssim
from dfield.data.dataset import Dataset
from dfield.features.segmentation import segmentation_eval
from dfield.features.teachers import make_teacher
from dfield.io.atomic import atomic_write_text
from dfield.io.export import save_png
from dfield.io.run import load_eval_data, open_run
from dfield.models.base import Model


def evaluate_views(model: Model, data: Dataset, device="cpu", with_ssim: bool = True, with_lpips: bool = True,
                   save_dir: Path | None = None, chunk: int = 8192, split_views: bool = False) -> dict:
    """Render every view of `data` and compare with its images. Returns means and per-view figures.

    With `split_views`, every process of the distributed job must call this: each renders its share of the views
    and all of them return the figures of every view (`render_seconds_per_view` is then the processes' rendering
    time summed, per view)."""
    lp, lp_reason = lpips_fn(device) if with_lpips else (None, "not asked for")
    per_view = []
    t0 = time.perf_counter()
    for i in ranks.share(len(data)) if split_views else range(len(data)):
        out = render_image(model, data.cameras, i, ndc_of(data), chunk, device)
        gt = data.images[i].float() / 255.0
        row = {"view": i, "file": str(data.image_paths[i]) if data.image_paths else "", "psnr": psnr(out["rgb"], gt)}
        if with_ssim:
            row["ssim"] = ssim(out["rgb"], gt)
        if lp is not None:
            row["lpips"] = lp(out["rgb"], gt)
        per_view.append(row)
        if save_dir is not None:
            save_png(Path(save_dir) / f"{i:03d}.png", out["rgb"])
    render_s = time.perf_counter() - t0
    if split_views:
        per_view = [row for part in ranks.all_gather_object(per_view) for row in part]
        render_s = sum(ranks.all_gather_object(render_s))
    summary = {k: _mean([r[k] for r in per_view]) for k in ("psnr", "ssim", "lpips") if per_view and k in per_view[0]}
    if lp is None:
        summary["lpips"] = None
        summary["lpips_note"] = lp_reason
    summary.update({"views": len(per_view), "render_seconds_per_view": render_s / max(1, len(per_view)), "per_view": per_view})
    return summary


def _mean(xs: list[float]) -> float:
    xs = [x for x in xs if x is not None and math.isfinite(x)]
    return sum(xs) / len(xs) if xs else float("nan")


def write_eval(run_dir: Path, results: dict) -> Path:
    """RUN/eval.json, atomically."""
    path = Path(run_dir) / "eval.json"
    atomic_write_text(path, json.dumps(results, indent=1))
    return path


@torch.no_grad()
def evaluate_run(run_dir, split: str = "test", device: str = "cpu", every: int | None = None, save_images: bool = False,
                 with_lpips: bool = True) -> dict:
    """Evaluate a run folder on `split` (every `every`-th view; default: the run's test_every) and write
    RUN/eval.json. Returns the figures: PSNR/SSIM/LPIPS means and per view, training seconds and peak memory,
    and `segmentation` (field vs teacher mIoU) for feature runs on scenes with ground-truth ids."""
    run = open_run(run_dir, device)
    data = load_eval_data(run.cfg, split, every)
    save_dir = Path(run_dir) / "eval_images" if save_images else None
    res = evaluate_views(run.model, data, device, with_lpips=with_lpips, save_dir=save_dir, split_views=True)
    res.update({"split": split, "step": run.step, "train_seconds": run.meta.get("seconds"),
                "peak_rss_bytes": run.meta.get("peak_rss_bytes"), "model": run.cfg.model})
    if ranks.world() > 1:
        res["processes"] = ranks.world()
    if run.cfg.features.teacher and data.object_ids is not None and ranks.is_main():  # rank 0 alone: small
        teacher = make_teacher(run.cfg.features.teacher)
        if hasattr(teacher, "object_embeddings"):
            res["segmentation"] = segmentation_eval(run.model, data, teacher, device)
    if ranks.is_main():
        write_eval(run_dir, res)
    ranks.barrier()  # eval.json is in place for every process
    return res
