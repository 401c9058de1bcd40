"""Viewer latency in a real browser (headless Chromium), and what watching costs a training run.

    .venv/bin/python bench/viewer_speed.py --run RUN [--resolution 256] [--train-seconds 60]

Latency, on RUN (a trained run with features): page open -> first frame and first full frame; a camera drag ->
the first (coarse) frame of the new camera and its full frame; a click on the object at the canvas centre -> the
view re-coloured. Each camera move is repeated `--moves` times; medians are printed.

Training cost (skipped with --train-seconds 0): the run's scene is trained twice for the same number of steps,
alone and with the live viewer open in the browser (`dfield train --view`), and the rays/s are compared
(the 15 % budget of issue 18). Results go to --out as JSON.
"""

from __future__ import annotations

import argparse
import json
import platform
import socket
import statistics
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from dfield.config import TrainConfig
from dfield.io.run import load_config
from dfield.training.trainer import Trainer
from dfield.view.browser import browser_page, click_canvas, wait_until
from dfield.view.live import LiveView, live_session
from dfield.view.server import Viewer

REPO = Path(__file__).resolve().parents[1]


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def drag(page, box, state, moves: int) -> tuple[list[float], list[float]]:
    """Drag the camera `moves` times (left and right in turn); seconds from each drag to the new camera's first
    (coarse) frame and to its full frame."""
    coarse, full = [], []
    for i in range(moves):
        state.renderer.wait_idle(30)
        before_view = state.frame.view
        cx, cy = box["x"] + box["width"] * 0.3, box["y"] + box["height"] * 0.5
        page.mouse.move(cx, cy)
        page.mouse.down()
        page.mouse.move(cx + (40 if i % 2 == 0 else -40), cy, steps=4)
        page.mouse.up()
        c = wait_until(lambda: state.frame is not None and state.frame.view != before_view, 30)
        f = wait_until(lambda: state.full is not None and state.full.view == state.frame.view
                       and state.full.view != before_view, 60)
        if c is not None:
            coarse.append(c)
        if f is not None:
            full.append(f)
    return coarse, full


def latency(run: Path, resolution: int, moves: int, compile: bool = True) -> dict:
    viewer = Viewer([run], port=free_port(), levels=(64, resolution), verbose=False, compile=compile)
    out = {}
    try:
        with browser_page(viewer.url, 800, 800) as (page, load_s):
            out["first_frame_s"] = wait_until(lambda: viewer.wait_frames(0.0, full=False), 60)
            out["first_full_frame_s"] = wait_until(lambda: viewer.wait_frames(0.0), 60)
            out["page_load_s"] = load_s
            # As `dfield view` does: the read kernels compile in the background after the first frame; the moves
            # are timed once that is over (it takes both cores for a few seconds).
            out["compile_s"] = wait_until(lambda: viewer.kernels != "compiling", 180)
            out["kernels"] = viewer.kernels
            state = next(iter(viewer.clients.values()))
            box = page.locator("canvas").first.bounding_box()
            out["move_coarse_s"], out["move_full_s"] = drag(page, box, state, moves)
            state.renderer.wait_idle(30)
            shown = state.shown
            click_canvas(page, 0.5, 0.5)
            out["click_recolour_s"] = wait_until(lambda: state.shown > shown and viewer.session.query.prompts, 30)
            # Looking around the selection: the overlay needs features in every frame, coarse ones too.
            out["query_move_coarse_s"], out["query_move_full_s"] = drag(page, box, state, moves)
            out["errors"] = list(viewer.errors)
            out["frame_size"] = list(state.full.size)
            out["render_seconds_per_level"] = {str(k): v for k, v in state.renderer.last_seconds.items()}
    finally:
        viewer.stop()
    return out


def training_cost(run: Path, seconds: float, work: Path) -> dict:
    cfg = load_config(run / "config.json")
    base = TrainConfig()
    base.data = cfg.data
    base.features = cfg.features
    base.max_seconds = seconds
    res = {}
    for watched in (False, True):
        cfg_i = TrainConfig(**{**base.__dict__})
        out = work / ("watched" if watched else "alone")
        trainer = Trainer.create(cfg_i, out, overwrite=True)
        hooks, viewer, ctxm = [], None, None
        if watched:
            viewer = Viewer([live_session(trainer)], port=free_port(), levels=(64, 256), verbose=False)
            hooks.append(LiveView(viewer))
            ctxm = browser_page(viewer.url, 800, 800)
            ctxm.__enter__()
            wait_until(lambda: viewer.wait_frames(0.0), 60)
        t0 = time.perf_counter()
        trainer.train(hooks=hooks)
        wall = time.perf_counter() - t0
        r = {"steps": trainer.step, "train_seconds": trainer.seconds, "wall_seconds": wall,
             "steps_per_wall_s": trainer.step / wall}
        if watched:
            r["snapshots"] = hooks[0].snapshots
            ctxm.__exit__(None, None, None)
            viewer.stop()
        res["watched" if watched else "alone"] = r
    res["slowdown"] = 1 - res["watched"]["steps_per_wall_s"] / res["alone"]["steps_per_wall_s"]
    return res


def main(argv=None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--run", type=Path, required=True)
    ap.add_argument("--resolution", type=int, default=256)
    ap.add_argument("--moves", type=int, default=5)
    ap.add_argument("--train-seconds", type=float, default=60.0)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--no-compile", action="store_true", help="keep the eager read kernels (dfield view --no-compile)")
    ap.add_argument("--work", type=Path, default=Path("/tmp/dfield_viewer_speed"))
    ap.add_argument("--out", type=Path, default=REPO / "bench/results/viewer_speed.json")
    args = ap.parse_args(argv)
    torch.set_num_threads(args.threads)
    res = {"run": str(args.run), "resolution": args.resolution, "processor": platform.processor() or platform.machine()}
    res["latency"] = lat = latency(args.run, args.resolution, args.moves, compile=not args.no_compile)
    med = lambda xs: statistics.median(xs) if xs else float("nan")  # noqa: E731
    print(f"first frame {lat['first_frame_s']:.2f} s, first full frame {lat['first_full_frame_s']:.2f} s after the page "
          f"opened; camera move: coarse {med(lat['move_coarse_s']):.2f} s, full {lat['frame_size'][0]}x"
          f"{lat['frame_size'][1]} {med(lat['move_full_s']):.2f} s (medians of {len(lat['move_full_s'])}); "
          f"click query re-coloured in {lat['click_recolour_s'] or float('nan'):.2f} s; moves with the query shown: "
          f"coarse {med(lat['query_move_coarse_s']):.2f} s, full {med(lat['query_move_full_s']):.2f} s")
    print(f"render seconds per level: {lat['render_seconds_per_level']}; compiled kernels: {lat['kernels']}"
          + (f" ({lat['compile_s']:.1f} s after the first full frame)" if lat["compile_s"] is not None else ""))
    if args.train_seconds > 0:
        res["training"] = tr = training_cost(args.run, args.train_seconds, args.work)
        print(f"training {args.train_seconds:.0f} s: {tr['alone']['steps_per_wall_s']:.2f} steps/s alone, "
              f"{tr['watched']['steps_per_wall_s']:.2f} watched ({tr['watched']['snapshots']} snapshots): "
              f"{100 * tr['slowdown']:.1f} % slower")
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(res, indent=1))
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
