"""Scene-fitting speed: test PSNR after fixed amounts of training time, dfield grid vs the NeRF baseline.

    python bench/fit_speed.py                       # lego at 100x100, marks 150/300/600 s, both models
    python bench/fit_speed.py DATA --downscale 1 --marks 60 120 --models grid

Each model is trained once, alone, with the default TrainConfig (only the data, the model and the time
budget are set) until the last mark; with --per-mark, once per mark with that mark as its budget (the default
schedule fits itself to the budget, `TrainConfig.fit_to_budget`, so each mark then shows what a user asking for
that many seconds gets). After every step a hook checks whether the training time has
crossed the next mark and, if so, evaluates the test views; hooks run outside the trainer's timed span,
so evaluation is never counted as training time. The results are printed as a table next to the
reference figures of ../shared/PEERS.md and written, with the machine's description, to --out.
"""

from __future__ import annotations

import argparse
import json
import platform
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch

# This checkout's dfield, not whichever one is installed (benchmarks run from copies of the tree too).
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from dfield.app.progress import ProgressBars
from dfield.config import DataConfig, TrainConfig, to_dict
from dfield.core.metrics import PeakMemory
from dfield.core.profiling import PROFILER
from dfield.errors import TrainingDiverged
from dfield.io.run import load_eval_data
from dfield.models.nerf import NeRFModelConfig
from dfield.training.evaluate import evaluate_views
from dfield.training.trainer import Trainer

REPO = Path(__file__).resolve().parents[1]
DEFAULT_DATA = REPO.parent / "shared/data/blender_lego_400"

# ../shared/PEERS.md: lego 100x100, 25 test views, torch 2.13 CPU, 2 threads; per processor, because the peers ran at
# very different speeds on the two boxes. Keys are substrings of /proc/cpuinfo's "model name".
REFERENCES = {
    "marks_s": [150, 300, 600],
    "AMD EPYC": {
        "TensoRF tuned config tC (PEERS.md, AMD EPYC)": {"psnr": [30.49, 31.79, 31.79], "iterations": 2400, "peak_rss_gib": 1.31},
        "TensoRF tC, schedule doubled (tD) (PEERS.md, AMD EPYC)": {"psnr": [29.78, 31.81, 32.84], "iterations": 4800,
                                                                   "peak_rss_gib": 1.21},
    },
    "Intel(R) Xeon(R)": {
        "TensoRF, tuned for 600 s (PEERS.md, Intel Xeon)": {"psnr": [26.98, 29.93, 31.82], "iterations": 2400, "peak_rss_gib": 1.2},
        "NeRF PE-MLP 8x256 (PEERS.md, Intel Xeon)": {"psnr": [7.48, 7.43, 7.44], "iterations": 47, "peak_rss_gib": 3.5},
    },
}


def references_for(cpu: str | None) -> tuple[str | None, dict]:
    """The PEERS.md rows measured on this processor (key, rows), or (None, {}) when there are none."""
    for key, rows in REFERENCES.items():
        if key != "marks_s" and cpu and key.lower() in cpu.lower():
            return key, rows
    return None, {}


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("data", nargs="?", type=Path, default=DEFAULT_DATA, help="scene folder (default: %(default)s)")
    p.add_argument("--downscale", type=float, default=4.0, help="image downscale (LLFF: picks images_N)")
    p.add_argument("--marks", type=float, nargs="+", default=[150, 300, 600], help="seconds of training at which to evaluate")
    p.add_argument("--models", nargs="+", choices=["grid", "nerf"], default=["grid", "nerf"])
    p.add_argument("--test-every", type=int, default=8, help="evaluate every Nth test view (8: the 25-view lego protocol)")
    p.add_argument("--nerf-test-views", type=int, default=5,
                   help="NeRF renders slowly: evaluate it on this many evenly spaced views of the same test subset (0: all)")
    p.add_argument("--iterations-grid", type=int, default=None, help="grid iterations (default: TrainConfig's)")
    p.add_argument("--iterations-nerf", type=int, default=10**7, help="NeRF iterations; large so only the time budget stops it")
    p.add_argument("--nerf-small", action="store_true", help="tiny NeRF (for smoke tests only; not the baseline)")
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--out", type=Path, default=REPO / "bench/results/fit_speed.json")
    p.add_argument("--keep-runs", type=Path, default=None, help="keep run folders under DIR/<model> (default: a temp dir)")
    p.add_argument("--progress", action="store_true", help="show the trainer's progress bar")
    p.add_argument("--per-mark", action="store_true",
                   help="train one run per mark, each with that mark as its time budget (default: one run to the last mark)")
    p.add_argument("--set", dest="overrides", nargs="+", default=[], metavar="KEY=VALUE",
                   help="change TrainConfig settings for the grid model, e.g. grid.shrink_step=150 batch_rays=1024 "
                        "grid.upsample_steps=100,200 (for tuning; the default protocol sets none)")
    p.add_argument("--profile", action="store_true",
                   help="time the training phases (march, field density/colour, backward, optimiser, schedule...) and "
                        "print them per window of steps (--profile-steps)")
    p.add_argument("--profile-steps", type=int, nargs="+", default=[100, 300, 600, 1000, 2000],
                   help="step boundaries of the profile windows")
    args = p.parse_args(argv)
    args.marks = sorted(args.marks)
    return args


def make_config(args, model: str) -> TrainConfig:
    cfg = TrainConfig(data=DataConfig(path=args.data, downscale=args.downscale, test_every=args.test_every),
                      model=model, max_seconds=args.marks[-1], threads=args.threads)
    if model == "grid" and args.iterations_grid is not None:
        cfg.iterations = args.iterations_grid
    if model == "grid":
        for item in args.overrides:
            apply_override(cfg, item)
    if model == "nerf":
        cfg.iterations = args.iterations_nerf
        if args.nerf_small:
            cfg.nerf = NeRFModelConfig(depth=2, width=32, skip=0, pos_freqs=4, dir_freqs=2, n_coarse=16, n_fine=16)
    return cfg


def apply_override(cfg, item: str) -> None:
    """KEY=VALUE on a (nested) dataclass; the value is parsed as the field's current type (tuples: comma lists)."""
    key, eq, value = item.partition("=")
    if not eq:
        sys.exit(f"--set {item!r}: expected KEY=VALUE")
    *path, name = key.split(".")
    target = cfg
    for part in path:
        target = getattr(target, part)
    if not hasattr(target, name):
        sys.exit(f"--set {item!r}: no setting {key}")
    old = getattr(target, name)
    if isinstance(old, tuple):
        new = tuple(type(old[0])(v) if old else int(v) for v in value.split(",") if v)
    elif isinstance(old, bool):
        new = value.lower() in ("1", "true", "yes")
    else:
        new = type(old)(value)
    setattr(target, name, new)


def evenly_spaced(n: int, k: int) -> list[int]:
    if k <= 0 or k >= n:
        return list(range(n))
    return sorted({round(i * (n - 1) / (k - 1)) for i in range(k)}) if k > 1 else [n // 2]


def fit_one(args, model: str, run_root: Path) -> dict:
    cfg = make_config(args, model)
    with PeakMemory() as mem:
        trainer = Trainer.create(cfg, run_root / model, overwrite=True)
        cfg = trainer.cfg  # with the scene type auto chose and that type's defaults (dfield.config.SCENE_DEFAULTS)
        test = load_eval_data(cfg, "test")
        views = evenly_spaced(len(test), args.nerf_test_views) if model == "nerf" else list(range(len(test)))
        test = test.subset(views)
        marks: list[dict] = []

        def evaluate(final: bool) -> dict:
            t0 = time.perf_counter()
            profiling, PROFILER.enabled = PROFILER.enabled, False  # evaluation renders are not training time
            res = evaluate_views(trainer.model, test, cfg.device, with_ssim=True, with_lpips=False)
            PROFILER.enabled = profiling
            return {"psnr": res["psnr"], "ssim": res["ssim"], "step": trainer.step, "seconds": round(trainer.seconds, 2),
                    "final": final, "eval_seconds": round(time.perf_counter() - t0, 2),
                    "per_view_psnr": [v["psnr"] for v in res["per_view"]]}

        def report(row: dict) -> None:
            tag = " (final model)" if row["final"] else ""
            print(f"  {model} @{row['mark_s']:g} s: PSNR {row['psnr']:.2f} dB, SSIM {row['ssim']:.4f}, "
                  f"step {row['step']}, trained {row['seconds']:.1f} s, eval {row['eval_seconds']:.1f} s{tag}", flush=True)

        windows: list[dict] = []
        last = {"step": 0, "seconds": 0.0}

        def close_window(tr: Trainer) -> None:
            phases = PROFILER.take()
            steps = tr.step - last["step"]
            if steps > 0:
                windows.append({"steps": [last["step"], tr.step], "seconds": round(tr.seconds - last["seconds"], 3),
                                "rays_per_s": steps * cfg.batch_rays / max(tr.seconds - last["seconds"], 1e-9),
                                "ms_per_step": {k: 1000 * v / steps for k, v in sorted(phases.items())}})
            last.update(step=tr.step, seconds=tr.seconds)

        def hook(tr: Trainer) -> None:
            if args.profile and tr.step in args.profile_steps:
                close_window(tr)
            crossed = [m for m in args.marks[len(marks):] if tr.seconds >= m]
            if crossed:  # one step may cross several marks (slow NeRF steps): evaluate once
                res = evaluate(final=False)
                for m in crossed:
                    marks.append({"mark_s": m, **res})
                    report(marks[-1])

        print(f"{model}: {len(trainer.data)} train views {trainer.data.width}x{trainer.data.height}, "
              f"{len(test)} test views, {cfg.batch_rays} rays/step, up to {cfg.iterations} steps / {cfg.max_seconds:g} s", flush=True)
        error = None
        PROFILER.enable(args.profile)
        PROFILER.take()
        try:
            with ProgressBars(args.progress) as bars:
                trainer.train(hooks=[hook], progress=bars)
        except TrainingDiverged as e:
            error = str(e)
            print(f"  {model}: {error}", flush=True)
        if args.profile:
            close_window(trainer)
            PROFILER.enable(False)
            print_profile(model, windows)
        if len(marks) < len(args.marks) and error is None:  # stopped before the later marks
            res = evaluate(final=True)
            for m in args.marks[len(marks):]:
                marks.append({"mark_s": m, **res})
                report(marks[-1])
    stopped_by = "error" if error else "iterations" if trainer.step >= cfg.iterations else "max_seconds"
    if trainer.budget_plan is not None:
        print(f"  {model}: {trainer.budget_plan_text()}", flush=True)
    return {
        "model": model, "train_config": to_dict(cfg), "marks": marks, "test_views": views, "n_test_views": len(views),
        "iterations": trainer.step, "seconds": round(trainer.seconds, 2), "stopped_by": stopped_by,
        "finished_at_step": trainer.step if stopped_by == "iterations" else None,
        "finished_at_seconds": round(trainer.seconds, 2) if stopped_by == "iterations" else None,
        "rays_per_s": trainer.step * cfg.batch_rays / max(trainer.seconds, 1e-9),
        "peak_rss_bytes": mem.rss_bytes, "peak_rss_since_model_start": mem.rss_reset, "error": error,
        "profile": windows, "budget_plan": trainer.budget_plan,
    }


# Top-level phases of a step (they add up to "step" minus the loss arithmetic), then what "render" is made of.
TOP_PHASES = ("schedule", "rays", "render", "backward", "optimizer")
RENDER_PHASES = ("march", "density", "color", "features")


def print_profile(model: str, windows: list[dict]) -> None:
    """Milliseconds per step of each phase, one column per window of steps, and each phase's share of the step."""
    if not windows:
        return
    head = ["phase (ms/step)"] + [f"{w['steps'][0]}-{w['steps'][1]}" for w in windows]
    rows = []
    for name in ("step", *TOP_PHASES, "other", *RENDER_PHASES):
        cells = []
        for w in windows:
            ms = w["ms_per_step"]
            v = ms.get("step", 0) - sum(ms.get(k, 0) for k in TOP_PHASES) if name == "other" else ms.get(name)
            share = f" ({100 * v / ms['step']:.0f}%)" if v is not None and name != "step" and ms.get("step") else ""
            cells.append("-" if v is None else f"{v:.1f}{share}")
        label = name if name in ("step", *TOP_PHASES, "other") else f"  {name} (in render)"
        rows.append([label, *cells])
    rows.append(["rays/s", *[f"{w['rays_per_s']:.0f}" for w in windows]])
    widths = [max(len(h), *(len(r[i]) for r in rows)) for i, h in enumerate(head)]
    print(f"\n{model}: where the training time goes (other = loss arithmetic, learning rates, bookkeeping)")
    for r in [head, *rows]:
        print(" | ".join(c.ljust(widths[0]) if i == 0 else c.rjust(widths[i]) for i, c in enumerate(r)))


def machine_info() -> dict:
    cpu = None
    try:
        cpu = next(l.split(":", 1)[1].strip() for l in Path("/proc/cpuinfo").read_text().splitlines() if l.startswith("model name"))
    except (OSError, StopIteration):
        cpu = platform.processor() or None
    try:
        commit = subprocess.run(["git", "-C", str(REPO), "rev-parse", "HEAD"], capture_output=True, text=True).stdout.strip() or None
        dirty = bool(subprocess.run(["git", "-C", str(REPO), "status", "--porcelain"], capture_output=True, text=True).stdout.strip())
    except OSError:
        commit, dirty = None, None
    return {"cpu": cpu, "cpu_count": __import__("os").cpu_count(), "torch": torch.__version__, "threads": torch.get_num_threads(),
            "python": platform.python_version(), "platform": platform.platform(), "git_commit": commit, "git_dirty": dirty}


def comparison(results: dict) -> list[dict]:
    g, n = results.get("grid"), results.get("nerf")
    if not g or not n or not g["marks"] or not n["marks"]:
        return []
    rows = []
    for a, b in zip(g["marks"], n["marks"]):
        # grid's PSNR on the views NeRF was evaluated on (grid's views are the whole subset, in order)
        same = [a["per_view_psnr"][i] for i in n["test_views"]]
        d = sum(same) / len(same) - b["psnr"]
        rows.append({"mark_s": a["mark_s"], "grid_psnr_on_nerf_views": sum(same) / len(same), "psnr_diff_db": d,
                     "mse_ratio_nerf_over_grid": 10 ** (d / 10), "step_ratio": a["step"] / max(b["step"], 1)})
    return rows


def fmt_mem(b) -> str:
    return f"{b / 2**30:.2f} GiB" if b else "-"


def print_table(args, results: dict, comp: list[dict]) -> None:
    head = ["model", "views"] + [f"PSNR@{m:g}s" for m in args.marks] + [f"SSIM@{args.marks[-1]:g}s", "iterations", "rays/s", "peak RSS"]
    rows = []
    for name, r in results.items():
        ps = [f"{m['psnr']:.2f}" + ("*" if m["final"] else "") for m in r["marks"]]
        ps += ["-"] * (len(args.marks) - len(ps))
        ssim = f"{r['marks'][-1]['ssim']:.4f}" if r["marks"] else "-"
        rows.append([f"dfield {name}", str(r["n_test_views"]), *ps, ssim, str(r["iterations"]), f"{r['rays_per_s']:.0f}", fmt_mem(r["peak_rss_bytes"])])
    same_protocol = args.marks == REFERENCES["marks_s"] and "blender_lego" in str(args.data) and args.downscale == 4
    cpu = machine_info()["cpu"]
    proc, refs = references_for(cpu)
    if same_protocol:
        for name, ref in refs.items():
            rows.append([f"ref: {name}", "25", *[f"{p:.2f}" for p in ref["psnr"]], "-", str(ref["iterations"]), "-",
                         f"{ref['peak_rss_gib']:.2f} GiB"])
    widths = [max(len(h), *(len(r[i]) for r in rows)) for i, h in enumerate(head)]
    line = lambda cells: " | ".join(c.ljust(w) if i == 0 else c.rjust(w) for i, (c, w) in enumerate(zip(cells, widths)))
    print()
    print(line(head))
    print("-+-".join("-" * w for w in widths))
    for r in rows:
        print(line(r))
    print("* the run ended before this mark; the final model was evaluated.")
    if "nerf" in results:
        print(f"NeRF PSNR is the mean over {results['nerf']['n_test_views']} evenly spaced views of the test subset (rendering is slow).")
    if not same_protocol:
        print("reference figures (../shared/PEERS.md: lego 100x100, marks 150/300/600 s) not shown: another protocol")
    elif proc is None:
        print(f"reference figures not shown: ../shared/PEERS.md has none for this processor ({cpu})")
    for c in comp:
        print(f"grid vs NeRF @{c['mark_s']:g} s, on NeRF's views: {c['psnr_diff_db']:+.2f} dB (NeRF MSE {c['mse_ratio_nerf_over_grid']:.1f}x grid's), "
              f"{c['step_ratio']:.1f}x the steps")
    if "grid" in results and "nerf" in results:
        print(f"grid vs NeRF throughput: {results['grid']['rays_per_s'] / max(results['nerf']['rays_per_s'], 1e-9):.1f}x rays/s")


def main(argv=None) -> None:
    args = parse_args(argv)
    torch.set_num_threads(args.threads)
    print(f"processor: {machine_info()['cpu']}, torch {torch.__version__}, {args.threads} threads", flush=True)
    if not args.data.exists():
        sys.exit(f"{args.data}: no such scene folder")
    results = {}
    with tempfile.TemporaryDirectory(prefix="fit_speed_") as tmp:
        run_root = args.keep_runs or Path(tmp)
        for model in args.models:  # one at a time: they would compete for the cores
            if args.per_mark:
                parts = [fit_one(argparse.Namespace(**{**vars(args), "marks": [m]}), model, run_root / f"{m:g}s")
                         for m in args.marks]
                results[model] = {**parts[-1], "marks": [p["marks"][0] for p in parts],
                                  "per_mark": [{k: p[k] for k in ("iterations", "seconds", "stopped_by", "budget_plan",
                                                                  "peak_rss_bytes")} for p in parts]}
            else:
                results[model] = fit_one(args, model, run_root)
    comp = comparison(results)
    print_table(args, results, comp)
    out = {
        "benchmark": "fit_speed",
        "args": {k: str(v) if isinstance(v, Path) else v for k, v in vars(args).items()},
        "machine": machine_info(),
        "results": results,
        "grid_vs_nerf": comp,
        "references": {"source": "../shared/PEERS.md", "marks_s": REFERENCES["marks_s"],
                       "processor": references_for(machine_info()["cpu"])[0],
                       "rows": references_for(machine_info()["cpu"])[1]},
        "notes": "PSNR/SSIM: mean over test views; NeRF on n_test_views evenly spaced views of the subset. "
                 "Training seconds exclude evaluation. A mark with final=true was reached after training ended.",
    }
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(out, indent=1))
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
