"""The `dfield` command: thin wrappers over the Python API, one subcommand each."""

from __future__ import annotations

import sys
from pathlib import Path
from typing import Annotated, Literal

import tyro
from tyro.extras import SubcommandApp

from dfield.config import TrainConfig
from dfield.data.generate import SceneSpec

app = SubcommandApp()
Flat = tyro.conf.arg(name="")


@app.command
def train(cfg: Annotated[TrainConfig, Flat], out: Path = Path("runs/latest"), resume: bool = False,
          overwrite: bool = False, eval: bool = True) -> None:
    """Fit a radiance field to posed images. Example: dfield train data/lego --downscale 4 --out runs/lego

    Args:
        out: Run folder: config, checkpoints, logs and evaluation land here.
        resume: Continue the run in --out from its last checkpoint (its saved config wins).
        overwrite: Start over in an existing run folder.
        eval: Evaluate on the test split when training ends.
    """
    from dfield import api

    api.train(cfg, out, resume=resume, overwrite=overwrite, evaluate=eval)


@app.command
def resume(run: tyro.conf.Positional[Path], iterations: int | None = None, eval: bool = True) -> None:
    """Continue a killed or finished run from its last checkpoint (optionally to more iterations)."""
    from dfield import api

    api.resume(run, iterations=iterations, evaluate=eval)


@app.command(name="eval")
def eval_(run: tyro.conf.Positional[Path], split: Literal["test", "val", "train"] = "test", every: int | None = None,
          save_images: bool = False, device: str = "cpu") -> None:
    """Render held-out views and print PSNR/SSIM/LPIPS; writes RUN/eval.json.

    Args:
        every: Use every Nth view of the split (default: the run's --test-every).
        save_images: Also write the rendered views to RUN/eval_images/.
    """
    from dfield import api

    api.evaluate(run, split=split, every=every, save_images=save_images, device=device)


@app.command
def render(run: tyro.conf.Positional[Path], out: Path | None = None, path: Literal["test", "orbit", "spiral", "train"] = "test",
           frames: int = 60, every: int = 1, video: bool = True, depth: bool = True, device: str = "cpu",
           resolution_scale: float = 1.0, mode: Literal["rgb", "features"] = "rgb") -> None:
    """Render RGB (and depth) images of a trained run along test views or a camera path, as PNG and MP4.

    Args:
        out: Output folder (default RUN/renders/PATH).
        path: test/train: the dataset's views; orbit: a circle around the object; spiral: forward-facing spiral.
        frames: Number of frames for orbit/spiral paths.
        every: Use every Nth dataset view.
        resolution_scale: Render orbit/spiral frames at this fraction (or multiple) of the training resolution.
        mode: rgb: colour; features: the distilled feature field, PCA to RGB with one projection for all views.
    """
    from dfield import api

    api.render(run, out=out, path=path, frames=frames, every=every, video=video, depth=depth, device=device,
               resolution_scale=resolution_scale, mode=mode)


@app.command(name="generate-scene")
def generate_scene(out: tyro.conf.Positional[Path], spec: Annotated[SceneSpec, Flat] = SceneSpec()) -> None:
    """Write a procedural multi-object scene with ground-truth object ids (Blender format)."""
    from dfield.data.generate import generate_scene as gen

    path = gen(out, spec)
    print(f"wrote scene to {path}")


@app.command
def demo(out: Path = Path("demo_out"), seed: int = 0, iterations: int | None = None) -> None:
    """Generate a scene, train on it, evaluate, and render test views and an orbit video (about 5 minutes on 2 cores)."""
    from dfield import api

    api.demo(out, seed=seed, iterations=iterations)


def main(argv: list[str] | None = None) -> int:
    from dfield.errors import USER_ERRORS, report

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
