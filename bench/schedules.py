"""When to train features: joint, radiance first, or features second, on a generated scene with a noisy teacher.

Three runs of the same radiance schedule (--iterations steps, same seed) on one generated scene, scored on its
held-out views: test PSNR, and 3D segmentation mIoU against ground-truth object ids (nearest object embedding,
as in bench/features.py), with training seconds:

  joint            features from step 0 (FeatureConfig.start_step = 0)
  radiance-first   features from step --feature-start on (the same run otherwise)
  features-second  radiance only, then `dfield distill --method fit` for --fit-iterations steps on the frozen field
                   (default: as many feature steps as radiance-first gets)

    python bench/schedules.py [--iterations 600] [--feature-start 300] [--fit-iterations 300] [--threads 1]
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from dfield.app import api
from dfield.data.generate import SceneSpec, generate_scene
from dfield.features.distill import distill
from dfield.features.segmentation import segmentation_eval
from dfield.features.teachers import make_teacher
from dfield.io.run import load_eval_data, open_run
from dfield.training.evaluate import evaluate_views
from dfield.training.trainer import Trainer


def train(scene: Path, out: Path, args, teacher: str, start_step: int = 0) -> float:
    cfg = api.demo_config(scene)
    cfg.iterations, cfg.threads, cfg.seed = args.iterations, args.threads, args.seed
    cfg.features.teacher, cfg.features.start_step = teacher, start_step
    trainer = Trainer.create(cfg, out, overwrite=True)
    trainer.train()
    return trainer.seconds


def score(run: Path, teacher) -> dict:
    r = open_run(run)
    test = load_eval_data(r.cfg)
    psnr = evaluate_views(r.model, test, with_ssim=False, with_lpips=False)["psnr"]
    seg = segmentation_eval(r.model, test, teacher)
    return {"psnr": psnr, "miou": seg["field_miou"], "accuracy": seg["field_accuracy"],
            "teacher_miou": seg["teacher_miou"], "teacher_accuracy": seg["teacher_accuracy"], "views": len(test)}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--scene", type=Path, help="a generated scene (default: generate one with --seed)")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--teacher", default="synthetic")
    ap.add_argument("--iterations", type=int, default=600, help="radiance steps, the same for every schedule")
    ap.add_argument("--feature-start", type=int, default=None, help="radiance-first: first feature step (default: half)")
    ap.add_argument("--fit-iterations", type=int, default=None, help="features-second steps (default: iterations - feature-start)")
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--work", type=Path, default=None, help="where the runs go (default: a temp dir)")
    ap.add_argument("--out", type=Path, default=Path(__file__).resolve().parent / "results" / "schedules.json")
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    start = args.iterations // 2 if args.feature_start is None else args.feature_start
    fit_steps = args.iterations - start if args.fit_iterations is None else args.fit_iterations
    work = args.work or Path(tempfile.mkdtemp(prefix="dfield_sched_"))
    scene = args.scene or generate_scene(work / "scene", SceneSpec(seed=args.seed))
    teacher = make_teacher(args.teacher)

    rows = {}
    t = train(scene, work / "joint", args, args.teacher, 0)
    rows["joint"] = {**score(work / "joint", teacher), "seconds": t, "radiance_steps": args.iterations,
                     "feature_steps": args.iterations}
    t = train(scene, work / "radiance_first", args, args.teacher, start)
    rows["radiance-first"] = {**score(work / "radiance_first", teacher), "seconds": t,
                              "radiance_steps": args.iterations, "feature_steps": args.iterations - start}
    t = train(scene, work / "features_second", args, "")
    t0 = time.perf_counter()
    d = distill(work / "features_second", args.teacher, method="fit", iterations=fit_steps, threads=args.threads)
    rows["features-second"] = {**score(work / "features_second", teacher), "seconds": t + d.summary["seconds"],
                               "radiance_seconds": t, "fit_seconds": d.summary["seconds"],
                               "distill_command_seconds": time.perf_counter() - t0,
                               "radiance_steps": args.iterations, "feature_steps": fit_steps}

    any_row = next(iter(rows.values()))
    print(f"\n{any_row['views']} held-out views, teacher {teacher.name}: its own 2D maps score mIoU "
          f"{any_row['teacher_miou']:.3f} (accuracy {any_row['teacher_accuracy']:.3f})")
    print(f"{'schedule':<16}| {'radiance':>8} | {'features':>8} | {'PSNR':>6} | {'mIoU':>6} | {'acc':>6} | {'seconds':>7}")
    for name, r in rows.items():
        print(f"{name:<16}| {r['radiance_steps']:8d} | {r['feature_steps']:8d} | {r['psnr']:6.2f} | {r['miou']:6.3f} | "
              f"{r['accuracy']:6.3f} | {r['seconds']:7.1f}")
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps({"scene": str(scene), "teacher": teacher.name, "seed": args.seed,
                                    "threads": args.threads, "feature_start": start, **rows}, indent=1))
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
