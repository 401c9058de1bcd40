"""Paint edited views for `dfield guide-edit` from a generated scene variant: what a user would do in an image editor,
done with the ground truth.

The source run's renders of two training views get the variant's pixels pasted where the edit is: the recoloured
object's pixels (variant made with generate-scene --recolor), the removed object's pixels (--remove: what lies
behind it in the variant), or the added sphere's pixels (--add-sphere). The two views are the one that shows the
edit largest and, of the views at least --min-angle degrees away from it, the one that shows it largest.
Writes OUT/rgb_NNN.png (NNN = training view, as guide-edit reads them) and OUT/masks/mask_NNN.png.

    python bench/paint_views.py RUN VARIANT OUT [--views 2] [--min-angle 60]
"""

from __future__ import annotations

import argparse
import json
import math
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from dfield.core.image_rendering import ndc_of, render_image
from dfield.data import load_dataset
from dfield.io.export import save_png
from dfield.io.run import open_run


def edit_masks(run, variant: Path) -> tuple[str, int, torch.Tensor, torch.Tensor]:
    """(kind, object id, (V, H, W) masks of the edit's pixels per training view, (V, H, W, 3) variant images)."""
    info = json.loads((variant / "objects.json").read_text()).get("variant")
    if not info:
        raise SystemExit(f"{variant}: not a generated scene variant (no 'variant' in objects.json)")
    kind = next(iter(info))
    oid = int(info[kind]["id"])
    d = run.cfg.data
    var = load_dataset(variant, "train", d.downscale, background=d.background)
    src = load_dataset(d.path, "train", d.downscale, background=d.background)
    ids = src.object_ids if kind != "add" else var.object_ids
    return kind, oid, ids == oid, var.images.float() / 255


def pick_views(masks: torch.Tensor, c2w: torch.Tensor, n: int, min_angle: float) -> list[int]:
    """The view showing the mask largest, then the largest ones at least `min_angle` degrees of viewing direction
    away from every view picked so far."""
    area = masks.flatten(1).sum(1).float()
    fwd = -c2w[:, :3, 2]
    picked = [int(area.argmax())]
    while len(picked) < n:
        cos = (fwd @ fwd[picked].T).clamp(-1, 1)
        far = (torch.rad2deg(torch.acos(cos)) >= min_angle).all(1) & (area > 0)
        far[picked] = False
        if not far.any():
            break
        picked.append(int(torch.where(far, area, torch.full_like(area, -1)).argmax()))
    return picked


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("run", type=Path)
    ap.add_argument("variant", type=Path)
    ap.add_argument("out", type=Path)
    ap.add_argument("--views", type=int, default=2)
    ap.add_argument("--min-angle", type=float, default=60.0)
    args = ap.parse_args()
    torch.set_num_threads(2)
    r = open_run(args.run)
    kind, oid, masks, images = edit_masks(r, args.variant)
    cams = r.scene.train_cameras()
    views = pick_views(masks, cams.c2w, args.views, args.min_angle)
    args.out.mkdir(parents=True, exist_ok=True)
    for v in views:
        rgb = render_image(r.model, cams, v, ndc_of(r.scene))["rgb"]
        m = masks[v]
        rgb[m] = images[v][m]
        save_png(args.out / f"rgb_{v:03d}.png", rgb)
        save_png(args.out / "masks" / f"mask_{v:03d}.png", m.float())
    fwd = -cams.c2w[views, :3, 2]
    angle = math.degrees(math.acos(float((fwd[0] @ fwd[-1]).clamp(-1, 1)))) if len(views) > 1 else 0.0
    print(json.dumps({"kind": kind, "object": oid, "views": views, "pixels": [int(masks[v].sum()) for v in views],
                      "angle_deg": round(angle, 1), "out": str(args.out)}))


if __name__ == "__main__":
    main()
