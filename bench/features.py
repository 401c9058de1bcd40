"""Feature fusion benchmark on a generated scene with a deliberately noisy teacher.

One trained radiance field, three ways to get 3D-consistent features, all scored on held-out views by
3D-rendered segmentation mIoU against ground-truth object ids (nearest object embedding):
  teacher    the teacher's own 2D maps of the held-out images (what you get without 3D)
  distilled  a feature field trained on the frozen radiance field (features second)
  lifted     one pass, no training: weighted averages of teacher features per voxel
Printed side by side with seconds, and written to JSON.

    python bench/features.py [--run RUN] [--distill-iterations 1000] [--out bench/results/features.json]
"""

from __future__ import annotations

import argparse
import copy
import json
import sys
import tempfile
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from dfield.app import api
from dfield.data.generate import SceneSpec, generate_scene
from dfield.features.fitting import fit_features
from dfield.features.lifting import lift_features
from dfield.features.segmentation import segmentation_eval
from dfield.features.teachers import cached_features, feature_cache_dir, make_teacher
from dfield.io.run import load_eval_data, load_train_data, open_run


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--run", type=Path, help="a trained run on a generated scene (default: generate and train one)")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--iterations", type=int, default=1500, help="radiance training steps when no --run is given")
    ap.add_argument("--teacher", default="synthetic")
    ap.add_argument("--distill-iterations", type=int, default=1000)
    ap.add_argument("--lift-voxels", type=int, default=96**3)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--out", type=Path, default=Path(__file__).resolve().parent / "results" / "features.json")
    args = ap.parse_args()
    torch.set_num_threads(args.threads)

    run = args.run
    if run is None:
        work = Path(tempfile.mkdtemp(prefix="dfield_feat_"))
        generate_scene(work / "scene", SceneSpec(seed=args.seed))
        cfg = api.demo_config(work / "scene")
        cfg.iterations = args.iterations
        run = api.train(cfg, work / "run", evaluate=False, progress=False)
    r = open_run(run)
    train, test = load_train_data(r.cfg), load_eval_data(r.cfg)
    teacher = make_teacher(args.teacher)
    t0 = time.perf_counter()
    maps = cached_features(teacher, train, feature_cache_dir())
    teacher_s = time.perf_counter() - t0

    distilled = copy.deepcopy(r.model)
    distilled.add_feature_field(32, teacher.dim)
    fit = fit_features(distilled, train, maps, iterations=args.distill_iterations)
    distilled.eval()
    seg_d = segmentation_eval(distilled, test, teacher)

    lifted = lift_features(r.model, train, maps, n_voxels=args.lift_voxels)
    r.model.lifted = lifted.features
    seg_l = segmentation_eval(r.model, test, teacher)

    rows = [
        ("teacher 2D", seg_d["teacher_miou"], seg_d["teacher_accuracy"], teacher_s, "encode train views"),
        ("distilled 3D", seg_d["field_miou"], seg_d["field_accuracy"], fit["seconds"], f"{args.distill_iterations} steps"),
        ("lifted 3D", seg_l["field_miou"], seg_l["field_accuracy"], lifted.seconds, "one pass"),
    ]
    print(f"\n{len(test)} held-out views, teacher {teacher.name}")
    print(f"{'features':<14}| {'mIoU':>6} | {'acc':>6} | {'seconds':>8} | note")
    for name, m, a, s, note in rows:
        print(f"{name:<14}| {m:6.3f} | {a:6.3f} | {s:8.1f} | {note}")
    print(f"distilled - teacher: {seg_d['field_miou'] - seg_d['teacher_miou']:+.3f} mIoU;  "
          f"lifted - distilled: {seg_l['field_miou'] - seg_d['field_miou']:+.3f} mIoU in "
          f"{lifted.seconds / fit['seconds']:.2f}x the time")
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps({
        "run": str(run), "teacher": teacher.name, "views": len(test),
        "teacher_2d": {"miou": seg_d["teacher_miou"], "accuracy": seg_d["teacher_accuracy"], "per_object": {k: v["teacher"] for k, v in seg_d["per_object"].items()}},
        "distilled": {"miou": seg_d["field_miou"], "accuracy": seg_d["field_accuracy"], "seconds": fit["seconds"], "iterations": args.distill_iterations, "per_object": {k: v["field"] for k, v in seg_d["per_object"].items()}},
        "lifted": {"miou": seg_l["field_miou"], "accuracy": seg_l["field_accuracy"], "seconds": lifted.seconds, "per_object": {k: v["field"] for k, v in seg_l["per_object"].items()}},
    }, indent=1))
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
