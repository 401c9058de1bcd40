"""`dfield distill`: features added to a trained run are saved into it and come back through open_run, the
radiance field stays bit for bit, resume keeps working, and bad input fails before anything is written."""

from __future__ import annotations

import json
import os
import shutil
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from dfield.app import api
from dfield.app.cli import main
from dfield.core.rays import image_rays
from dfield.data import load_dataset
from dfield.features.distill import distill
from dfield.fields.lifted import LiftedFeatures
from dfield.io.checkpoint import latest_checkpoint
from dfield.io.run import open_run
from dfield.training.trainer import Trainer

FAST = dict(iterations=4, batch_rays=128, dim=8)
LIFT = dict(method="lift", lift_voxels=12**3, batch_rays=128)
FEATURE_KEYS = ("field.feature", "decoder", "extra.lifted")


@pytest.fixture(scope="module")
def base_run(tiny_scene, tiny_train_config, tmp_path_factory):
    """A radiance-only run of 80 steps, enough for opaque pixels in the test views (read-only: tests copy it)."""
    run = tmp_path_factory.mktemp("distill") / "run"
    Trainer.create(tiny_train_config(tiny_scene, iterations=80), run).train()
    return run


@pytest.fixture(autouse=True)
def _feature_cache(tmp_path_factory, monkeypatch):
    """Teacher maps go to a test cache, never the user's."""
    monkeypatch.setenv("DFIELD_CACHE_DIR", str(tmp_path_factory.getbasetemp() / "dfield_cache"))


@pytest.fixture
def run(base_run, tmp_path):
    dst = tmp_path / "run"
    shutil.copytree(base_run, dst)
    return dst


def _features(model, scene) -> torch.Tensor:
    data = load_dataset(scene, "train")
    with torch.no_grad():
        out = model.render_chunked(image_rays(data, 1), features=True)
        return model.decode(out["feature"])


def _tensors(run: Path) -> dict[str, torch.Tensor]:
    return load_file(str(latest_checkpoint(run / "checkpoints") / "model.safetensors"))


def _snapshot(folder: Path) -> dict:
    return {str(p.relative_to(folder)): p.read_bytes() for p in sorted(folder.rglob("*")) if p.is_file()}


# ------------------------------------------------------------------------------ saved and reloaded


def test_fit_round_trips_and_leaves_radiance_untouched(run, tiny_scene):
    before = _tensors(run)
    d = distill(run, "synthetic", **FAST)
    r = open_run(run)
    assert torch.equal(_features(d.model, tiny_scene), _features(r.model, tiny_scene))
    assert _features(r.model, tiny_scene).shape[-1] == 32  # decoded to the synthetic teacher's width
    after = _tensors(run)
    for k, v in before.items():
        if not k.startswith(FEATURE_KEYS):
            assert torch.equal(after[k], v), k
    assert {k for k in after if k.startswith(FEATURE_KEYS)} == {
        "field.feature_vol.planes", "field.feature_vol.lines", "field.feature_basis.weight", "decoder.weight", "decoder.bias"}
    f = json.loads((run / "config.json").read_text())["features"]
    assert (f["teacher"], f["dim"], f["teacher_dim"], f["method"]) == ("synthetic", 8, 32, "fit")
    summary = json.loads((run / "distill.json").read_text())
    assert summary["method"] == "fit" and summary["iterations"] == 4 and summary["peak_rss_bytes"] > 0
    assert summary["seconds"] > 0 and summary["loss"] > 0
    # The same step replaced in place: nothing displaced left behind, the older checkpoint kept.
    assert sorted(p.name for p in (run / "checkpoints").iterdir()) == ["latest", "step_000070", "step_000080"]
    assert r.step == 80


def test_lift_round_trips_in_teacher_space(run, tiny_scene):
    d = distill(run, "synthetic", **LIFT)
    r = open_run(run)
    assert isinstance(r.model.lifted, LiftedFeatures) and r.model.decoder is None
    assert torch.equal(_features(d.model, tiny_scene), _features(r.model, tiny_scene))
    saved = _tensors(run)
    assert saved["extra.lifted.grid"].dtype == torch.float16
    assert not any(k.startswith(("field.feature", "decoder")) for k in saved)
    f = json.loads((run / "config.json").read_text())["features"]
    assert (f["teacher"], f["dim"], f["teacher_dim"], f["method"]) == ("synthetic", 0, 32, "lift")
    summary = json.loads((run / "distill.json").read_text())
    assert summary["lift_cells"] == int((r.model.lifted.rows > 0).sum()) > 0
    assert summary["lift_dims"] == r.model.feature_dim <= 32 and r.model.lifted.teacher_dim == 32
    assert r.model.decode(torch.zeros(2, r.model.feature_dim)).shape == (2, 32)  # queries compare in teacher space


def test_switching_methods_replaces_the_features(run, tiny_scene):
    distill(run, "synthetic", **LIFT)
    distill(run, "synthetic", **FAST)
    r = open_run(run)
    assert r.model.lifted is None and r.model.decoder is not None
    assert not any(k.startswith("extra.lifted") for k in _tensors(run))
    distill(run, "synthetic", **LIFT)
    assert open_run(run).model.decoder is None


def test_a_joint_run_can_be_distilled_again(run, tiny_scene):
    api.resume(run, iterations=85, evaluate=False)  # a few more radiance steps first
    distill(run, "synthetic", **FAST)
    api.resume(run, iterations=90, evaluate=False)  # now joint: features keep training
    d = distill(run, "synthetic:noise=0.1", **FAST)
    assert d.summary["step"] == 90
    assert open_run(run).cfg.features.teacher == "synthetic:noise=0.1"


# ------------------------------------------------------------------------------ resume afterwards


def test_resume_after_fit_trains_on_jointly(run):
    old = load_file(str(latest_checkpoint(run / "checkpoints") / "trainer.safetensors"))
    distill(run, "synthetic", **FAST)
    new = load_file(str(latest_checkpoint(run / "checkpoints") / "trainer.safetensors"))
    # Radiance Adam moments carried over (density planes are the optimiser's first parameter).
    assert torch.equal(new["optim.0.exp_avg"], old["optim.0.exp_avg"])
    api.resume(run, iterations=90, evaluate=False)
    r = open_run(run)
    assert r.step == 90 and r.model.decoder is not None and r.cfg.features.method == "fit"
    last = json.loads((run / "log.jsonl").read_text().splitlines()[-1])
    assert last["step"] == 90 and "feature_loss" in last


def test_resume_after_lift_keeps_the_lifted_grid(run, capsys):
    distill(run, "synthetic", **LIFT)
    grid = open_run(run).model.lifted.grid
    api.resume(run, iterations=90, evaluate=False)
    assert "--method lift" in capsys.readouterr().err  # says how to lift again from the refined field
    r = open_run(run)
    assert r.step == 90 and torch.equal(r.model.lifted.grid, grid)
    last = json.loads((run / "log.jsonl").read_text().splitlines()[-1])
    assert "feature_loss" not in last  # nothing to fit: the grid is data, not parameters


# ------------------------------------------------------------------------------ never lose work


def test_kill_between_checkpoint_and_config_leaves_a_working_run(run, monkeypatch, tiny_scene):
    import dfield.features.distill

    def killed(*a, **kw):
        raise KeyboardInterrupt

    with monkeypatch.context() as m:
        m.setattr(dfield.features.distill, "save_config", killed)
        with pytest.raises(KeyboardInterrupt):
            distill(run, "synthetic", **FAST)
    assert json.loads((run / "config.json").read_text())["features"]["teacher"] == ""  # config not reached
    r = open_run(run)  # the checkpoint's feature settings win
    assert r.cfg.features.method == "fit" and _features(r.model, tiny_scene).shape[-1] == 32
    api.resume(run, iterations=85, evaluate=False)  # and resume repairs config.json
    assert json.loads((run / "config.json").read_text())["features"]["method"] == "fit"


def test_kill_while_replacing_the_checkpoint_keeps_the_old_one(run, monkeypatch):
    real = os.replace

    def killed_before_publish(src, dst):
        if Path(src).name.startswith(".step_"):
            raise KeyboardInterrupt
        return real(src, dst)

    with monkeypatch.context() as m:
        m.setattr(os, "replace", killed_before_publish)
        with pytest.raises(KeyboardInterrupt):
            distill(run, "synthetic", **FAST)
    r = open_run(run)  # found under its displaced name
    assert r.step == 80 and r.model.decoder is None
    distill(run, "synthetic", **FAST)  # a second try cleans up
    assert sorted(p.name for p in (run / "checkpoints").iterdir()) == ["latest", "step_000070", "step_000080"]


# ------------------------------------------------------------------------------ the command


def test_cli_distill_then_eval_and_render(run, capsys):
    argv = ["distill", str(run), "--teacher", "synthetic", "--iterations", "3", "--batch-rays", "64", "--dim", "4", "--threads", "1"]
    assert main(argv) == 0
    out = capsys.readouterr().out
    assert f"dfield render {run} --mode features" in out and f"dfield eval {run}" in out and "loss" in out
    assert main(["eval", str(run)]) == 0
    assert "3D segmentation" in capsys.readouterr().out
    assert main(["render", str(run), "--mode", "features", "--no-video", "--no-depth"]) == 0
    assert (run / "renders" / "test" / "features_000.png").is_file()


def _fails(argv, capsys, *names):
    capsys.readouterr()
    assert main([str(a) for a in argv]) == 2
    lines = capsys.readouterr().err.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("dfield: "), lines
    for name in names:
        assert str(name) in lines[0], lines


def test_cli_bad_input_writes_nothing(run, tmp_path, capsys):
    missing = tmp_path / "nope"
    _fails(["distill", missing, "--teacher", "synthetic"], capsys, missing)
    assert not missing.exists()

    untrained = tmp_path / "untrained"
    untrained.mkdir()
    shutil.copy(run / "config.json", untrained)
    shutil.copy(run / "scene.json", untrained)
    _fails(["distill", untrained, "--teacher", "synthetic"], capsys, "no checkpoint")

    before = _snapshot(run)
    _fails(["distill", run, "--teacher", "bogus"], capsys, "unknown teacher", "bogus")
    _fails(["distill", run, "--teacher", "synthetic", "--iterations", "0"], capsys, "--iterations")
    original = (run / "config.json").read_text()
    cfg = json.loads(original)
    moved = {**cfg, "data": {**cfg["data"], "path": str(tmp_path / "moved_scene")}}
    (run / "config.json").write_text(json.dumps(moved))
    _fails(["distill", run, "--teacher", "synthetic"], capsys, "moved_scene")
    (run / "config.json").write_text(json.dumps({**cfg, "model": "nerf"}))
    _fails(["distill", run, "--teacher", "synthetic"], capsys, "grid model")
    (run / "config.json").write_text(original)
    assert _snapshot(run) == before
