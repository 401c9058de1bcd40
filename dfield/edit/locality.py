"""Rendering an edited scene beside the original, and scoring what changed.

Locality: the edited render against the unedited one over the pixels no edit touched (rays that never
meet a touched point, in either scene). By construction those rays see identical field values, so the
PSNR there should be very high (often infinite); anything less is a leak.
Selections: on generated scenes, each edit's selected region as seen from a view is compared with the
ground-truth object it overlaps most (IoU).
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F

from dfield.core.image_rendering import render_image
from dfield.core.metrics import intersection_union, psnr
from dfield.edit.build import EditedModel


@torch.no_grad()
def render_pair(edited: EditedModel, cameras, i: int, ndc=None, chunk: int = 8192, device: str = "cpu") -> dict[str, torch.Tensor]:
    """Edited and original renders of camera i with the touched region seen in each, and each edit's selection
    as seen in the original (`selK` for edit K). Images are (H, W, ...) on the CPU."""
    original = EditedModel(edited.base, edited.base.as_field(), [])  # the unedited field, rendered the same way
    sel_channels = {f"sel{k}": layer.selection.mask for k, layer in enumerate(edited.layers)
                    if layer.selection is not None}
    e = render_image(edited, cameras, i, ndc, chunk, device, channels={"touched": edited.touched})
    b = render_image(original, cameras, i, ndc, chunk, device, channels={"touched": edited.touched, **sel_channels})
    res = {"rgb": e["rgb"], "depth": e["depth"], "acc": e["acc"], "base_rgb": b["rgb"], "base_acc": b["acc"],
           "touched": torch.maximum(e["touched"], b["touched"])}
    for k in sel_channels:
        res[k] = b[k]
    return res


def untouched_mask(touched: torch.Tensor, threshold: float = 0.01, grow: int = 1) -> torch.Tensor:
    """Pixels whose rays meet no touched point (weight below `threshold`), minus a `grow`-pixel margin."""
    t = (touched > threshold).float()[None, None]
    if grow > 0:
        t = F.max_pool2d(t, 2 * grow + 1, stride=1, padding=grow)
    return t[0, 0] == 0


def locality(pair: dict) -> dict:
    """Score a `render_pair` over its untouched pixels (`untouched_mask`): PSNR of the edited render against the
    original there (inf when identical, nan when no pixel is untouched), their largest absolute difference, and
    the fraction of pixels that count."""
    keep = untouched_mask(pair["touched"])
    value = psnr(pair["rgb"], pair["base_rgb"], keep)
    diff = (pair["rgb"] - pair["base_rgb"]).abs()[keep]
    return {"psnr_outside": value, "max_abs_diff_outside": float(diff.max()) if diff.numel() else 0.0,
            "untouched_fraction": float(keep.float().mean())}


def object_overlaps(region: torch.Tensor, object_ids: torch.Tensor, totals: dict | None = None) -> dict:
    """Accumulate intersection and union of a selected pixel region with every ground-truth object (id >= 1)."""
    totals = {} if totals is None else totals
    for oid in torch.unique(object_ids).tolist():
        if oid == 0:
            continue
        inter, union = intersection_union(region, object_ids == oid)
        before = totals.get(oid, (0, 0))
        totals[oid] = (before[0] + inter, before[1] + union)
    return totals


def best_object(totals: dict, names: dict) -> dict:
    """The object a selection matches best over all views, and its IoU (pooled over the views)."""
    if not totals:
        return {"object": None, "iou": 0.0}
    oid, (inter, union) = max(totals.items(), key=lambda kv: kv[1][0] / max(kv[1][1], 1))
    return {"object": names.get(str(oid), str(oid)), "iou": inter / max(union, 1)}


def json_number(x: float):
    """JSON has no infinity: identical images are reported as the string 'inf'."""
    return "inf" if isinstance(x, float) and math.isinf(x) else x
