"""Unbounded scenes: the contracted grid model against the bounded one on a generated 360-degree scene with far
surroundings, at equal training time, scored on held-out views and on an orbit against ground truth.

    python bench/unbounded.py                          # 128x128, 100 train / 20 test views, 300 s per model
    python bench/unbounded.py --seconds 120 --marks 60 120 --types unbounded

The scene (`dfield generate-scene DIR --unbounded`) is generated once into --scene. Each scene type is trained once
(`--scene-type unbounded`: the contraction; `--scene-type object`: the objects' box, what the scene would get
without it), with the test views evaluated each time the training time crosses a mark (evaluation is not training
time). Then both render an orbit around the objects that the generator also renders, so every frame has ground
truth colour and depth: orbit PSNR, and the share of *floater* pixels, whose rendered depth is less than 3/4 of the
true depth (something in front of the true surface; depths beyond 20 units count as 20, so a sky placed anywhere
far is not a floater). Frames are saved as PNG strips (ground truth, each model's colour, the contracted model's
disparity) and MP4s under --frames.
"""

from __future__ import annotations

import argparse
import json
import platform
import time
from dataclasses import replace
from pathlib import Path

import numpy as np
import torch
from fit_speed import apply_override  # bench/ is on the path when a bench script runs

from dfield.config import DataConfig, TrainConfig, to_dict
from dfield.core.camera_paths import orbit_path
from dfield.core.image_rendering import render_image
from dfield.core.metrics import PeakMemory, psnr
from dfield.data import load_dataset
from dfield.data.generate import SceneSpec, generate_scene, render_view
from dfield.io.export import save_png, save_video, turbo
from dfield.io.run import load_eval_data
from dfield.training.evaluate import evaluate_views
from dfield.training.trainer import Trainer

REPO = Path(__file__).resolve().parents[1]
FLOATER_DEPTH_RATIO = 0.75
FLOATER_DEPTH_CAP = 20.0


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--scene", type=Path, default=REPO / "bench/results/unbounded_scene")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--size", type=int, default=128, help="image width and height of the generated scene")
    p.add_argument("--n-train", type=int, default=100)
    p.add_argument("--n-test", type=int, default=20)
    p.add_argument("--elevation", type=float, nargs=2, default=[5.0, 40.0], help="camera elevation range, degrees")
    p.add_argument("--seconds", type=float, default=300.0, help="training time of each model")
    p.add_argument("--marks", type=float, nargs="+", default=None, help="evaluate at these training times (default: "
                   "--seconds)")
    p.add_argument("--types", nargs="+", choices=["unbounded", "object"], default=["unbounded", "object"])
    p.add_argument("--orbit-frames", type=int, default=24)
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--set", dest="overrides", nargs="+", default=[], metavar="KEY=VALUE",
                   help="TrainConfig settings for every model, e.g. grid.voxels_final=2097152")
    p.add_argument("--runs", type=Path, default=Path("/tmp/dfield_unbounded_runs"))
    p.add_argument("--frames", type=Path, default=REPO / "bench/results/unbounded_frames")
    p.add_argument("--out", type=Path, default=REPO / "bench/results/unbounded.json")
    args = p.parse_args(argv)
    args.marks = sorted(args.marks or [args.seconds])
    return args


def scene_spec(args) -> SceneSpec:
    return SceneSpec(seed=args.seed, n_train=args.n_train, n_test=args.n_test, width=args.size, height=args.size,
                     elevation_min_deg=args.elevation[0], elevation_max_deg=args.elevation[1], unbounded=True)


def ensure_scene(args) -> SceneSpec:
    spec = scene_spec(args)
    info = args.scene / "objects.json"
    if not info.is_file() or json.loads(info.read_text())["spec"] != to_dict(spec):
        t0 = time.perf_counter()
        generate_scene(args.scene, spec)
        print(f"generated {args.scene} in {time.perf_counter() - t0:.1f} s", flush=True)
    return spec


def train_one(args, kind: str) -> tuple[Trainer, dict]:
    cfg = TrainConfig(data=DataConfig(path=args.scene, scene_type=kind), max_seconds=args.marks[-1],
                      threads=args.threads)
    for item in args.overrides:
        apply_override(cfg, item)
    with PeakMemory() as mem:
        trainer = Trainer.create(cfg, args.runs / kind, overwrite=True)
        test = load_eval_data(trainer.cfg, "test")
        marks: list[dict] = []

        def hook(tr: Trainer) -> None:
            crossed = [m for m in args.marks[len(marks):] if tr.seconds >= m]
            if crossed:
                res = evaluate_views(tr.model, test, with_ssim=True, with_lpips=False)
                for m in crossed:
                    marks.append({"mark_s": m, "psnr": res["psnr"], "ssim": res["ssim"], "step": tr.step,
                                  "seconds": round(tr.seconds, 2)})
                    print(f"  {kind} @{m:g} s: test PSNR {res['psnr']:.2f} dB, SSIM {res['ssim']:.4f}, step {tr.step}",
                          flush=True)

        print(f"{kind}: {len(trainer.data)} views {trainer.data.width}x{trainer.data.height}, up to "
              f"{trainer.cfg.iterations} steps / {trainer.cfg.max_seconds:g} s", flush=True)
        trainer.train(hooks=[hook])
        if len(marks) < len(args.marks):  # the schedule finished first: the final model holds for the later marks
            res = evaluate_views(trainer.model, test, with_ssim=True, with_lpips=False)
            for m in args.marks[len(marks):]:
                marks.append({"mark_s": m, "psnr": res["psnr"], "ssim": res["ssim"], "step": trainer.step,
                              "seconds": round(trainer.seconds, 2), "final": True})
                print(f"  {kind} @{m:g} s: test PSNR {res['psnr']:.2f} dB (final model)", flush=True)
    row = {"scene_type": kind, "marks": marks, "steps": trainer.step, "seconds": round(trainer.seconds, 2),
           "rays_per_s": trainer.step * trainer.cfg.batch_rays / max(trainer.seconds, 1e-9),
           "peak_rss_bytes": mem.rss_bytes, "train_config": to_dict(trainer.cfg)}
    return trainer, row


def disparity_image(depth: np.ndarray) -> np.ndarray:
    """(H, W) depths -> (H, W, 3) Turbo colours of 1 / depth, scaled to the frame's 99th percentile."""
    disp = 1.0 / np.maximum(depth, 1e-6)
    return turbo(disp / max(float(np.percentile(disp, 99)), 1e-9))


@torch.no_grad()
def orbit_scores(trainer: Trainer, spec: SceneSpec, source_orbit, frames: int) -> tuple[dict, list[dict]]:
    """Render the orbit (given in the generator's coordinates) with the trained model and score it."""
    m = trainer.data.scene_from_source
    m = torch.eye(4, dtype=torch.float64) if m is None else m.double()
    scale = float(m[:3, :3].norm(dim=0).mean())
    c2w = source_orbit.c2w.double()
    moved = torch.cat([(m[:3, :3] / scale) @ c2w[:, :, :3], m[:3, :3] @ c2w[:, :, 3:] + m[:3, 3:]], -1)
    cams = replace(source_orbit, c2w=moved.float())
    trainer.model.eval()
    rows, images = [], []
    for i in range(frames):
        out = render_image(trainer.model, cams, i)
        gt = render_view(spec, c2w[i].numpy())
        rgb_gt = torch.from_numpy(gt["rgba"][..., :3]).float() / 255.0
        depth = (out["depth"] / out["acc"].clamp(min=1e-6)).numpy() / scale
        true = np.minimum(gt["depth"], FLOATER_DEPTH_CAP)
        floaters = (out["acc"].numpy() > 0.5) & (depth < FLOATER_DEPTH_RATIO * true)
        rows.append({"psnr": psnr(out["rgb"], rgb_gt), "floater_fraction": float(floaters.mean())})
        images.append({"gt": rgb_gt.numpy(), "rgb": out["rgb"].numpy(), "disparity": disparity_image(depth),
                       "floaters": floaters})
    summary = {"psnr": float(np.mean([r["psnr"] for r in rows])),
               "floater_fraction": float(np.mean([r["floater_fraction"] for r in rows])),
               "worst_frame_floater_fraction": float(max(r["floater_fraction"] for r in rows)), "per_frame": rows}
    return summary, images


def cpu_model() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def main(argv=None) -> None:
    args = parse_args(argv)
    torch.set_num_threads(args.threads)
    spec = ensure_scene(args)
    source = load_dataset(args.scene, "train", scene_type="object")
    orbit = orbit_path(source.cameras, args.orbit_frames)
    results, renders = {}, {}
    for kind in args.types:
        trainer, row = train_one(args, kind)
        t0 = time.perf_counter()
        row["orbit"], renders[kind] = orbit_scores(trainer, spec, orbit, args.orbit_frames)
        row["orbit"]["render_seconds"] = round(time.perf_counter() - t0, 1)
        print(f"  {kind} orbit: PSNR {row['orbit']['psnr']:.2f} dB against ground truth, floater pixels "
              f"{100 * row['orbit']['floater_fraction']:.2f} % (worst frame "
              f"{100 * row['orbit']['worst_frame_floater_fraction']:.2f} %)", flush=True)
        results[kind] = row
        del trainer

    args.frames.mkdir(parents=True, exist_ok=True)
    first = next(iter(renders.values()))
    strips = []
    for i in range(args.orbit_frames):
        column = ([first[i]["gt"]] + [renders[k][i]["rgb"] for k in args.types]
                  + [renders[args.types[0]][i]["disparity"]])
        strips.append(np.concatenate(column, 0))
    for k in args.types:
        save_video(args.frames / f"orbit_{k}.mp4", [renders[k][i]["rgb"] for i in range(args.orbit_frames)], fps=8)
    for j in range(0, args.orbit_frames, 6):
        save_png(args.frames / f"orbit_{j:03d}_{j + 5:03d}.png", np.concatenate(strips[j:j + 6], 1))
    rows = " / ".join(f"{k}" for k in args.types)
    print(f"wrote {args.frames}/orbit_*.png (rows: ground truth / {rows} / {args.types[0]} disparity) and MP4s")

    if {"unbounded", "object"} <= set(results):
        gap = [u["psnr"] - o["psnr"] for u, o in zip(results["unbounded"]["marks"], results["object"]["marks"])]
        print("unbounded minus object, test PSNR at "
              + ", ".join(f"{m:g} s: {g:+.2f} dB" for m, g in zip(args.marks, gap)))
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps({"args": {k: str(v) if isinstance(v, Path) else v for k, v in vars(args).items()},
                                    "spec": to_dict(spec), "results": results,
                                    "machine": {"cpu": cpu_model(), "torch": torch.__version__,
                                                "threads": args.threads}}, indent=1))
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
