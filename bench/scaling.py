"""Scaling past one process: data-parallel speed and test PSNR for N = 1 and 2 processes, and peak memory against the
number of training images.

    python bench/scaling.py                          # everything: about 35 minutes on 2 cores
    python bench/scaling.py --skip-speed             # memory only
    python bench/scaling.py --baseline-code ../main  # also the memory of another checkout (before out-of-core data)

It generates one scene (`--views` max training views + `--n-test` test views at `--size` px, kept in `--work`) and
lists its first V views as the scenes of V views.

**Speed**: the same run (`--speed-views` views, default TrainConfig) trained once as 1 process x `--threads` threads
and once as `--threads` processes x 1 thread (`dfield.app.launch`, gloo), to `--seconds` of training or the end of
the schedule. A hook on rank 0 evaluates the test views when the training time crosses each of `--marks` (fixed
time) and at each of `--step-marks` (the same steps: the same model?); hooks run outside the timed span. rays/s is
steps x batch / training seconds.

**Memory**: `dfield train` on V = each of `--views` for `--rss-iterations` steps (past the box shrink) in a fresh
process, 1 thread, with an empty image store (so decoding the images is measured too); peak RSS is the child's
maximum resident set (wait4's ru_maxrss).

Results: printed as Markdown tables and written to `--out` (default bench/results/scaling.json).
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import shutil
import subprocess
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

import torch

from dfield.app.launch import launch
from dfield.config import DataConfig, TrainConfig, to_dict
from dfield.core import ranks
from dfield.data.generate import SceneSpec, generate_scene
from dfield.io.checkpoint import latest_checkpoint
from dfield.io.run import load_eval_data
from dfield.training.evaluate import evaluate_views
from dfield.training.trainer import Trainer


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--work", type=Path, default=Path("/tmp/dfield_scaling"), help="scene, runs and image store")
    p.add_argument("--size", type=int, default=200, help="image width and height of the generated scene")
    p.add_argument("--views", type=int, nargs="+", default=[100, 400, 1600], help="training views for the memory runs")
    p.add_argument("--n-test", type=int, default=20)
    p.add_argument("--supersample", type=int, default=2, help="generated scene antialiasing (1: faster to generate)")
    p.add_argument("--distinct", type=int, default=None,
                   help="render only this many distinct training views; scenes of more views reuse them cyclically "
                        "as copied files (each decoded and stored on its own: the same memory as distinct images, "
                        "minutes less rendering; for the memory runs)")
    p.add_argument("--speed-views", type=int, default=100)
    p.add_argument("--test-every", type=int, default=1, help="speed and kill runs evaluate every Nth test view")
    p.add_argument("--threads", type=int, default=2, help="cores: 1 process x this many threads vs this many processes")
    p.add_argument("--seconds", type=float, default=600, help="training time limit of the speed runs")
    p.add_argument("--marks", type=float, nargs="+", default=[150, 300], help="evaluate at these training seconds")
    p.add_argument("--step-marks", type=int, nargs="+", default=[1500, 3000], help="and at these steps")
    p.add_argument("--iterations", type=int, default=None, help="speed runs' iterations (default: TrainConfig's)")
    p.add_argument("--rss-iterations", type=int, default=400)
    p.add_argument("--baseline-code", type=Path, default=None,
                   help="also measure memory with the dfield of this checkout (e.g. main before out-of-core data)")
    p.add_argument("--kill-iterations", type=int, default=0,
                   help="also: a 2-process `dfield train` of this many steps on the speed scene, SIGKILLed after its "
                        "half-way checkpoint and resumed with 1 and with 2 processes, against the same run uninterrupted "
                        "(test PSNR of each); 0: skip")
    p.add_argument("--baseline-only", action="store_true", help="memory runs of --baseline-code only")
    p.add_argument("--skip-speed", action="store_true")
    p.add_argument("--skip-rss", action="store_true")
    p.add_argument("--out", type=Path, default=REPO / "bench/results/scaling.json")
    return p.parse_args(argv)


# ------------------------------------------------------------------------------------------- scenes


def make_scenes(args) -> dict[int, Path]:
    """The generated scene (max views, or `--distinct` of them) and, per V, a scene folder listing V training views:
    the first V, or the distinct ones cyclically as copied files (linked where the filesystem allows)."""
    big = max(args.views + [args.speed_views])
    distinct = min(big, args.distinct or big)
    root = args.work / f"scene_{args.size}px_{distinct}"
    if not (root / "transforms_test.json").is_file():
        t0 = time.perf_counter()
        tmp = root.with_name(root.name + ".tmp")
        shutil.rmtree(tmp, ignore_errors=True)
        generate_scene(tmp, SceneSpec(seed=0, n_train=distinct, n_test=args.n_test, width=args.size, height=args.size,
                                      supersample=args.supersample))
        tmp.rename(root)
        print(f"generated {distinct}+{args.n_test} views at {args.size} px in {time.perf_counter() - t0:.0f} s",
              flush=True)
    train = json.loads((root / "transforms_train.json").read_text())
    test = json.loads((root / "transforms_test.json").read_text())
    test["frames"] = [{**f, "file_path": str(root / f["file_path"]), "id_path": str(root / f["id_path"])}
                      for f in test["frames"]]
    copies = args.work / f"copies_{args.size}px_{distinct}"
    scenes = {}
    for v in sorted(set(args.views + [args.speed_views])):
        sub = args.work / f"views_{v}" if v <= distinct else args.work / f"views_{v}_of_{distinct}"
        sub.mkdir(parents=True, exist_ok=True)
        frames = []
        for i in range(v):
            f = train["frames"][i % distinct]
            image, ids = root / (f["file_path"] + ".png"), root / f["id_path"]
            if i >= distinct:  # a file of its own, so the image store decodes and keeps it like any other view
                copies.mkdir(parents=True, exist_ok=True)
                image, ids = _copy(image, copies / f"r_{i}.png"), _copy(ids, copies / f"id_{i}.png")
            frames.append({**f, "file_path": str(image), "id_path": str(ids)})
        (sub / "transforms_train.json").write_text(json.dumps({**train, "frames": frames}))
        (sub / "transforms_test.json").write_text(json.dumps(test))
        shutil.copy(root / "objects.json", sub / "objects.json")
        scenes[v] = sub
    return scenes


def _copy(src: Path, dst: Path) -> Path:
    if not dst.is_file():
        try:
            os.link(src, dst)
        except OSError:
            shutil.copy(src, dst)
    return dst


# ------------------------------------------------------------------------------------------- speed


def train_with_marks(cfg: TrainConfig, run: Path, marks: list[float], step_marks: list[int], out: Path) -> None:
    """Train (in a distributed job when started by `launch`); rank 0 evaluates the test views at the marks and writes
    what it measured to `out`."""
    with ranks.session("cpu"):
        trainer = Trainer.create(cfg, run, overwrite=True)
        test = load_eval_data(cfg, "test")
        rows, todo_t, todo_s = [], list(marks), list(step_marks)

        def evaluate(t, kind, mark):
            r = evaluate_views(t.model, test, with_lpips=False)
            rows.append({"kind": kind, "mark": mark, "step": t.step, "seconds": round(t.seconds, 2), "psnr": r["psnr"],
                         "ssim": r["ssim"]})
            print(f"  {kind} {mark}: step {t.step}, {t.seconds:.1f} s, PSNR {r['psnr']:.2f}", flush=True)

        def hook(t):
            if not ranks.is_main():
                return
            while todo_t and t.seconds >= todo_t[0]:
                evaluate(t, "seconds", todo_t.pop(0))
            while todo_s and t.step >= todo_s[0]:
                evaluate(t, "step", todo_s.pop(0))

        trainer.train(hooks=[hook])
        if ranks.is_main():
            final = evaluate_views(trainer.model, test, with_lpips=False)
            res = {"marks": rows, "final": {"step": trainer.step, "seconds": trainer.seconds, "psnr": final["psnr"],
                                            "ssim": final["ssim"]},
                   "rays_per_s": trainer.step * cfg.batch_rays / trainer.seconds,
                   "processes": ranks.world(), "threads_per_process": torch.get_num_threads(),
                   "peak_rss_bytes_max_process": json.loads(
                       (latest_checkpoint(trainer.run_dir / "checkpoints") / "meta.json").read_text())["peak_rss_bytes"]}
            out.write_text(json.dumps(res, indent=1))


def speed(args, scene: Path) -> dict:
    results = {}
    for name, nproc, threads in (("1 process x %d threads" % args.threads, 1, args.threads),
                                 ("%d processes x 1 thread" % args.threads, args.threads, 1)):
        cfg = TrainConfig(data=DataConfig(path=scene.resolve(), test_every=args.test_every), max_seconds=args.seconds,
                          threads=threads)
        if args.iterations:
            cfg.iterations = args.iterations
        run, out = args.work / "runs" / f"speed_n{nproc}", args.work / "runs" / f"speed_n{nproc}.json"
        out.parent.mkdir(parents=True, exist_ok=True)
        print(f"{name}: training", flush=True)
        if nproc == 1:
            torch.set_num_threads(threads)
            train_with_marks(cfg, run, args.marks, args.step_marks, out)
        else:
            launch(train_with_marks, nproc, cfg, run, args.marks, args.step_marks, out)
        results[name] = {**json.loads(out.read_text()), "config": to_dict(cfg)}
    return results


# ------------------------------------------------------------------------------------------- memory


def peak_rss_of(cmd: list[str], env: dict) -> tuple[int, float, int]:
    """(peak RSS bytes, wall seconds, exit code) of a child process."""
    t0 = time.perf_counter()
    p = subprocess.Popen(cmd, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    _, status, usage = os.wait4(p.pid, 0)
    p.returncode = os.waitstatus_to_exitcode(status)
    err = p.stderr.read().decode(errors="replace")
    if p.returncode != 0:
        print(err[-2000:], file=sys.stderr)
    return usage.ru_maxrss * 1024, time.perf_counter() - t0, p.returncode


def memory(args, scenes: dict[int, Path], code: Path, label: str) -> list[dict]:
    rows = []
    for v in args.views:
        store = args.work / "image_store"
        shutil.rmtree(store, ignore_errors=True)
        run = args.work / "runs" / f"rss_{label}_{v}"
        env = {**os.environ, "PYTHONPATH": str(code), "DFIELD_IMAGE_STORE": str(store), "OMP_NUM_THREADS": "1"}
        cmd = [sys.executable, "-m", "dfield.app.cli", "train", str(scenes[v]), "--out", str(run), "--overwrite",
               "--iterations", str(args.rss_iterations), "--checkpoint-every", str(args.rss_iterations), "--threads", "1",
               "--no-eval"]
        rss, wall, rc = peak_rss_of(cmd, env)
        rows.append({"code": label, "views": v, "pixels": v * args.size ** 2, "image_bytes": v * args.size ** 2 * 3,
                     "peak_rss_bytes": rss, "wall_seconds": round(wall, 1), "exit_code": rc})
        print(f"  {label}: {v} views -> peak RSS {rss / 2**20:.0f} MiB ({wall:.0f} s)", flush=True)
    return rows


# ------------------------------------------------------------------------------------------- kill and resume


def _dfield(args_: list[str], **kw) -> subprocess.CompletedProcess:
    env = {**os.environ, "PYTHONPATH": str(REPO)}
    return subprocess.run([sys.executable, "-m", "dfield", *args_], env=env, capture_output=True, text=True, **kw)


def kill_and_resume(args, scene: Path) -> dict:
    """`dfield train --nproc 2` straight, and the same run SIGKILLed (launcher and workers) once its half-way
    checkpoint is written, then `dfield resume --nproc 1` and `--nproc 2` on copies of it; test PSNR of each."""
    n = args.kill_iterations
    half = n // 2
    common = ["--iterations", str(n), "--checkpoint-every", str(half), "--log-every", "25", "--test-every",
              str(args.test_every)]
    runs = args.work / "runs" / "kill"
    shutil.rmtree(runs, ignore_errors=True)
    runs.mkdir(parents=True)
    res = {"iterations": n, "checkpoint_every": half}

    def psnr(run: Path) -> float:
        return json.loads((run / "eval.json").read_text())["psnr"]

    t0 = time.perf_counter()
    p = _dfield(["train", str(scene), "--nproc", "2", *common, "--out", str(runs / "straight")])
    assert p.returncode == 0, p.stderr[-2000:]
    res["straight"] = {"psnr": psnr(runs / "straight"), "wall_seconds": round(time.perf_counter() - t0, 1)}
    print(f"  2 processes, uninterrupted: test PSNR {res['straight']['psnr']:.2f}", flush=True)

    env = {**os.environ, "PYTHONPATH": str(REPO)}
    killed = runs / "killed"
    proc = subprocess.Popen([sys.executable, "-m", "dfield", "train", str(scene), "--nproc", "2", *common, "--out",
                             str(killed), "--no-eval"], env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
                            start_new_session=True)
    latest = killed / "checkpoints" / "latest"
    while not (latest.is_file() and latest.read_text().strip().endswith(f"{half:06d}")):
        if proc.poll() is not None:
            raise RuntimeError(f"the run to kill ended first (exit code {proc.returncode})")
        time.sleep(0.2)
    time.sleep(2.0)  # a few steps past the checkpoint: they are lost and redone
    os.killpg(proc.pid, 9)
    proc.wait()
    steps = [json.loads(line)["step"] for line in (killed / "log.jsonl").read_text().splitlines()]
    res["killed_at_logged_step"], res["resumed_from"] = max(steps), half
    print(f"  killed (SIGKILL) after logged step {max(steps)}; last checkpoint step {half}", flush=True)
    for nproc in (1, 2):
        run = Path(shutil.copytree(killed, runs / f"resumed_{nproc}"))
        p = _dfield(["resume", str(run), "--nproc", str(nproc)])
        assert p.returncode == 0, p.stderr[-2000:]
        res[f"resumed_{nproc}"] = {"psnr": psnr(run)}
        print(f"  resumed with {nproc} process{'es' if nproc > 1 else ''}: test PSNR {psnr(run):.2f}", flush=True)
    return res


# ------------------------------------------------------------------------------------------- report


def machine() -> dict:
    cpu = next((line.split(":", 1)[1].strip() for line in Path("/proc/cpuinfo").read_text().splitlines()
                if line.startswith("model name")), platform.processor()) if Path("/proc/cpuinfo").exists() else ""
    commit = subprocess.run(["git", "-C", str(REPO), "rev-parse", "--short", "HEAD"], capture_output=True, text=True).stdout.strip()
    return {"cpu": cpu, "cores": os.cpu_count(), "torch": torch.__version__, "python": platform.python_version(),
            "commit": commit}


def main(argv=None) -> None:
    args = parse_args(argv)
    args.work.mkdir(parents=True, exist_ok=True)
    os.environ.setdefault("DFIELD_IMAGE_STORE", str(args.work / "image_store"))
    scenes = make_scenes(args)
    result = {"command": " ".join([Path(sys.executable).name, *sys.argv]),
              "args": {k: str(v) if isinstance(v, Path) else v for k, v in vars(args).items()}, "machine": machine()}
    if not args.skip_speed:
        result["speed"] = speed(args, scenes[args.speed_views])
        print(f"\nSpeed and test PSNR, {args.speed_views} views at {args.size} px, test views 0, {args.test_every}, ... of "
              f"{args.n_test}:\n")
        print("| setup | rays/s | " + " | ".join(f"PSNR @{m:g} s" for m in args.marks) + " | "
              + " | ".join(f"PSNR @step {s}" for s in args.step_marks) + " | final (step, PSNR) | peak RSS / process |")
        print("|---" * (4 + len(args.marks) + len(args.step_marks)) + "|")
        for name, r in result["speed"].items():
            at = {(m["kind"], m["mark"]): m["psnr"] for m in r["marks"]}
            cells = [f"{at[('seconds', m)]:.2f}" if ("seconds", m) in at else "-" for m in args.marks]
            cells += [f"{at[('step', s)]:.2f}" if ("step", s) in at else "-" for s in args.step_marks]
            print(f"| {name} | {r['rays_per_s']:.0f} | " + " | ".join(cells)
                  + f" | {r['final']['step']}, {r['final']['psnr']:.2f} | {r['peak_rss_bytes_max_process'] / 2**30:.2f} GiB |")
    if args.kill_iterations:
        print(f"\nKilled and resumed, {args.speed_views} views, {args.kill_iterations} steps:", flush=True)
        result["kill"] = kill_and_resume(args, scenes[args.speed_views])
    if not args.skip_rss:
        print("\nPeak RSS against training views:", flush=True)
        result["memory"] = [] if args.baseline_only else memory(args, scenes, REPO, "this")
        if args.baseline_code:
            result["memory"] += memory(args, scenes, args.baseline_code.resolve(), "baseline")
        print(f"\n| views ({args.size} px) | image bytes | peak RSS | vs {args.views[0]} views |")
        print("|---|---|---|---|")
        for label in ("this", "baseline"):
            rows = [r for r in result["memory"] if r["code"] == label]
            for r in rows if rows and rows[0]["exit_code"] == 0 else []:
                print(f"| {r['views']} ({label}) | {r['image_bytes'] / 2**20:.0f} MiB | {r['peak_rss_bytes'] / 2**20:.0f} MiB | "
                      f"{r['peak_rss_bytes'] / rows[0]['peak_rss_bytes']:.2f}x |")
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(result, indent=1))
    print(f"\nwrote {args.out}")


if __name__ == "__main__":
    main()
