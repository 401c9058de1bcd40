"""Feature training memory. Issue target: a 384-d teacher at 200x200 x 100 views fits in <= 4 GiB RAM.

Lego at 400 px downscaled 2x (200x200, 100 training views) with the DINOv2 ViT-S/14 teacher (384-d, offline
ONNX). Each phase runs in a fresh process, so every peak RSS below is that phase's own:

  joint  what `dfield train --features.teacher T` does on a new scene: teacher maps computed in-process (into a
         private cache), then --iterations steps with features from step 0. The grid schedule is compressed so
         the final 128^3 grid is reached at 2/3 of the run (as at step 1000 of 1500): memory at full size.
  fit    `dfield distill RUN --method fit` on that run (features second; maps from the cache).
  lift   `dfield distill RUN --method lift` on that run (one pass; reports the saved grid's size).

    python bench/feature_memory.py [DATA] [--downscale 2] [--iterations 300] [--fit-iterations 300] [--threads 1]
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

GIB = 2**30
PHASES = ("joint", "fit", "lift")


def compress_schedule(grid, iterations: int) -> None:
    """Scale the grid schedule (tuned for 1500-3000 steps) so every event happens within `iterations`."""
    f = iterations / 1500
    grid.upsample_steps = tuple(max(1, round(s * f)) for s in grid.upsample_steps)
    grid.shrink_step = max(2, round(grid.shrink_step * f))
    grid.occupancy_start = max(1, round(grid.occupancy_start * f))
    grid.occupancy_every = max(1, round(grid.occupancy_every * f))
    grid.occupancy_slow_after = round(grid.occupancy_slow_after * f)
    grid.occupancy_every_late = max(1, round(grid.occupancy_every_late * f))


def joint(args) -> dict:
    from dfield.config import TrainConfig
    from dfield.core.metrics import PeakMemory
    from dfield.training.trainer import Trainer

    cfg = TrainConfig(iterations=args.iterations, threads=args.threads)
    cfg.data.path, cfg.data.downscale = args.data, args.downscale
    cfg.features.teacher = args.teacher
    compress_schedule(cfg.grid, args.iterations)
    t0 = time.perf_counter()
    with PeakMemory() as cache_mem:  # loads the views, builds the teacher, computes and caches its maps
        trainer = Trainer.create(cfg, args.work / "run", overwrite=True)
    cache_s = time.perf_counter() - t0
    with PeakMemory() as train_mem:
        trainer.train()
    maps = trainer.teacher_maps.maps
    return {"views": len(trainer.data), "image_size": [trainer.data.width, trainer.data.height],
            "teacher_dim": int(maps.shape[-1]), "map_shape": list(maps.shape), "map_bytes": int(maps.nbytes),
            "iterations": trainer.step, "final_res": list(trainer.model.field.res), "schedule": {
                "upsample_steps": list(cfg.grid.upsample_steps), "shrink_step": cfg.grid.shrink_step},
            "teacher_maps_seconds": cache_s, "teacher_maps_peak_rss_bytes": cache_mem.rss_bytes,
            "train_seconds": trainer.seconds, "train_peak_rss_bytes": train_mem.rss_bytes,
            "last": trainer.last,
            # PeakMemory resets the kernel's high-water mark (ru_maxrss too): the two spans cover the process.
            "process_peak_rss_bytes": max(cache_mem.rss_bytes, train_mem.rss_bytes)}


def distilled(args, method: str) -> dict:
    from dfield.features.distill import distill
    from dfield.io.checkpoint import latest_checkpoint

    run = args.work / "run"
    d = distill(run, args.teacher, method=method, iterations=args.fit_iterations, lift_voxels=args.lift_voxels,
                threads=args.threads)
    ckpt = latest_checkpoint(run / "checkpoints") / "model.safetensors"
    return {**d.summary, "checkpoint_model_bytes": ckpt.stat().st_size}


def run_phase(args) -> None:
    import torch

    torch.set_num_threads(args.threads)
    result = joint(args) if args.phase == "joint" else distilled(args, args.phase)
    (args.work / f"{args.phase}.json").write_text(json.dumps(result, indent=1))


def table(results: dict) -> str:
    j = results["joint"]
    rows = [("views + teacher maps (in the joint process)", j["teacher_maps_seconds"], j["teacher_maps_peak_rss_bytes"]),
            (f"joint training, {j['iterations']} steps", j["train_seconds"], j["train_peak_rss_bytes"]),
            ("joint process, whole", j["teacher_maps_seconds"] + j["train_seconds"], j["process_peak_rss_bytes"])]
    for m in ("fit", "lift"):
        if m in results:
            r = results[m]
            what = (f"{r['iterations']} steps" if m == "fit"
                    else f"{r['lift_cells']} cells, {r['checkpoint_model_bytes'] / 2**20:.0f} MiB checkpoint")
            rows.append((f"distill --method {m} ({what})", r["seconds"], r["peak_rss_bytes"]))
    lines = [f"{j['views']} views of {j['image_size'][0]}x{j['image_size'][1]}, {j['teacher_dim']}-d teacher maps "
             f"{tuple(j['map_shape'])} ({j['map_bytes'] / 2**20:.0f} MiB fp16), final grid {tuple(j['final_res'])}",
             f"{'phase':<58}| {'seconds':>8} | {'peak RSS':>9}"]
    lines += [f"{name:<58}| {s:8.1f} | {b / GIB:6.2f} GiB" for name, s, b in rows]
    worst = max(b for _, _, b in rows)
    lines.append(f"largest peak {worst / GIB:.2f} GiB: {'within' if worst <= 4 * GIB else 'OVER'} the 4 GiB target")
    return "\n".join(lines)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("data", type=Path, nargs="?", default=Path(__file__).resolve().parents[2] / "shared/data/blender_lego_400")
    ap.add_argument("--downscale", type=float, default=2)
    ap.add_argument("--teacher", default=None, help="default: dinov2:block=7,input_size=518,threads=THREADS")
    ap.add_argument("--iterations", type=int, default=300)
    ap.add_argument("--fit-iterations", type=int, default=300)
    ap.add_argument("--lift-voxels", type=int, default=96**3)
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--work", type=Path, default=None, help="run folder and private teacher cache (default: a temp dir)")
    ap.add_argument("--out", type=Path, default=Path(__file__).resolve().parent / "results" / "feature_memory.json")
    ap.add_argument("--phase", choices=PHASES, help=argparse.SUPPRESS)
    args = ap.parse_args()
    args.teacher = args.teacher or f"dinov2:block=7,input_size=518,threads={args.threads}"
    if args.phase:
        return run_phase(args)

    args.work = args.work or Path(tempfile.mkdtemp(prefix="dfield_featmem_"))
    # A private cache: the joint phase computes the maps (as a first run on a scene would), later phases reuse them.
    env = {**os.environ, "DFIELD_CACHE_DIR": str(args.work / "cache"), "OMP_NUM_THREADS": str(args.threads)}
    results = {}
    for phase in PHASES:
        cmd = [sys.executable, __file__, str(args.data), "--phase", phase, "--work", str(args.work),
               "--downscale", str(args.downscale), "--teacher", args.teacher, "--iterations", str(args.iterations),
               "--fit-iterations", str(args.fit_iterations), "--lift-voxels", str(args.lift_voxels),
               "--threads", str(args.threads)]
        print(f"phase {phase} ...", flush=True)
        subprocess.run(cmd, env=env, check=True)
        results[phase] = json.loads((args.work / f"{phase}.json").read_text())
    print(table(results))
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps({"data": str(args.data), "downscale": args.downscale, "teacher": args.teacher,
                                    "threads": args.threads, "work": str(args.work), **results}, indent=1))
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
