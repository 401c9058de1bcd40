"""The `dfield` command: thin wrappers over the Python API (dfield.app.api), one subcommand each."""

from __future__ import annotations

import sys
from pathlib import Path
from typing import Annotated, Literal

import tyro
from tyro.extras import SubcommandApp

from dfield.app import api
from dfield.app.demo import demo as run_demo
from dfield.config import TrainConfig
from dfield.data.generate import SceneSpec
from dfield.data.generate import generate_scene as write_scene
from dfield.edit.guided import GuidedConfig
from dfield.errors import DataError, DfieldError, RunError, TrainingDiverged
from dfield.io.capture import CaptureOptions
from dfield.io.sfm import SfmOptions
from dfield.query.spec import QuerySpec

app = SubcommandApp()
Flat = tyro.conf.arg(name="")


@app.command
def train(cfg: Annotated[TrainConfig, Flat], out: Path = Path("runs/latest"), resume: bool = False,
          overwrite: bool = False, eval: bool = True, view: bool = False, view_port: int = 8080,
          view_host: str = "127.0.0.1", nproc: int = 1) -> None:
    """Fit a radiance field to posed images. Example: dfield train data/lego --downscale 4 --out runs/lego

    Data-parallel: --nproc N (N local processes), or torchrun --nproc-per-node N -m dfield train ...

    Args:
        out: Run folder: config, checkpoints, logs and evaluation land here.
        resume: Continue the run in --out from its last checkpoint (its saved config wins).
        overwrite: Start over in an existing run folder.
        eval: Evaluate on the test split when training ends.
        view: Show the field in the browser viewer as it trains (http://VIEW_HOST:VIEW_PORT); it stays open after
            training until Ctrl-C.
        view_port: Port of the viewer.
        view_host: Address the viewer binds to (127.0.0.1: this machine only).
        nproc: Train in this many local processes (one torch.distributed job: gloo on CPU, nccl on CUDA with one GPU
            each). --batch-rays stays the batch of one step over all of them; on a CPU each gets cores / N threads.
    """
    api.train(cfg, out, resume=resume, overwrite=overwrite, evaluate=eval, view=view, view_port=view_port,
              view_host=view_host, nproc=nproc)


@app.command
def resume(run: tyro.conf.Positional[Path], iterations: int | None = None, eval: bool = True, nproc: int = 1) -> None:
    """Continue a killed or finished run from its last checkpoint (optionally to more iterations).

    Args:
        nproc: Processes to continue with (any number, whatever the run started with).
    """
    api.resume(run, iterations=iterations, evaluate=eval, nproc=nproc)


@app.command(name="eval")
def eval_(run: tyro.conf.Positional[Path], split: Literal["test", "val", "train"] = "test", every: int | None = None,
          save_images: bool = False, device: str = "cpu", nproc: int = 1) -> None:
    """Render held-out views and print PSNR/SSIM/LPIPS; writes RUN/eval.json.

    Args:
        every: Use every Nth view of the split (default: the run's --test-every).
        save_images: Also write the rendered views to RUN/eval_images/.
        nproc: Split the views over this many local processes.
    """
    api.evaluate(run, split=split, every=every, save_images=save_images, device=device, nproc=nproc)


@app.command
def render(run: tyro.conf.Positional[Path], out: Path | None = None, path: Literal["test", "orbit", "spiral", "train"] = "test",
           frames: int = 60, every: int = 1, video: bool = True, depth: bool = True, device: str = "cpu",
           resolution_scale: float = 1.0, mode: Literal["rgb", "features"] = "rgb", nproc: int = 1) -> None:
    """Render RGB (and depth) images of a trained run along test views or a camera path, as PNG and MP4.

    Args:
        out: Output folder (default RUN/renders/PATH).
        path: test/train: the dataset's views; orbit: a circle around the object; spiral: forward-facing spiral.
        frames: Number of frames for orbit/spiral paths.
        every: Use every Nth dataset view.
        resolution_scale: Render orbit/spiral frames at this fraction (or multiple) of the training resolution.
        mode: rgb: colour; features: the distilled feature field, PCA to RGB with one projection for all views.
        nproc: Split the views over this many local processes.
    """
    api.render(run, out=out, path=path, frames=frames, every=every, video=video, depth=depth, device=device,
               resolution_scale=resolution_scale, mode=mode, nproc=nproc)


@app.command(name="generate-scene")
def generate_scene(out: tyro.conf.Positional[Path], spec: Annotated[SceneSpec, Flat]) -> None:
    """Write a procedural multi-object scene with ground-truth object ids (Blender format)."""
    path = write_scene(out, spec)
    print(f"wrote scene to {path}")


@app.command(name="process-images")
def process_images(source: tyro.conf.Positional[Path], out: Path, num_frames: int = 100, every: int = 0,
                   blur_threshold: float = 0.3, max_size: int = 1600,
                   matching: Literal["auto", "exhaustive", "sequential"] = "auto",
                   camera_model: Literal["SIMPLE_RADIAL", "RADIAL", "OPENCV", "PINHOLE", "SIMPLE_PINHOLE"] = "SIMPLE_RADIAL",
                   single_camera: bool = True, max_features: int = 8192, min_registered: float = 0.5,
                   format: Literal["auto", "llff", "nerfstudio", "colmap"] = "auto",
                   threads: int = 0, seed: int = 0, overwrite: bool = False) -> None:
    """Pose a folder of photos or a video with structure from motion (pycolmap) and write a scene to train on.

    Example: dfield process-images my_photos/ --out scenes/desk   (then: dfield train scenes/desk)

    Args:
        source: A folder of photos (png/jpg) or a video file.
        out: The scene folder to write: images/, sparse/0/, poses_bounds.npy or transforms.json, sfm.json.
        num_frames: Video: about this many frames, one per equal window of the video.
        every: Video: one frame per window of this many frames instead (0: use --num-frames).
        blur_threshold: Video: the sharpest frame of each window is kept; those still below this fraction of
            the median sharpness are skipped (0 keeps all).
        max_size: Longest image side for SfM and the scene (larger photos and frames are shrunk; 0: keep).
        matching: auto: all pairs for photos and videos up to 60 frames, sequential (+ loop pairs) for longer videos.
        camera_model: COLMAP camera model to estimate (lens distortion is undone in the written images).
        single_camera: All images share one camera (one phone, one zoom); --no-single-camera: one per image.
        max_features: SIFT features per image.
        min_registered: Fail unless at least this fraction of the images (and at least 3) registers.
        format: Scene file: auto (llff for forward-facing captures, nerfstudio otherwise), llff, nerfstudio,
            or colmap (sparse/0 only).
        threads: CPU threads for SfM (0: all).
        seed: Random seed of SfM (the same seed and threads give the same model).
        overwrite: Replace a scene already processed in --out.
    """
    sfm = SfmOptions(matching=matching, camera_model=camera_model, single_camera=single_camera,
                     max_features=max_features, threads=threads, seed=seed)
    opt = CaptureOptions(every=every, num_frames=num_frames, blur_threshold=blur_threshold, max_size=max_size,
                         min_registered=min_registered, format=format, sfm=sfm)
    api.process_images(source, out, opt, overwrite=overwrite)


@app.command
def demo(out: Path = Path("demo_out"), seed: int = 0, iterations: int | None = None, features: bool = True) -> None:
    """Generate a scene, train on it, evaluate, render test views and an orbit video, then lift DINOv2 features,
    run a patch query and one edit of each kind (about 4.5 minutes on 2 cores).

    Args:
        features: Also do the features, query and edits part (--no-features: the radiance field only).
    """
    run_demo(out, seed=seed, iterations=iterations, features=features)


@app.command
def query(run: tyro.conf.Positional[Path], text: tuple[str, ...] = (), patch: tuple[int, int, int, int, int] | None = None,
          click: tuple[int, int, int] | None = None, cluster: int | None = None, clusters: int = 24, negatives: tuple[str, ...] | None = None, threshold: float = 0.5,
          temperature: float = 0.1, path: Literal["test", "train", "orbit"] = "test", out: Path | None = None,
          ply: bool = True, eval_objects: bool = False, frames: int = 48,
          patch_source: Literal["field", "teacher"] = "field", click_radius: float = 0.06) -> None:
    """Select what matches a text, a box or a click in every view; heatmaps, overlays, masks and a PLY of the region.

    Example: dfield query runs/toy --patch 3 40 40 60 60   (a box on training view 3; --click 3 50 50 for a pixel)

    Args:
        text: Positive texts (needs a text-aligned teacher such as clip).
        patch: VIEW X0 Y0 X1 Y1: a box in pixels of training view VIEW.
        click: VIEW X Y: a pixel of training view VIEW (it stands for the same surface around it: --click-radius).
        cluster: K: select the K-th cluster of the scene's features (writes clusters_VVV.png maps and clusters.json
            with each cluster's colour, to find the K you want; the viewer picks clusters by clicking).
        clusters: How many clusters the scene's features are split into (automatic negatives and --cluster).
        negatives: auto (clusters of the scene's features unlike the query; the default for boxes and clicks) or
            texts (the default for text queries: object things stuff texture).
        threshold: Probability above which a pixel is selected.
        temperature: Softmax temperature over cosine similarities (lower: sharper boundaries).
        path: Views to answer on: the test split, the training views, or an orbit.
        out: Output folder (default RUN/query).
        ply: Also write selection.ply: the selected pixels back-projected at their rendered depth, all views merged.
        eval_objects: On generated scenes, also score a box and a click per object against ground truth (IoU).
        frames: Number of frames for --path orbit.
        patch_source: Where the box's embedding comes from: the field's rendering or the teacher's own map.
        click_radius: A click's embedding is the mean over opaque pixels within this fraction of the image size at
            the clicked depth (within 5 %); 0 takes the one pixel.
    """
    neg = "auto" if negatives == ("auto",) else (list(negatives) if negatives is not None else None)
    spec = QuerySpec(text=list(text), patch=patch, click=click, cluster=cluster, clusters=clusters, negatives=neg, threshold=threshold,
                     temperature=temperature, patch_source=patch_source, click_radius=click_radius)
    api.query(run, spec, path=path, out=out, ply=ply, eval_objects=eval_objects, frames=frames)


@app.command
def distill(run: tyro.conf.Positional[Path], teacher: str, method: Literal["fit", "lift"] = "fit", iterations: int = 1000,
            dim: int = 32, batch_rays: int = 2048, loss: Literal["l2", "l1"] = "l2", lift_voxels: int = 96**3,
            smooth: str = "auto", smooth_on: Literal["renders", "photos"] = "renders",
            smooth_mode: Literal["blur", "mean"] = "blur", smooth_sigma: float = 4.0, patch: int = 0, tv: float = 0.0,
            device: str = "cpu", threads: int = 0) -> None:
    """Add teacher features to a trained run and save them into it (features second, or one-pass lifting).

    Example: dfield distill runs/toy --teacher synthetic   (then: dfield render runs/toy --mode features)

    Args:
        teacher: 2D teacher spec: synthetic, dinov2[:block=7,...], clip[:NAME], files:FOLDER or a registered name.
        method: fit: train a feature field on the frozen radiance field; lift: average teacher features per voxel in one pass.
        iterations: Training steps (fit).
        dim: Width of the feature field (fit); a learned linear decoder maps it to the teacher's width.
        batch_rays: Rays per step (fit).
        lift_voxels: Voxels of the lifted grid (lift); only cells a ray reaches are stored, in fp16.
        smooth: Smoother targets: auto (the default: RGB-guided bilateral, README "Smooth features"), none (raw
            teacher maps), segments:felzenszwalb|litemedsam|sam:CHECKPOINT|gt|files:FOLDER, or bilateral[:sigma_space=3,...].
        smooth_on: Make masks on the trained field's renders of the training views, or on the photos.
        smooth_mode: Inside a region: Gaussian blur restricted to it, or the region's mean.
        smooth_sigma: Gaussian sigma of segment blur, image pixels.
        patch: Draw fit rays as P x P pixel patches (0: random rays).
        tv: Weight of total variation on rendered feature patches (needs --patch >= 2; 0: none).
        threads: CPU threads for PyTorch (0: PyTorch's default).
    """
    api.distill(run, teacher, method=method, iterations=iterations, dim=dim, batch_rays=batch_rays, loss=loss,
                lift_voxels=lift_voxels, smooth=smooth, smooth_on=smooth_on, smooth_mode=smooth_mode,
                smooth_sigma=smooth_sigma, patch=patch, tv=tv, device=device, threads=threads)


@app.command
def edit(run: tyro.conf.Positional[Path], spec: Path, out: Path | None = None, path: Literal["test", "orbit"] = "test",
         frames: int = 48, every: int = 1, video: bool = True, export_mesh: bool = False, mesh_resolution: int = 192,
         mesh_opacity: float = 0.5, device: str = "cpu") -> None:
    """Apply an edit spec (JSON/YAML: extract, delete, recolor, transform, composite on text/patch/click/box
    selections) and render the result beside the original; prints edit locality. See docs/edits.md.

    Args:
        spec: The edit spec file.
        out: Output folder (default RUN/edits/SPEC_NAME).
        path: test: the dataset's test views (scored against ground truth on generated scenes); orbit: a circle.
        frames: Frames for the orbit.
        every: Use every Nth test view.
        export_mesh: Also write a coloured PLY mesh of the edited scene (of the object alone after 'extract').
        mesh_resolution: Marching-cubes cells along the longest side.
        mesh_opacity: The surface is where one voxel of the field is this opaque.
    """
    api.edit(run, spec, out=out, path=path, frames=frames, every=every, video=video, export_mesh=export_mesh,
             mesh_resolution=mesh_resolution, mesh_opacity=mesh_opacity, device=device)


@app.command(name="guide-edit")
def guide_edit(run: tyro.conf.Positional[Path], to: str, out: Path, cfg: Annotated[GuidedConfig, Flat],
               where: str | None = None, clip: str | None = None, source_text: str = "a photo of an object",
               eval_scene: Path | None = None, resume: bool = False, overwrite: bool = False,
               device: str = "cpu") -> None:
    """Train a guided local edit: the run stays frozen, a small edit field blended with it learns to make the region
    what --to says; writes a run folder that render, eval, query, edit and view open.

    Example: dfield guide-edit runs/toy --where click:3,40,58 --to painted/ --out runs/toy-green

    Args:
        to: What the region becomes: a folder of edited views (training renders you painted, named by view, e.g.
            rgb_007.png from dfield render RUN --path train), an exemplar image, color:R,G,B, or a text (CLIP).
        out: The edit's run folder.
        where: The region: patch:VIEW,X0,Y0,X1,Y1, click:VIEW,X,Y, text:WORDS, box:X0,Y0,Z0,X1,Y1,Z1 or a query
            file saved by the viewer. Optional with edited views (the painted pixels say where).
        clip: CLIP / SigLIP weights for text guidance: hub name or local folder (default openai/clip-vit-base-patch16).
        source_text: Text guidance: what the region is now (the directional loss's reference).
        eval_scene: A generated scene variant (generate-scene --recolor / --remove / --add-sphere) to score against.
        resume: Continue an interrupted edit in --out from its last checkpoint.
        overwrite: Start over in an existing --out.
    """
    api.guide_edit(run, to, out, where=where, cfg=cfg, clip=clip, source_text=source_text, eval_scene=eval_scene,
                   resume=resume, overwrite=overwrite, device=device)


@app.command
def view(runs: tyro.conf.Positional[tuple[Path, ...]], port: int = 8080, host: str = "127.0.0.1", resolution: int = 256,
         device: str = "cpu", compile: bool = True) -> None:
    """Open runs in the browser: fly around, click or box objects to query them, edit and save. Ctrl-C stops it.

    Example: dfield view runs/toy   (then open http://127.0.0.1:8080; several runs: a dropdown switches them)

    Args:
        runs: One or more run folders.
        port: Port to serve on.
        host: Address to bind; 127.0.0.1 (the default) serves this machine only. From another machine, tunnel:
            ssh -L 8080:127.0.0.1:8080 USER@HOST, then open http://127.0.0.1:8080 there.
        resolution: Longest side of the full-quality frame, pixels (coarse frames while the camera moves).
        compile: After the first frame, compile the field's read arithmetic in the background (torch.compile; frames
            about a fifth faster once done; needs a C compiler, falls back to eager without one).
    """
    api.view(list(runs), host=host, port=port, resolution=resolution, device=device, compile=compile)


@app.command
def info(run: tyro.conf.Positional[Path]) -> None:
    """Show what a run holds: data, model, teacher, steps, metrics, edits."""
    api.info(run)


USER_ERRORS = (DfieldError, ValueError, FileNotFoundError)
KINDS = {DataError: "bad data", RunError: "bad run", TrainingDiverged: "training diverged"}


def report(e: BaseException) -> None:
    """A user error as the one line `dfield` prints for it."""
    print(f"dfield: {KINDS.get(type(e), 'error')}: {e}", file=sys.stderr)


def main(argv: list[str] | None = None) -> int:
    """Run the `dfield` command; returns its exit code (2 for a user error, 130 when interrupted)."""
    try:
        app.cli(args=argv, prog="dfield")
    except USER_ERRORS as e:
        report(e)
        return 2
    except KeyboardInterrupt:
        print("interrupted; the last checkpoint is kept (dfield resume RUN continues)", file=sys.stderr)
        return 130
    return 0


if __name__ == "__main__":
    sys.exit(main())
