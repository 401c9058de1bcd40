"""The Python API behind every CLI command: each function does what its command does, prints what a user needs
(progress bars, figures, where files went) and returns the data. The work itself is in the layers below; this
module only composes and reports.

    from dfield.app import api
    run = api.train(cfg, Path("runs/lego"))          # dfield train
    api.render(run, path="orbit", frames=60)         # dfield render

Training, resuming, evaluation and rendering take `nproc`: N local processes in one torch.distributed job
(`dfield.app.launch`); under torchrun they join the job torchrun started. Only rank 0 prints.
"""

from __future__ import annotations

import contextlib
import os
import warnings
from collections.abc import Iterator
from pathlib import Path

import numpy as np
from PIL import Image
from rich.console import Console

from dfield.app.launch import launch
from dfield.app.progress import ProgressBars
from dfield.config import TrainConfig
from dfield.core import ranks
from dfield.core.camera_paths import orbit_path, spiral_path
from dfield.core.image_rendering import ndc_of, render_image
from dfield.edit.apply import apply_edits
from dfield.edit.guided import GuidedConfig, guided_edit
from dfield.edit.spec import parse_where
from dfield.errors import RunError
from dfield.features.distill import Distilled
from dfield.features.distill import distill as add_features
from dfield.features.pca import FeaturePCA
from dfield.io.capture import CaptureOptions
from dfield.io.capture import process_images as pose_capture
from dfield.io.export import colorize_depth, save_png, save_video
from dfield.io.run import load_config, load_eval_data, open_run
from dfield.io.summary import format_summary as format_run_summary
from dfield.io.summary import run_summary
from dfield.query.evaluation import format_object_table
from dfield.query.outputs import run_query
from dfield.query.spec import QuerySpec
from dfield.training.evaluate import evaluate_run
from dfield.training.trainer import Trainer
from dfield.view.live import LiveView, live_session
from dfield.view.server import Viewer

console = Console(stderr=True)


@contextlib.contextmanager
def _job(device: str = "cpu") -> Iterator[None]:
    """Join the torch.distributed job this process belongs to (torchrun, --nproc), if any, for the duration of a
    command; every rank but 0 is silenced (rank 0 prints for the job)."""
    with ranks.session(device):
        if ranks.is_main():
            yield
            return
        quiet, console.quiet = console.quiet, True
        try:
            with open(os.devnull, "w") as null, contextlib.redirect_stdout(null), warnings.catch_warnings():
                warnings.simplefilter("ignore")
                yield
        finally:
            console.quiet = quiet


# --------------------------------------------------------------------------------------------- training


def train(cfg: TrainConfig, out: Path, resume: bool = False, overwrite: bool = False, evaluate: bool = True,
          progress: bool = True, view: bool = False, view_port: int = 8080, view_host: str = "127.0.0.1",
          nproc: int = 1) -> Path:
    """`dfield train`: fit a new run in `out` from `cfg` (or continue it with `resume`), then evaluate it. With
    `view`, the browser viewer shows the field as it trains and stays open afterwards until Ctrl-C. `nproc` > 1
    trains data-parallel in that many local processes (dfield.training.parallel)."""
    if nproc > 1:
        return launch(train, nproc, cfg, out, resume=resume, overwrite=overwrite, evaluate=evaluate,
                      progress=progress, view=view, view_port=view_port, view_host=view_host)
    out = Path(out)

    def start(bars: ProgressBars) -> Trainer:
        if resume and (out / "config.json").is_file():
            saved = load_config(out / "config.json")
            if Path(saved.data.path).resolve() != Path(cfg.data.path).resolve() and str(cfg.data.path) != ".":
                console.print(f"[yellow]resuming {out} with its saved config (data {saved.data.path}); other options ignored")
            # Only an iteration count the user typed extends the run; the CLI default must not.
            explicit = cfg.iterations not in (saved.iterations, TrainConfig().iterations)
            return Trainer.resume(out, iterations=cfg.iterations if explicit else None, progress=bars)
        if evaluate:
            load_eval_data(cfg)  # a broken test split must fail now, not after training
        return Trainer.create(cfg, out, overwrite=overwrite, progress=bars)

    with _job(cfg.device):
        return _fit(start, evaluate, progress, (view_host, view_port) if view else None)


def resume(run: Path, iterations: int | None = None, evaluate: bool = True, progress: bool = True,
           nproc: int = 1) -> Path:
    """`dfield resume`: continue a killed or finished run from its last checkpoint (optionally to more steps), with
    any number of processes `nproc` (whatever the run was trained with)."""
    if nproc > 1:
        return launch(resume, nproc, run, iterations=iterations, evaluate=evaluate, progress=progress)
    with _job(load_config(Path(run) / "config.json").device if (Path(run) / "config.json").is_file() else "cpu"):
        return _fit(lambda bars: Trainer.resume(run, iterations=iterations, progress=bars), evaluate, progress)


def _fit(start, run_eval: bool, progress: bool, view: tuple[str, int] | None = None) -> Path:
    """Make the trainer with `start(bars)` (teacher maps may be computed there), train with bars (and a live viewer
    on `view` = (host, port)), then evaluate."""
    viewer, hooks = None, []
    with ProgressBars(progress and ranks.is_main(), console) as bars:
        trainer = start(bars)
        if view is not None and ranks.is_main():
            viewer = Viewer([live_session(trainer)], host=view[0], port=view[1], device=trainer.cfg.device,
                            verbose=False)
            hooks.append(LiveView(viewer))
            console.print(f"viewer on [bold]{viewer.url}[/bold]: the field as it trains", highlight=False)
        cfg = trainer.cfg
        if trainer.step > 0:
            console.print(f"resuming {trainer.run_dir} at step {trainer.step} ({trainer.seconds:.0f} s trained)")
        if cfg.features.method == "lift":
            console.print(f"{trainer.run_dir}: the lifted features stay as they are; after training, `dfield distill "
                          f"{trainer.run_dir} --teacher {cfg.features.teacher} --method lift` lifts them again from "
                          "the refined field")
        procs = f" in {ranks.world()} processes ({trainer.n_streams} ray streams)" if ranks.world() > 1 else ""
        console.print(f"training {cfg.model} on {len(trainer.data)} views of {trainer.data.width}x"
                      f"{trainer.data.height} ({cfg.data.path}) -> {trainer.run_dir}{procs}")
        why = f" (auto: {trainer.data.scene_note})" if trainer.data.scene_note else ""
        console.print(f"scene type {cfg.data.scene_type}{why}", highlight=False)
        trainer.train(hooks=hooks, progress=bars)
    console.print(f"trained {trainer.step} steps in {trainer.seconds:.1f} s; last batch PSNR "
                  f"{trainer.last.get('psnr', float('nan')):.2f} dB")
    budget, plan = trainer.cfg.max_seconds, trainer.budget_plan_text()
    if plan is not None:
        console.print(plan, highlight=False)
    if budget and trainer.step >= trainer.cfg.iterations and trainer.seconds < 0.9 * budget:
        more = int(trainer.cfg.iterations * budget / max(trainer.seconds, 1e-9)) // 500 * 500
        console.print(f"[yellow]the {trainer.cfg.iterations}-step schedule ended at {trainer.seconds:.0f} s of the "
                      f"{budget:.0f} s budget: about --iterations {more} would use it all, or leave --iterations at "
                      f"its default and the schedule is fitted to the budget (--fit-to-budget)[/yellow]", highlight=False)
    if run_eval:
        evaluate(trainer.run_dir, device=cfg.device)
    if viewer is not None:
        viewer.session.set_model(open_run(trainer.run_dir, cfg.device).model, trainer.step)
        viewer.refresh(rerender=True)
        console.print(f"training done; the viewer stays on {viewer.url} (Ctrl-C to exit)", highlight=False)
        viewer.wait()
    return trainer.run_dir


# ------------------------------------------------------------------------------------------ evaluation


def evaluate(run: Path, split: str = "test", every: int | None = None, save_images: bool = False, device: str = "cpu",
             nproc: int = 1) -> dict:
    """`dfield eval`: PSNR/SSIM/LPIPS (and 3D segmentation on generated scenes) -> printed and RUN/eval.json. The
    views are split over the processes of a distributed job (`nproc` local ones, or torchrun's)."""
    if nproc > 1:
        return launch(evaluate, nproc, run, split=split, every=every, save_images=save_images, device=device)
    with _job(device):
        res = evaluate_run(run, split=split, device=device, every=every, save_images=save_images)
        print(format_summary(res))
        print(f"wrote {Path(run) / 'eval.json'}")
    return res


def format_summary(results: dict) -> str:
    """The figures of `evaluate_run` as the lines `dfield eval` prints."""
    lines = [f"views            {results['views']}", f"PSNR             {results['psnr']:.2f} dB"]
    if "ssim" in results:
        lines.append(f"SSIM             {results['ssim']:.4f}")
    lpips = results.get("lpips")
    lines.append(f"LPIPS            {lpips:.4f}" if lpips is not None else f"LPIPS            n/a ({results.get('lpips_note', '')})")
    if "train_seconds" in results:
        lines.append(f"trained          {results['train_seconds']:.1f} s, {results['step']} steps")
    if results.get("peak_rss_bytes"):
        lines.append(f"peak memory      {results['peak_rss_bytes'] / 2**30:.2f} GiB (training process)")
    lines.append(f"render           {results['render_seconds_per_view']:.2f} s/view")
    seg = results.get("segmentation")
    if seg:
        lines.append(f"3D segmentation  mIoU {seg['field_miou']:.3f} (teacher 2D {seg['teacher_miou']:.3f}), "
                     f"accuracy {seg['field_accuracy']:.3f} (teacher {seg['teacher_accuracy']:.3f})")
    return "\n".join(lines)


# ------------------------------------------------------------------------------------------- rendering


def render(run: Path, out: Path | None = None, path: str = "test", frames: int = 60, every: int = 1, video: bool = True,
           depth: bool = True, device: str = "cpu", resolution_scale: float = 1.0, mode: str = "rgb",
           progress: bool = True, nproc: int = 1) -> list[Path]:
    """`dfield render`: RGB (or feature PCA) and depth images of a run along test/train views or an orbit/spiral,
    as PNGs and MP4s in `out` (default RUN/renders/PATH). Returns the files written. The views are split over the
    processes of a distributed job (`nproc` local ones, or torchrun's); rank 0 makes the videos."""
    if nproc > 1:
        return launch(render, nproc, run, out=out, path=path, frames=frames, every=every, video=video, depth=depth,
                      device=device, resolution_scale=resolution_scale, mode=mode, progress=progress)
    with _job(device):
        return _render(run, out, path, frames, every, video, depth, device, resolution_scale, mode, progress)


def _render(run, out, path, frames, every, video, depth, device, resolution_scale, mode, progress) -> list[Path]:
    r = open_run(run, device)
    out = Path(out) if out is not None else Path(run) / "renders" / path
    if path in ("test", "train"):
        cams = load_eval_data(r.cfg, path, every).cameras
    else:
        base = r.scene.train_cameras()
        cams = orbit_path(base, frames) if path == "orbit" else spiral_path(base, frames)
        if resolution_scale != 1.0:
            cams = cams.scaled(resolution_scale)
    if mode == "features" and not r.model.has_features:
        raise RunError(f"{run}: this run has no feature field (train with --features.teacher ...)")
    if ranks.is_main():
        out.mkdir(parents=True, exist_ok=True)
    ranks.barrier()
    pca, first = None, None
    if mode == "features":  # fitted on the first view, then fixed: the same colour means the same feature
        first = render_image(r.model, cams, 0, ndc_of(r.scene), device=device, features=True)
        flat, solid = first["feature"].reshape(-1, first["feature"].shape[-1]), first["acc"].reshape(-1) > 0.5
        pca = FeaturePCA(flat[solid] if solid.sum() >= 16 else flat)  # a view of empty space still renders
    mine = ranks.share(len(cams))
    with ProgressBars(progress and ranks.is_main(), console) as bars:
        for n, i in enumerate(mine):
            o = first if i == 0 and first is not None else render_image(r.model, cams, i, ndc_of(r.scene), device=device,
                                                                        features=mode == "features")
            if pca is not None:
                o["rgb"] = pca(o["feature"]) * o["acc"][..., None] + (1 - o["acc"][..., None])
            save_png(out / f"{mode}_{i:03d}.png", o["rgb"])
            if depth:
                dep = o["depth"]
                if r.scene.scene_type == "unbounded":  # depths reach the sky: colour by disparity (near still blue)
                    dep = -o["acc"] / dep.clamp(min=1e-6)
                save_png(out / f"depth_{i:03d}.png", colorize_depth(dep, o["acc"]))
            bars(f"render {path}" + (f" (rank 0 of {ranks.world()})" if ranks.world() > 1 else ""), n + 1, len(mine))
    ranks.barrier()  # every view is on disk
    written = []
    for i in range(len(cams)):
        written.append(out / f"{mode}_{i:03d}.png")
        if depth:
            written.append(out / f"depth_{i:03d}.png")
    if video and len(cams) > 1 and ranks.is_main():
        fps = 24 if path in ("orbit", "spiral") else 4
        for kind in (mode, "depth") if depth else (mode,):
            frames_ = [np.asarray(Image.open(out / f"{kind}_{i:03d}.png").convert("RGB")) for i in range(len(cams))]
            written.append(save_video(out / f"{kind}.mp4", frames_, fps=fps))
    print(f"wrote {len(written)} files to {out}")
    return written


# -------------------------------------------------------------------------------------------- features


def distill(run: Path, teacher: str, method: str = "fit", iterations: int = 1000, dim: int = 32, batch_rays: int = 2048,
            loss: str = "l2", lift_voxels: int = 96**3, device: str = "cpu", threads: int = 0,
            progress: bool = True, **smoothing) -> Distilled:
    """`dfield distill`: add teacher features to a trained run (fit a feature field, or lift in one pass).
    `smoothing`: smooth, smooth_on, smooth_mode, smooth_sigma, patch, tv of dfield.features.distill.distill."""
    with ProgressBars(progress, console) as bars:
        d = add_features(run, teacher, method=method, iterations=iterations, dim=dim, batch_rays=batch_rays,
                         loss=loss, lift_voxels=lift_voxels, device=device, threads=threads, progress=bars,
                         **smoothing)
    s = d.summary
    what = f"{s['iterations']} steps" if s["method"] == "fit" else f"{s['lift_cells']} cells of {'x'.join(map(str, s['lift_res']))}"
    print(f"{s['method']}: {s['teacher']} features ({s['teacher_dim']}-d teacher, {s['views']} views; {what}) in "
          f"{s['seconds']:.1f} s (+{s['teacher_seconds']:.1f} s teacher maps); final {s['loss_kind']} loss "
          f"{s['loss']:.4f}; peak RSS {s['peak_rss_bytes'] / 2**30:.2f} GiB")
    print(f"wrote {d.checkpoint} and {Path(run) / 'distill.json'}")
    print(f"next: dfield render {run} --mode features    (PCA of the features)")
    print(f"      dfield eval {run}                      (3D segmentation mIoU vs the teacher on generated scenes)")
    return d


# ------------------------------------------------------------------------------------- queries and edits


def query(run: Path, spec: QuerySpec, path: str = "test", out: Path | None = None, ply: bool = True,
          eval_objects: bool = False, frames: int = 48) -> dict:
    """`dfield query`: relevance of a text/patch/click query on every view of `path`, as heatmaps, overlays,
    masks, a PLY of the selection and query.json (with per-object IoU on generated scenes when asked)."""
    s = run_query(run, spec, path=path, out=out, ply=ply, eval_objects=eval_objects, frames=frames)
    print(f"selected {s['selected_pixels']} pixels over {s['views']} {path} views ({s['positives']} positive, "
          f"{s['negatives']} negative embeddings); {s['renders']} views rendered, the rest from the cache")
    if s["objects"] is not None:
        print(format_object_table(s["objects"]))
    print(f"wrote {s['files']} files to {s['out']}")
    return s


def edit(run: Path, spec: Path, out: Path | None = None, path: str = "test", frames: int = 48, every: int = 1,
         video: bool = True, export_mesh: bool = False, mesh_resolution: int = 192, mesh_opacity: float = 0.5,
         device: str = "cpu", progress: bool = True) -> dict:
    """`dfield edit`: apply an edit spec, render it beside the original, print locality (and selection IoU on
    generated scenes); see dfield.edit.apply.apply_edits."""
    with ProgressBars(progress, console) as bars:
        s = apply_edits(run, spec, out=out, path=path, frames=frames, every=every, video=video,
                        export_mesh=export_mesh, mesh_resolution=mesh_resolution, mesh_opacity=mesh_opacity,
                        device=device, progress=bars)
    console.print(f"{len(s['edits'])} edit(s) ({', '.join(s['edits'])}) on {s['views']} {path} views -> {s['out']}")
    console.print(f"locality: PSNR outside the edited region >= {s['locality_psnr_min']} dB "
                  f"(max abs difference {s['locality_max_abs_diff']:.2g})")
    for k, v in s.get("selections", {}).items():
        console.print(f"{k}: selection matches '{v['object']}' with IoU {v['iou']:.3f} (ground truth, {s['views']} views)")
    if export_mesh:
        console.print(f"mesh: {s['mesh']['vertices']} vertices -> {s['mesh']['file']}")
    return s


def guide_edit(run: Path, to: str, out: Path, where: str | None = None, cfg: GuidedConfig | None = None,
               clip: str | None = None, source_text: str = "a photo of an object", eval_scene: Path | None = None,
               resume: bool = False, overwrite: bool = False, device: str = "cpu", progress: bool = True) -> dict:
    """`dfield guide-edit`: train a guided edit of `run` (region `where`, target `to`) into the run folder `out`,
    evaluate it and print the figures; see dfield.edit.guided.guided_edit."""
    select = parse_where(where) if where else None
    with ProgressBars(progress, console) as bars:
        s = guided_edit(run, out, to, select, cfg, clip=clip, source_text=source_text, resume=resume,
                        overwrite=overwrite, eval_scene=eval_scene, device=device, progress=bars)
    reg = s["region"]
    console.print(f"{s['guidance']['guidance']} guidance, kinds {', '.join(s['kinds'])}: {s['steps']} steps in "
                  f"{s['train_seconds']:.1f} s (region {reg['seconds']:.1f} s, total {s['total_seconds']:.1f} s)",
                  highlight=False)
    att = reg.get("attention", {})
    if att.get("steps"):
        console.print(f"attention: {att['steps']} distillation steps, rendered attention vs relevance IoU "
                      f"{att['iou']:.3f}", highlight=False)
    figures = [("preservation PSNR outside the region", "preserve_psnr", "dB"),
               ("preservation PSNR outside the object", "preserve_psnr_outside_object", "dB"),
               ("edited-view PSNR inside the object", "target_psnr_inside", "dB"),
               ("  unedited source against the target there", "source_psnr_inside", "dB"),
               ("  source against its own photos there", "source_fit_psnr_inside", "dB"),
               ("opacity left in the removed object (mean)", "object_opacity_mean", ""),
               ("IoU of the added matter with the target", "added_iou", ""),
               ("CLIP directional score", "clip_directional", "")]
    for label, key, unit in figures:
        if s.get(key) is not None:
            v = s[key]
            console.print(f"{label:44s} {v if isinstance(v, str) else f'{v:.3f}'} {unit}", highlight=False)
    console.print(f"wrote {out} (render, eval, query, edit and view open it); figures in {Path(out) / 'guide.json'}",
                  highlight=False)
    return s


# ----------------------------------------------------------------------------------------------- captures


def process_images(source: Path, out: Path, options: CaptureOptions | None = None, overwrite: bool = False,
                   progress: bool = True) -> dict:
    """`dfield process-images`: pose a folder of photos or a video with structure from motion and write a scene
    folder that `dfield train` takes (see dfield.io.capture); prints the summary, returns it (also in
    OUT/sfm.json)."""
    with ProgressBars(progress, console) as bars:
        s = pose_capture(source, out, options, overwrite=overwrite, progress=bars)
    print(format_capture(s, Path(out)))
    return s


def format_capture(s: dict, out: Path) -> str:
    """The lines `dfield process-images` prints for its summary `s`."""
    lines = []
    if s.get("video"):
        v = s["video"]
        lines.append(f"video            {v['frames']} frames at {v['fps']:g} fps: {s['images']} picked (sharpest of "
                     f"every {v['window']}), {len(v['blurry_skipped'])} skipped as blurry")
    failed = f"; not registered: {', '.join(s['failed'][:8])}{', ...' if len(s['failed']) > 8 else ''}" if s["failed"] else ""
    lines += [f"registered       {s['registered']} of {s['images']} images{failed}",
              f"reprojection     {s['mean_reprojection_error_px']:.3f} px mean ({s['points']} points, "
              f"{s['matching']} matching of {s['pairs']} pairs, {s['verified_pairs']} verified)",
              f"camera           {s['camera']['model']} {s['camera']['params']} -> pinhole fx {s['pinhole']['fx']:.1f} "
              f"at {s['pinhole']['width']}x{s['pinhole']['height']}",
              f"scene            {s['scene_type']} (views within {s['view_spread_deg']:.0f} deg), written as "
              f"{s['format']}; near {s['near']:.3g}, far {s['far']:.3g}",
              f"time             {s['seconds']['total']:.1f} s (features {s['seconds']['features']:.1f}, matching "
              f"{s['seconds']['matching']:.1f}, mapping {s['seconds']['mapping']:.1f})",
              f"wrote {out} ({out / 'sfm.json'}); next: dfield train {out}"]
    return "\n".join(lines)


# ------------------------------------------------------------------------------------------- looking at runs


def info(run: Path) -> dict:
    """`dfield info`: print what a run folder holds (data, model, teacher, steps, metrics, edits); returns it."""
    s = run_summary(run)
    console.print(format_run_summary(s), highlight=False)
    return s


def view(runs: list[Path], host: str = "127.0.0.1", port: int = 8080, resolution: int = 256, device: str = "cpu",
         block: bool = True, compile: bool = True):
    """`dfield view`: serve runs in the browser (see dfield.view.server). Blocks until Ctrl-C when `block`; returns
    the Viewer otherwise. `compile`: compile the fields' read arithmetic in the background after the first frame."""
    viewer = Viewer(runs, host=host, port=port, levels=(min(64, resolution), resolution), device=device,
                    compile=compile)
    console.print(f"viewer on [bold]{viewer.url}[/bold] ({', '.join(str(r) for r in runs)}); Ctrl-C stops it",
                  highlight=False)
    if host not in ("127.0.0.1", "localhost", "::1"):
        console.print(f"[yellow]listening on {host}: anyone who reaches this port can see and edit these runs[/yellow]")
    if block:
        viewer.wait()
    return viewer
