"""Guided edits on a generated scene, against ground truth: the three targets of issue 17.

1. Recolour: one object recoloured in 2 painted training views -> PSNR inside the object on the 20 held-out views
   against the scene rendered with that object's colour changed (generate-scene --recolor), and preservation
   PSNR outside it against the source render.
2. Removal: one object painted out in 2 views (what lies behind it in generate-scene --remove) -> the opacity
   left in the object's box on its held-out pixels, and preservation outside it.
3. Addition: a sphere painted on top of the box in 2 views (generate-scene --add-sphere) -> IoU of the added
   matter (pixels whose opacity is mostly the edit's) with the sphere's pixels on the held-out views.

Each edit is what a user runs: bench/paint_views.py paints the views, `dfield guide-edit` (the Python API) trains
and evaluates the edit, timed. The source run is trained once (dinov2 features, 1500 steps) unless --run names one.

    python bench/guided_edit.py [--work /tmp/g17] [--run RUN] [--only recolor remove add] [--docs docs]

Results: bench/results/guided_edit.json. With --docs, a before/after picture per edit (docs/guided_KIND.png) made
from the files the commands wrote.
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import torch
from PIL import Image, ImageDraw

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from dfield.app import api
from dfield.config import TrainConfig
from dfield.data.generate import SceneSpec, generate_scene
from dfield.edit.guided import GuidedConfig
from dfield.io.export import labelled_strip
from dfield.query.evaluation import object_prompt

ROOT = Path(__file__).resolve().parents[1]
SEED = 0
RECOLOR = (2, 0.2, 0.75, 0.3)  # seed 0: the orange sphere turns green
REMOVE = 3  # seed 0: the purple cylinder
ADD = (0.185, -0.63, 0.55, 0.12, 0.9, 0.2, 0.7)  # seed 0: a magenta ball on top of the yellow box (top at z = 0.43)


def scene_spec(size: int = 100, **variant) -> SceneSpec:
    return SceneSpec(seed=SEED, width=size, height=size, **variant)


def ensure_scene(path: Path, size: int = 100, **variant) -> Path:
    if not (path / "objects.json").is_file():
        generate_scene(path, scene_spec(size, **variant))
    return path


def ensure_run(scene: Path, run: Path, iterations: int = 1500, batch_rays: int = 2048) -> Path:
    if (run / "eval.json").is_file():
        return run
    cfg = TrainConfig(iterations=iterations, batch_rays=batch_rays)
    cfg.data.path = scene
    cfg.features.teacher = "dinov2"
    api.train(cfg, run, overwrite=True, progress=False)
    return run


def paint(run: Path, variant: Path, out: Path) -> dict:
    res = subprocess.run([sys.executable, str(ROOT / "bench" / "paint_views.py"), str(run), str(variant), str(out)],
                         capture_output=True, text=True, check=True)
    return json.loads(res.stdout.strip().splitlines()[-1])


def where_of(scene: Path, oid: int) -> str:
    ids = torch.stack([torch.from_numpy(np.asarray(Image.open(scene / "train" / f"id_{i}.png")).copy())
                       for i in range(len(list((scene / "train").glob("id_*.png"))))])
    p = object_prompt(ids, oid)
    return "patch:" + ",".join(str(v) for v in [p["view"], *p["box"]])


def sheet(edit: Path, painted: Path, out: Path, label: str) -> Path:
    """Painted view | held-out view before | after | ground truth, 200 px tiles."""
    first = sorted(painted.glob("rgb_*.png"))[0]
    tiles = [("painted training view", first), ("held-out: before", edit / "eval" / "original_000.png"),
             ("after the edit", edit / "eval" / "edited_000.png"), ("ground truth", edit / "eval" / "target_000.png")]
    img = labelled_strip(tiles)
    ImageDraw.Draw(img).text((img.width - 120, 3), label, fill="gray")
    out.parent.mkdir(parents=True, exist_ok=True)
    img.save(out)
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--work", type=Path, default=Path("/tmp/g17"))
    ap.add_argument("--run", type=Path, default=None, help="a trained source run of the seed-0 scene (with features)")
    ap.add_argument("--only", nargs="*", default=["recolor", "remove", "add"])
    ap.add_argument("--source-iterations", type=int, default=1500, help="the source run's steps (when it is trained here)")
    ap.add_argument("--source-batch", type=int, default=2048, help="the source run's rays per step")
    ap.add_argument("--steps", type=int, default=GuidedConfig().steps)
    ap.add_argument("--size", type=int, default=100, help="pixels per side of the generated scene and its variants")
    ap.add_argument("--kinds", nargs="*", default=None, help="edit kinds for every edit (default: each edit's own)")
    ap.add_argument("--docs", type=Path, default=None)
    ap.add_argument("--out", type=Path, default=ROOT / "bench" / "results" / "guided_edit.json")
    args = ap.parse_args()
    torch.set_num_threads(2)
    w = args.work
    scene = ensure_scene(w / "scene", args.size)
    t0 = time.perf_counter()
    run = ensure_run(scene, args.run or w / "run", args.source_iterations, args.source_batch)
    train_s = time.perf_counter() - t0
    results = {"scene": str(scene), "run": str(run), "source_train_seconds": train_s, "edits": {}}
    todo = {
        "recolor": (dict(recolor=RECOLOR), ("color",), RECOLOR[0]),
        "remove": (dict(remove=REMOVE), ("remove",), REMOVE),
        "add": (dict(add_sphere=ADD), ("add",), None),
    }
    for name in args.only:
        variant_args, kinds, oid = todo[name]
        variant = ensure_scene(w / f"scene_{name}", args.size, **variant_args)
        painted = w / f"painted_{name}"
        p = paint(run, variant, painted)
        kinds = tuple(args.kinds) if args.kinds else kinds
        cfg = GuidedConfig(kinds=kinds, steps=args.steps)
        where = where_of(scene, oid) if oid is not None else None
        edit = w / f"edit_{name}"
        t = time.perf_counter()
        s = api.guide_edit(run, str(painted), edit, where=where, cfg=cfg, eval_scene=variant, overwrite=True,
                           progress=False)
        wall = time.perf_counter() - t
        keys = ("preserve_psnr", "preserve_psnr_outside_object", "target_psnr_inside", "source_psnr_inside", "source_fit_psnr_inside",
                "object_opacity_mean", "object_opacity_p95", "added_iou", "train_seconds", "total_seconds")
        results["edits"][name] = {"where": where, "painted": p, "kinds": list(kinds), "wall_seconds": wall,
                                  **{k: s.get(k) for k in keys}, "region": s["region"]}
        if args.docs is not None:
            sheet(edit, painted, args.docs / f"guided_{name}.png", name)
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(results, indent=1))
    print(f"\n{'edit':8s} {'inside dB':>9s} {'preserve dB':>11s} {'outside obj':>11s} {'opacity':>8s} {'IoU':>6s} "
          f"{'train s':>8s} {'total s':>8s}")
    for name, r in results["edits"].items():
        f = lambda k: "-" if r.get(k) is None else (r[k] if isinstance(r[k], str) else f"{r[k]:.2f}")  # noqa: E731
        print(f"{name:8s} {f('target_psnr_inside'):>9s} {f('preserve_psnr'):>11s} "
              f"{f('preserve_psnr_outside_object'):>11s} {f('object_opacity_mean'):>8s} {f('added_iou'):>6s} "
              f"{f('train_seconds'):>8s} {f('total_seconds'):>8s}")
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
