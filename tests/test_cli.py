"""The `dfield` command, in-process through `dfield.app.cli.main`: the happy path on a tiny generated scene, and
bad input that must end in exit code 2, one line on stderr naming the file, and no half-made run folder."""

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from dfield.app.cli import main

torch.set_num_threads(1)

SCENE_FLAGS = ["--width", "16", "--height", "16", "--n-train", "6", "--n-test", "2", "--supersample", "1"]
TINY = ["--iterations", "20", "--batch-rays", "128", "--grid.voxels-init", "512", "--grid.voxels-final", "4096",
        "--grid.upsample-steps", "10", "--grid.occupancy-start", "5", "--grid.occupancy-every", "5",
        "--grid.shrink-step", "10", "--checkpoint-every", "10", "--log-every", "5", "--threads", "1"]


@pytest.fixture(scope="module")
def cli_run(tmp_path_factory):
    """generate-scene + train (no eval) through the CLI; returns (scene, run)."""
    root = tmp_path_factory.mktemp("cli")
    scene, run = root / "scene", root / "run"
    assert main(["generate-scene", str(scene), *SCENE_FLAGS]) == 0
    assert main(["train", str(scene), "--out", str(run), *TINY, "--no-eval"]) == 0
    return scene, run


def _fails(argv, capsys, *names, after_progress=False):
    """Run the CLI expecting a user error: exit 2 and one line on stderr naming each of `names`.

    `after_progress`: the error comes once training has started, so progress lines may precede it.
    """
    capsys.readouterr()
    assert main([str(a) for a in argv]) == 2
    lines = capsys.readouterr().err.strip().splitlines()
    if after_progress:
        assert [i for i, line in enumerate(lines) if line.startswith("dfield: ")] == [len(lines) - 1], lines
        lines = lines[-1:]
    assert len(lines) == 1 and lines[0].startswith("dfield: "), lines
    for name in names:
        assert str(name) in lines[0], lines
    return lines[0]


def _snapshot(folder: Path) -> dict:
    return {str(p.relative_to(folder)): p.read_bytes() for p in sorted(folder.rglob("*")) if p.is_file()}


# ------------------------------------------------------------------------------ the happy path


def test_generate_scene(tmp_path, capsys):
    assert main(["generate-scene", str(tmp_path / "s"), *SCENE_FLAGS, "--n-objects", "2", "--seed", "4"]) == 0
    assert "wrote scene" in capsys.readouterr().out
    meta = json.loads((tmp_path / "s" / "transforms_train.json").read_text())
    assert len(meta["frames"]) == 6
    assert len(json.loads((tmp_path / "s" / "transforms_test.json").read_text())["frames"]) == 2
    assert Image.open(tmp_path / "s" / "train" / "r_5.png").size == (16, 16)
    assert json.loads((tmp_path / "s" / "objects.json").read_text())["spec"]["seed"] == 4


def test_train_writes_a_run(cli_run):
    scene, run = cli_run
    cfg = json.loads((run / "config.json").read_text())
    assert cfg["iterations"] == 20 and cfg["batch_rays"] == 128 and cfg["data"]["path"] == str(scene)
    assert cfg["grid"]["voxels_init"] == 512 and cfg["grid"]["upsample_steps"] == [10] and cfg["grid"]["shrink_step"] == 10
    assert (run / "scene.json").is_file()
    assert (run / "checkpoints" / "latest").read_text() == "step_000020"
    assert {p.name for p in (run / "checkpoints").iterdir()} == {"latest", "step_000010", "step_000020"}
    assert [json.loads(line)["step"] for line in (run / "log.jsonl").read_text().splitlines()] == [5, 10, 15, 20]
    assert not (run / "eval.json").exists()  # --no-eval


def test_eval(cli_run, capsys):
    _, run = cli_run
    assert main(["eval", str(run)]) == 0
    out = capsys.readouterr().out
    assert "PSNR" in out and "eval.json" in out
    res = json.loads((run / "eval.json").read_text())
    assert res["views"] == 2 and np.isfinite(res["psnr"]) and np.isfinite(res["ssim"]) and res["step"] == 20


def test_render_test_views(cli_run, tmp_path):
    _, run = cli_run
    assert main(["render", str(run), "--path", "test", "--no-video"]) == 0
    out = run / "renders" / "test"
    assert sorted(p.name for p in out.iterdir()) == ["depth_000.png", "depth_001.png", "rgb_000.png", "rgb_001.png"]
    assert Image.open(out / "rgb_001.png").size == (16, 16)


def test_render_orbit(cli_run, tmp_path):
    _, run = cli_run
    assert main(["render", str(run), "--path", "orbit", "--frames", "3", "--out", str(tmp_path / "orbit")]) == 0
    names = sorted(p.name for p in (tmp_path / "orbit").iterdir())
    assert names == ["depth.mp4", "depth_000.png", "depth_001.png", "depth_002.png",
                     "rgb.mp4", "rgb_000.png", "rgb_001.png", "rgb_002.png"]
    assert (tmp_path / "orbit" / "rgb.mp4").stat().st_size > 0


def test_train_resume_and_resume_command(cli_run, tmp_path, capsys):
    scene, run = cli_run
    run = Path(shutil.copytree(run, tmp_path / "run"))
    # As if killed between steps 10 and 20.
    shutil.rmtree(run / "checkpoints" / "step_000020")
    (run / "checkpoints" / "latest").write_text("step_000010")
    assert main(["train", str(scene), "--out", str(run), "--resume", "--iterations", "20"]) == 0
    assert "resuming" in capsys.readouterr().err
    assert (run / "checkpoints" / "latest").read_text() == "step_000020"
    assert json.loads((run / "eval.json").read_text())["step"] == 20  # evaluation ran at the end
    assert main(["resume", str(run), "--iterations", "25", "--no-eval"]) == 0
    assert (run / "checkpoints" / "latest").read_text() == "step_000025"


def test_train_resume_keeps_the_saved_iteration_count(cli_run, monkeypatch):
    """`train --resume` without --iterations continues to the run's own count ("its saved config wins"),
    not to the command line's default of 3000."""
    from dfield.training.trainer import Trainer

    seen = {}
    monkeypatch.setattr(Trainer, "train", lambda self, hooks=(), progress=True: seen.update(iterations=self.cfg.iterations))
    scene, run = cli_run
    assert main(["train", str(scene), "--out", str(run), "--resume", "--no-eval"]) == 0
    assert seen == {"iterations": 20}


def test_train_overwrite_starts_over(cli_run, tmp_path):
    scene, run = cli_run
    run = Path(shutil.copytree(run, tmp_path / "run"))
    tiny10 = [*TINY[:1], "10", *TINY[2:]]
    assert main(["train", str(scene), "--out", str(run), *tiny10, "--overwrite", "--no-eval"]) == 0
    assert {p.name for p in (run / "checkpoints").iterdir()} == {"latest", "step_000010"}
    assert [json.loads(line)["step"] for line in (run / "log.jsonl").read_text().splitlines()] == [5, 10]
    assert json.loads((run / "config.json").read_text())["iterations"] == 10


# ------------------------------------------------------------------------------ user errors


def _missing(tmp_path, make_blender):
    return tmp_path / "nothere", "nothere"


def _empty(tmp_path, make_blender):
    (tmp_path / "empty").mkdir()
    return tmp_path / "empty", tmp_path / "empty"


def _corrupt_png(tmp_path, make_blender):
    root = make_blender()
    (root / "train" / "r_1.png").write_bytes(np.random.default_rng(0).bytes(300))
    return root, "r_1.png"


def _matrix_3x3(tmp_path, make_blender):
    root = make_blender()
    meta = json.loads((root / "transforms_train.json").read_text())
    meta["frames"][1]["transform_matrix"] = np.eye(3).tolist()
    (root / "transforms_train.json").write_text(json.dumps(meta))
    return root, "transforms_train.json"


def _corrupt_test_png(tmp_path, make_blender):
    """Only a held-out image is broken: found before training, not after it (evaluation is on by default)."""
    root = make_blender()
    (root / "test" / "r_0.png").write_bytes(b"\x89PNG\r\n\x1a\n" + bytes(40))
    return root, "r_0.png"


def test_a_schedule_that_ends_well_inside_the_budget_says_so(cli_run, tmp_path, capsys):
    scene, _ = cli_run
    tiny10 = [*TINY[:1], "10", *TINY[2:]]
    assert main(["train", str(scene), "--out", str(tmp_path / "run"), *tiny10, "--max-seconds", "600", "--no-eval"]) == 0
    out = capsys.readouterr().err  # dfield's messages go to stderr, results to stdout
    assert "schedule ended at" in out and "of the 600 s budget" in out and "--iterations" in out
    assert main(["train", str(scene), "--out", str(tmp_path / "run2"), *tiny10, "--no-eval"]) == 0
    assert "budget" not in capsys.readouterr().err  # no budget given: nothing to say


@pytest.mark.parametrize("make_scene", [
    _missing, _empty, _corrupt_png, _matrix_3x3, _corrupt_test_png,
])
def test_train_on_bad_data_fails_cleanly(make_scene, tmp_path, make_blender, capsys):
    scene, name = make_scene(tmp_path, make_blender)
    out = tmp_path / "runs" / "bad"
    err = _fails(["train", scene, "--out", out, *TINY], capsys, name)
    assert "bad data" in err
    assert not out.exists() and not (tmp_path / "runs").exists()


def test_eval_on_a_folder_that_is_not_a_run(cli_run, tmp_path, capsys):
    scene, _ = cli_run
    err = _fails(["eval", scene], capsys, scene, "config.json")
    assert "not a dfield run folder" in err
    _fails(["eval", tmp_path / "nowhere"], capsys, tmp_path / "nowhere")
    _fails(["render", scene], capsys, scene)
    assert not (scene / "eval.json").exists() and not (scene / "renders").exists()


def test_train_into_an_existing_run_needs_resume_or_overwrite(cli_run, capsys):
    scene, run = cli_run
    before = _snapshot(run)
    err = _fails(["train", scene, "--out", run, *TINY, "--no-eval"], capsys, run)
    assert "--resume" in err and "--overwrite" in err
    assert _snapshot(run) == before


def test_divergence_is_a_one_line_error(cli_run, tmp_path, capsys, monkeypatch):
    from dfield.models.grid import GridModel

    render = GridModel.render_rays

    def nan_render(self, rays, generator=None, features=False):
        out = render(self, rays, generator)
        return {**out, "rgb": out["rgb"] * float("nan")}

    monkeypatch.setattr(GridModel, "render_rays", nan_render)
    scene, _ = cli_run
    out = tmp_path / "run"
    err = _fails(["train", scene, "--out", out, *TINY], capsys, out / "checkpoints", "step 0", after_progress=True)
    assert "training diverged" in err
    assert not (out / "checkpoints").exists()


def test_help_from_a_subprocess():
    script = Path(sys.executable).parent / "dfield"
    cmd = [str(script)] if script.is_file() else [sys.executable, "-m", "dfield.app.cli"]
    env = {**os.environ, "OMP_NUM_THREADS": "1", "COLUMNS": "100"}
    res = subprocess.run([*cmd, "--help"], capture_output=True, text=True, timeout=120, env=env)
    assert res.returncode == 0, res.stderr
    for sub in ("train", "resume", "eval", "render", "generate-scene"):
        assert sub in res.stdout
