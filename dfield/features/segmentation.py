"""Segmentation quality of a distilled feature field against ground truth, beside the teacher's own.

For generated scenes (object ids known), every pixel is labelled with the nearest object embedding
(cosine) in teacher space: once from the field's rendered, decoded features, and once from the teacher's
2D feature map of the same held-out image. The gap between the two is what 3D fusion buys.
"""

from __future__ import annotations

import time

import torch
import torch.nn.functional as F

from dfield.core.image_rendering import ndc_of, render_image
from dfield.core.metrics import miou, pixel_accuracy
from dfield.data.dataset import Dataset
from dfield.models.base import Model


def nearest_label(features: torch.Tensor, embeddings: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    """(…, D) features -> (…) label of the most cosine-similar embedding (K, D)."""
    sim = F.normalize(features, dim=-1) @ F.normalize(embeddings, dim=-1).T
    return labels[sim.argmax(-1)]


@torch.no_grad()
def render_decoded_features(model: Model, data: Dataset, i: int, device="cpu", chunk: int = 8192) -> torch.Tensor:
    """The field's features at every pixel of view i, decoded to teacher space: (H, W, D)."""
    out = render_image(model, data.cameras, i, ndc_of(data), chunk, device, features=True)
    return model.decode(out["feature"].to(device)).cpu()


def upsample_map(fmap: torch.Tensor, height: int, width: int) -> torch.Tensor:
    """(h, w, D) teacher map -> (H, W, D), bilinear, as a user of the teacher alone would."""
    x = fmap.permute(2, 0, 1)[None].float()
    return F.interpolate(x, size=(height, width), mode="bilinear", align_corners=False)[0].permute(1, 2, 0)


@torch.no_grad()
def segmentation_eval(model: Model, data: Dataset, teacher, device="cpu") -> dict:
    """mIoU / pixel accuracy of the field and of the teacher on `data`'s views (needs object ids)."""
    if data.object_ids is None:
        raise ValueError(f"{data.source}: no ground-truth object ids; segmentation needs a generated scene")
    if not hasattr(teacher, "object_embeddings"):
        raise ValueError(f"teacher {teacher.name} has no per-object embeddings to label pixels with")
    emb = teacher.object_embeddings()
    labels = torch.arange(len(emb))
    field_pred, teacher_pred = [], []
    t0 = time.perf_counter()
    teacher_maps = teacher.encode(data.images, data.object_ids)
    for i in range(len(data)):
        field_pred.append(nearest_label(render_decoded_features(model, data, i, device), emb, labels))
        teacher_pred.append(nearest_label(upsample_map(teacher_maps[i], data.height, data.width), emb, labels))
    gt = data.object_ids.long()
    fp, tp = torch.stack(field_pred), torch.stack(teacher_pred)
    f_miou, f_per = miou(fp, gt)
    t_miou, t_per = miou(tp, gt)
    names = {int(k): v for k, v in data.object_names.items()}
    return {
        "field_miou": f_miou, "teacher_miou": t_miou,
        "field_accuracy": pixel_accuracy(fp, gt), "teacher_accuracy": pixel_accuracy(tp, gt),
        "per_object": {names.get(int(k), str(k)): {"field": f_per[k], "teacher": t_per.get(k)} for k in f_per},
        "views": len(data), "seconds": time.perf_counter() - t0,
    }
