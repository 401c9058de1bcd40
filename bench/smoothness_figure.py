"""Raw vs smoothed feature fields side by side: held-out views of two (or more) runs of one scene, their decoded
features coloured by one PCA fitted on all of them, and optionally the same click query answered by each.

    .venv/bin/python bench/smoothness_figure.py RUN_RAW RUN_SMOOTH [--labels raw smoothed] [--views 3]
        [--click VIEW X Y | --object NAME] [--out docs/smooth_features.png]

Columns per held-out view: the rendered colour, then each run's features (PCA), then (with --click or --object)
each run's click-query mask over the render (`dfield query RUN --click VIEW X Y` with default settings, the clicked
training view shown in the first row's header). --object takes the click of bench/query_objects.py (generated
scenes: the pixel deepest inside the object on the training view that shows it largest).
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import numpy as np
import torch
from PIL import Image, ImageDraw

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from dfield.features.pca import FeaturePCA
from dfield.io.atomic import atomic_path
from dfield.query import QuerySpec, make_query
from dfield.query.context import context
from dfield.query.evaluation import object_prompt
from dfield.query.relevance import view_relevance
from dfield.query.spec import OPAQUE


def overlay(rgb: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    out = rgb.clone() * 0.45 + 0.3
    out[mask] = out[mask] * 0.3 + torch.tensor([1.0, 0.1, 0.6]) * 0.7
    return out


def main(argv=None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("runs", type=Path, nargs="+")
    ap.add_argument("--labels", nargs="+", default=None)
    ap.add_argument("--views", type=int, default=3, help="held-out views, spread over the test split")
    ap.add_argument("--view-ids", type=int, nargs="+", default=None, help="these held-out views instead")
    ap.add_argument("--click", type=int, nargs=3, default=None, metavar=("VIEW", "X", "Y"))
    ap.add_argument("--object", default=None, help="generated scenes: click the object with this name or id")
    ap.add_argument("--scale", type=int, default=1, help="enlarge pixels this many times")
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--out", type=Path, default=Path("docs/smooth_features.png"))
    args = ap.parse_args(argv)
    torch.set_num_threads(args.threads)
    labels = args.labels or [p.name for p in args.runs]
    ctxs = [context(r) for r in args.runs]
    test = ctxs[0].data("test")
    views = args.view_ids or np.linspace(0, len(test) - 1, args.views).round().astype(int).tolist()
    click = args.click
    obj = None
    if args.object is not None:
        train = ctxs[0].data("train")
        names = {v: int(k) for k, v in train.object_names.items()}
        obj = int(args.object) if args.object.isdigit() else names[args.object]
        p = object_prompt(train.object_ids, obj)
        click = [p["view"], *p["click"]]
    renders = [[c.render(test.cameras, i) for i in views] for c in ctxs]
    decoded = [[c.decode(r.feature) for r in rs] for c, rs in zip(ctxs, renders)]
    sample = torch.cat([d[r.acc > OPAQUE] for ds, rs in zip(decoded, renders) for d, r in zip(ds, rs)])
    pca = FeaturePCA(sample[torch.randperm(len(sample), generator=torch.Generator().manual_seed(0))[:20000]])
    masks = None
    if click is not None:
        masks = []
        for c in ctxs:
            spec = QuerySpec(click=tuple(click))
            q = make_query(c, spec)
            masks.append([view_relevance(c, q, test.cameras, i, spec.threshold).mask for i in views])
    ious = None
    if masks is not None and obj is not None and getattr(test, "object_ids", None) is not None:
        # IoU over the shown views together: what the picture shows, as a number
        truth = torch.stack([torch.as_tensor(test.object_ids[i]) == obj for i in views])
        ious = [float((torch.stack(m) & truth).sum() / (torch.stack(m) | truth).sum().clamp(min=1)) for m in masks]
    rows = []
    for j, i in enumerate(views):
        rgb = renders[0][j].rgb.clamp(0, 1)
        tiles = [rgb]
        for k in range(len(ctxs)):
            acc = renders[k][j].acc[..., None]
            tiles.append(pca(decoded[k][j]) * acc + (1 - acc))
        if masks is not None:
            tiles += [overlay(renders[k][j].rgb.clamp(0, 1), masks[k][j]) for k in range(len(ctxs))]
        rows.append(torch.cat(tiles, 1))
    img = (torch.cat(rows, 0).numpy() * 255).round().astype(np.uint8)
    if args.scale > 1:
        img = img.repeat(args.scale, 0).repeat(args.scale, 1)
    clicks = [[lab, "click" + (f" (IoU {ious[k]:.2f})" if ious else "")] for k, lab in enumerate(labels)]
    head = [["render", ""]] + [[lab, "features (PCA)"] for lab in labels] + (clicks if masks else [])
    tile_w = img.shape[1] // len(head)
    canvas = Image.new("RGB", (img.shape[1], img.shape[0] + 26), "white")
    canvas.paste(Image.fromarray(img), (0, 26))
    draw = ImageDraw.Draw(canvas)
    for k, (line1, line2) in enumerate(head):  # two short lines: a tile is 100-200 px wide
        draw.text((k * tile_w + 3, 1), line1, fill=(0, 0, 0))
        draw.text((k * tile_w + 3, 13), line2, fill=(0, 0, 0))
    args.out.parent.mkdir(parents=True, exist_ok=True)
    with atomic_path(args.out) as tmp:
        canvas.save(tmp, format="PNG", optimize=True)
    print(f"views {views}" + (f", click {click}" if click else "") + (f", IoU {[round(x, 3) for x in ious]}" if ious else "")
          + f" -> {args.out}")


if __name__ == "__main__":
    main()
