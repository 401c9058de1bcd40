"""How good a guided edit is, on the source run's held-out views.

- Preservation: PSNR of the edited render against the source render outside the region (pixels whose rays meet
  no point of the attention, grown by a pixel); on generated scenes also outside the edited object's ground truth.
- On a generated scene variant (`dfield generate-scene --recolor / --remove / --add-sphere`, the same scene with
  the edit's ground truth), what the edit should have made: PSNR inside the recoloured object against the variant's
  images; the opacity left in a removed object's box; the IoU of the added matter with the added sphere.
- With CLIP weights and a text: the CLIP directional score (Blending-NeRF's), the cosine between the change of
  image embedding (edited minus source render) and the change of text embedding (target minus source text).
"""

from __future__ import annotations

import json
import math
from collections.abc import Callable
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

from dfield.core.image_rendering import ndc_of, render_image
from dfield.core.metrics import psnr_from_mse
from dfield.data import load_dataset
from dfield.edit.build import EditedModel
from dfield.errors import EditError
from dfield.fields.blended import BlendedField
from dfield.io.export import save_png
from dfield.io.run import Run, load_eval_data

GROUND = 0.03  # generated scenes: matter below this height is the ground disk, not an object


def added_share(field: BlendedField) -> Callable[[torch.Tensor], torch.Tensor]:
    """Points -> the edit's share of the blended density (sigma_E / sigma_B; 0 outside the attention)."""

    def share(x: torch.Tensor) -> torch.Tensor:
        a = field.attention(x)
        m = (a > 0).nonzero()[:, 0]
        out = x.new_zeros(len(x))
        if len(m):
            p = field.parts(x[m], a[m])
            out[m] = p["sigma_e"] / p["sigma"].clamp(min=1e-12)
        return out

    return share


def in_box(lo, hi, above: float = GROUND) -> Callable[[torch.Tensor], torch.Tensor]:
    """Points -> 1 inside the box [lo, hi] and above height `above`, else 0."""
    lo, hi = torch.tensor(lo, dtype=torch.float32), torch.tensor(hi, dtype=torch.float32)
    return lambda x: (((x >= lo.to(x)) & (x <= hi.to(x))).all(-1) & (x[:, 2] > above)).float()


def _grow(mask: torch.Tensor, px: int = 1) -> torch.Tensor:
    return F.max_pool2d(mask.float()[None, None], 2 * px + 1, stride=1, padding=px)[0, 0] > 0


class _Pooled:
    """Squared error and pixel counts pooled over views (a PSNR over all views' pixels)."""

    def __init__(self):
        self.se, self.n = 0.0, 0

    def add(self, a: torch.Tensor, b: torch.Tensor, mask: torch.Tensor) -> None:
        m = mask.bool()
        self.se += float((a[m] - b[m]).square().sum())
        self.n += int(m.sum()) * a.shape[-1]

    def psnr(self):
        return None if self.n == 0 else psnr_from_mse(max(self.se / self.n, 1e-12))


def read_variant(scene: Path) -> dict:
    """The `variant` record of a generated scene's objects.json (recolor / remove / add), {} when none."""
    meta = Path(scene) / "objects.json"
    if not meta.is_file():
        raise EditError(f"{scene}: not a generated scene (no objects.json)")
    return json.loads(meta.read_text()).get("variant", {})


@torch.no_grad()
def evaluate_guided(edited: Run, src: Run, eval_scene: Path | None = None, clip=None, text=None, every: int = 1,
                    save_dir: Path | None = None, save_views: int = 4, device="cpu",
                    progress: Callable | None = None) -> dict:
    """Score the edit run `edited` (a BlendedModel) against its source run on the test views (see the module
    docstring). Writes edited/original PNGs of the first `save_views` views to `save_dir` (default EDIT/eval/)."""
    data = load_eval_data(src.cfg, "test", every)
    cams, ndc = data.cameras, ndc_of(data)
    field = edited.model.as_field()
    renderer = EditedModel(edited.model, field, [])
    variant = read_variant(eval_scene) if eval_scene is not None else {}
    target = None
    if variant:
        d = src.cfg.data
        target = load_dataset(Path(eval_scene), "test", d.downscale, background=d.background,
                              holdout_every=d.holdout_every)
        if every > 1:
            target = target.subset(torch.arange(0, len(target), every))
        if len(target) != len(data) or (target.width, target.height) != (data.width, data.height):
            raise EditError(f"{eval_scene}: its test views do not match the run's ({len(target)} vs {len(data)} views)")
    channels = {"touched": field.touched}
    obj_id = None
    if "remove" in variant:
        obj_id = int(variant["remove"]["id"])
        meta = json.loads((Path(src.cfg.data.path) / "objects.json").read_text())
        box = next(o["bbox"] for o in meta["objects"] if o["id"] == obj_id)
        channels["object"] = in_box(*box)
    if "add" in variant or "add" in field.kinds:
        channels["added"] = added_share(field)
    if "recolor" in variant:
        obj_id = int(variant["recolor"]["id"])
    save_dir = Path(save_dir) if save_dir is not None else Path(edited.path) / "eval"
    outside, outside_obj, inside, inside_src, fit = _Pooled(), _Pooled(), _Pooled(), _Pooled(), _Pooled()
    opacity, inter, union, clip_scores, rows = [], 0, 0, [], []
    text_dir = None
    if clip is not None and text is not None:
        t = clip.encode_text(list(text))
        text_dir = F.normalize(t[0] - t[1], dim=0)
    for i in range(len(cams)):
        e = render_image(renderer, cams, i, ndc, device=device, channels=channels)
        s = render_image(src.model, cams, i, ndc, device=device)
        region = _grow(e["touched"] > 0.01)
        outside.add(e["rgb"], s["rgb"], ~region)
        row = {"view": i, "region_fraction": float(region.float().mean())}
        if obj_id is not None and data.object_ids is not None:
            obj = data.object_ids[i] == obj_id
            outside_obj.add(e["rgb"], s["rgb"], ~_grow(obj))
            if "recolor" in variant:
                gt = target.images[i].float() / 255
                inside.add(e["rgb"], gt, obj)
                inside_src.add(s["rgb"], gt, obj)
                fit.add(s["rgb"], data.images[i].float() / 255, obj)
            if "remove" in variant and obj.any():
                opacity.append(e["object"][obj])
        if "add" in variant:
            gt_mask = target.object_ids[i] == int(variant["add"]["id"])
            pred = (e["added"] > 0.5) & (e["acc"] > 0.5)
            inter += int((pred & gt_mask).sum())
            union += int((pred | gt_mask).sum())
            outside_obj.add(e["rgb"], s["rgb"], ~_grow(gt_mask | pred))
        if text_dir is not None:
            pair = torch.stack([e["rgb"], s["rgb"]]).permute(0, 3, 1, 2).clamp(0, 1)
            emb = clip.encode_image(pair)
            clip_scores.append(float(F.normalize(emb[0] - emb[1], dim=0, eps=1e-6) @ text_dir))
        if i < save_views:
            save_png(save_dir / f"edited_{i:03d}.png", e["rgb"])
            save_png(save_dir / f"original_{i:03d}.png", s["rgb"])
            if target is not None:
                save_png(save_dir / f"target_{i:03d}.png", target.images[i].float() / 255)
        rows.append(row)
        if progress is not None:
            progress("evaluate", i + 1, len(cams), None)
    res = {"eval_views": len(cams), "preserve_psnr": outside.psnr(),
           "region_fraction": float(np.mean([r["region_fraction"] for r in rows])) if rows else 0.0}
    if variant:
        res["variant"] = variant
        res["eval_scene"] = str(eval_scene)
    if outside_obj.n:
        res["preserve_psnr_outside_object"] = outside_obj.psnr()
    if inside.n:
        res["target_psnr_inside"] = inside.psnr()
        res["source_psnr_inside"] = inside_src.psnr()
        res["source_fit_psnr_inside"] = fit.psnr()  # the source against its own photos there: the ceiling
    if opacity:
        o = torch.cat(opacity)
        res["object_opacity_mean"] = float(o.mean())
        res["object_opacity_p95"] = float(o.quantile(0.95))
    if "add" in variant:
        res["added_iou"] = inter / max(union, 1)
    if clip_scores:
        res["clip_directional"] = float(np.mean(clip_scores))
    return {k: (v if not (isinstance(v, float) and math.isinf(v)) else "inf") for k, v in res.items()}
