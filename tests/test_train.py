"""The trainer on a tiny generated scene: it learns, writes a complete run folder, resumes bit-for-bit,
survives a kill mid-checkpoint, refuses to diverge silently, and respects its time budget."""

import json
import math
import os
import shutil
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from dfield.config import TrainConfig, to_dict
from dfield.errors import TrainingDiverged
from dfield.io.checkpoint import latest_checkpoint
from dfield.io.run import SceneInfo, build_model, load_config, load_eval_data, open_run
from dfield.models.nerf import NeRFModelConfig
from dfield.training.evaluate import evaluate_run, evaluate_views
from dfield.training.trainer import Trainer

torch.set_num_threads(1)


class _Killed(Exception):
    """Stands in for a kill: raised from a hook, after the step (and any checkpoint) it follows."""


def _kill_at(step):
    def hook(trainer):
        if trainer.step == step:
            raise _Killed

    return hook


def _checkpoint_tensors(run_dir, name=None):
    ckpt = Path(run_dir) / "checkpoints" / name if name else latest_checkpoint(Path(run_dir) / "checkpoints")
    meta = json.loads((ckpt / "meta.json").read_text())
    return load_file(str(ckpt / "model.safetensors")), load_file(str(ckpt / "trainer.safetensors")), meta


def _assert_same_tensors(a: dict, b: dict):
    assert sorted(a) == sorted(b)
    differ = {k: (a[k] - b[k]).abs().max().item() if a[k].shape == b[k].shape and a[k].is_floating_point() else "shape/dtype"
              for k in a if not (a[k].shape == b[k].shape and torch.equal(a[k], b[k]))}
    assert not differ, f"tensors differ (max abs difference): {differ}"


def _snapshot(folder: Path) -> dict:
    return {str(p.relative_to(folder)): p.read_bytes() for p in sorted(folder.rglob("*")) if p.is_file()}


@pytest.fixture(scope="module")
def trained_run(tiny_scene, tiny_train_config, tmp_path_factory):
    """40 steps straight through: occupancy from step 5, upsamples at 10 and 20, shrink at 15."""
    run = tmp_path_factory.mktemp("trained") / "run"
    trainer = Trainer.create(tiny_train_config(tiny_scene), run)
    trainer.train()
    assert trainer.step == 40
    return run


@pytest.fixture
def run_copy(trained_run, tmp_path):
    """A private copy of the trained run, for tests that change it."""
    return Path(shutil.copytree(trained_run, tmp_path / "run"))


# ------------------------------------------------------------------------------ a run folder


def test_training_lowers_the_loss_and_writes_a_complete_run(trained_run, tiny_scene, tiny_train_config):
    log = [json.loads(line) for line in (trained_run / "log.jsonl").read_text().splitlines()]
    assert [r["step"] for r in log] == list(range(5, 41, 5))
    assert all(math.isfinite(r["loss"]) and math.isfinite(r["psnr"]) and r["rays_per_s"] > 0 for r in log)
    first, last = sum(r["loss"] for r in log[:2]) / 2, sum(r["loss"] for r in log[-2:]) / 2
    assert last < 0.85 * first, [r["loss"] for r in log]

    expected = tiny_train_config(tiny_scene)
    expected.features.smooth = ""  # "auto" is recorded resolved; without a teacher there is nothing to smooth
    expected.data.scene_type = "object"  # so is the scene type
    assert to_dict(load_config(trained_run / "config.json")) == to_dict(expected)
    scene = SceneInfo.load(trained_run / "scene.json")
    assert (scene.width, scene.height, len(scene.train_c2w)) == (20, 20, 8)
    assert scene.aabb == [[-1.5] * 3, [1.5] * 3] and 0 < scene.near < scene.far

    ckpts = trained_run / "checkpoints"
    assert (ckpts / "latest").read_text().strip() == "step_000040"
    assert sorted(p.name for p in ckpts.iterdir()) == ["latest", "step_000030", "step_000040"]  # two kept, no temporaries
    for name in ("step_000030", "step_000040"):
        assert sorted(p.name for p in (ckpts / name).iterdir()) == ["meta.json", "model.safetensors", "trainer.safetensors"]
    model, trainer_t, meta = _checkpoint_tensors(trained_run)
    assert meta["step"] == 40 and meta["seconds"] > 0
    assert meta["structure"]["shrunk"] and meta["structure"]["has_occupancy"]
    assert meta["structure"]["res"] == [16, 16, 16]
    assert "extra.occupancy.occupied" in model and "rng.batcher" in trainer_t and "batcher.pool" in trainer_t
    assert all(torch.isfinite(v).all() for v in model.values() if v.is_floating_point())


# ------------------------------------------------------------------------------ resume


@pytest.mark.parametrize("kill_at", [13, 27])
def test_resume_after_a_kill_matches_a_straight_run(trained_run, tiny_scene, tiny_train_config, tmp_path, kill_at):
    """Killed at 13 (resumes from 10, before the shrink) or 27 (from 20, after it, before the second upsample)."""
    run = tmp_path / "run"
    with pytest.raises(_Killed):
        Trainer.create(tiny_train_config(tiny_scene), run).train(hooks=[_kill_at(kill_at)])
    trainer = Trainer.resume(run)
    assert trainer.step == kill_at // 10 * 10
    trainer.train()
    assert trainer.step == 40

    a_model, a_trainer, a_meta = _checkpoint_tensors(trained_run, "step_000040")
    b_model, b_trainer, b_meta = _checkpoint_tensors(run, "step_000040")
    _assert_same_tensors(b_model, a_model)  # weights, and the occupancy grid
    _assert_same_tensors(b_trainer, a_trainer)  # optimiser moments, RNG states, ray pool
    assert b_meta["structure"] == a_meta["structure"] and b_meta["optimizer_groups"] == a_meta["optimizer_groups"]


def test_stop_then_resume_with_more_iterations_matches_a_straight_run(tiny_scene, tiny_train_config, tmp_path):
    """Train to 20, then `resume(iterations=40)`: the same as 40 straight when the learning rate is constant.

    (With the default decay the two differ by design: the schedule is a function of `iterations`, so the
    first 20 steps of a 20-step run decay further than the first 20 of a 40-step one.)
    """
    straight = Trainer.create(tiny_train_config(tiny_scene, lr_final_ratio=1.0), tmp_path / "a")
    straight.train()
    stopped = Trainer.create(tiny_train_config(tiny_scene, lr_final_ratio=1.0, iterations=20), tmp_path / "b")
    stopped.train()
    assert latest_checkpoint(tmp_path / "b" / "checkpoints").name == "step_000020"
    resumed = Trainer.resume(tmp_path / "b", iterations=40)
    assert resumed.step == 20
    resumed.train()
    a_model, a_trainer, _ = _checkpoint_tensors(tmp_path / "a")
    b_model, b_trainer, _ = _checkpoint_tensors(tmp_path / "b")
    _assert_same_tensors(b_model, a_model)
    _assert_same_tensors(b_trainer, a_trainer)


def test_nerf_model_trains_and_resumes(tiny_scene, tiny_train_config, tmp_path):
    def cfg():
        return tiny_train_config(tiny_scene, model="nerf", iterations=4, batch_rays=32, checkpoint_every=2, log_every=1,
                                 nerf=NeRFModelConfig(depth=2, width=16, n_coarse=8, n_fine=8))

    Trainer.create(cfg(), tmp_path / "a").train()
    with pytest.raises(_Killed):
        Trainer.create(cfg(), tmp_path / "b").train(hooks=[_kill_at(3)])
    trainer = Trainer.resume(tmp_path / "b")
    assert trainer.step == 2
    trainer.train()
    a_model, a_trainer, _ = _checkpoint_tensors(tmp_path / "a")
    b_model, b_trainer, _ = _checkpoint_tensors(tmp_path / "b")
    _assert_same_tensors(b_model, a_model)
    _assert_same_tensors(b_trainer, a_trainer)
    assert open_run(tmp_path / "b").step == 4


def test_a_longer_run_survives_a_second_kill(run_copy):
    """`resume(iterations=45)`, killed at 43: a plain resume afterwards still trains to 45, not the saved 40."""
    with pytest.raises(_Killed):
        Trainer.resume(run_copy, iterations=45).train(hooks=[_kill_at(43)])
    trainer = Trainer.resume(run_copy)
    assert trainer.step == 40
    assert trainer.cfg.iterations == 45


# ------------------------------------------------------------------------------ failures


@pytest.mark.parametrize("with_pointer", [True, False])
def test_a_kill_mid_checkpoint_leaves_a_usable_run(run_copy, with_pointer):
    ckpts = run_copy / "checkpoints"
    # What a kill while writing step 50 leaves: a temporary folder holding a partial model file.
    stray = ckpts / ".step_000050.tmp424242"
    stray.mkdir()
    (stray / "model.safetensors").write_bytes((ckpts / "step_000040" / "model.safetensors").read_bytes()[:1000])
    (ckpts / ".latest.tmp424242").write_text("step_0000")  # and a half-written pointer
    if not with_pointer:
        (ckpts / "latest").unlink()
    assert latest_checkpoint(ckpts) == ckpts / "step_000040"
    assert open_run(run_copy).step == 40

    trainer = Trainer.resume(run_copy, iterations=45)
    assert trainer.step == 40
    trainer.train()
    assert latest_checkpoint(ckpts) == ckpts / "step_000045"
    assert (ckpts / "latest").read_text() == "step_000045"
    assert open_run(run_copy).step == 45


def test_a_kill_inside_save_leaves_a_usable_run(run_copy, monkeypatch):
    """A real kill point: step 50's weights are on disk in the temporary folder, its optimiser state is not."""
    import dfield.io.checkpoint

    real_save = dfield.io.checkpoint.save_file

    def save_then_die(tensors, path):
        if ".step_000050.tmp" in path and path.endswith("trainer.safetensors"):
            raise _Killed
        real_save(tensors, path)

    monkeypatch.setattr(dfield.io.checkpoint, "save_file", save_then_die)
    ckpts = run_copy / "checkpoints"
    with pytest.raises(_Killed):
        Trainer.resume(run_copy, iterations=60).train()
    assert [p.name for p in ckpts.glob(".step_000050.tmp*")] == [f".step_000050.tmp{os.getpid()}"]
    assert latest_checkpoint(ckpts) == ckpts / "step_000040"

    monkeypatch.setattr(dfield.io.checkpoint, "save_file", real_save)
    trainer = Trainer.resume(run_copy, iterations=50)
    assert trainer.step == 40
    trainer.train()
    assert latest_checkpoint(ckpts) == ckpts / "step_000050"
    assert not list(ckpts.glob(".step_*"))  # the same process rewrote and published it


def test_nan_guard_stops_and_keeps_the_last_good_checkpoint(run_copy):
    ckpts = run_copy / "checkpoints"
    trainer = Trainer.resume(run_copy, iterations=60)
    before = _snapshot(ckpts)
    render = trainer.model.render_rays

    def poisoned(rays, generator=None, features=False):
        out = render(rays, generator)
        if trainer.step == 44:
            out = {**out, "rgb": out["rgb"] * float("nan")}
        return out

    trainer.model.render_rays = poisoned
    with pytest.raises(TrainingDiverged) as err:
        trainer.train()
    msg = str(err.value)
    assert "step 44" in msg and str(ckpts) in msg and "nan" in msg.lower()
    assert trainer.step == 44
    assert _snapshot(ckpts) == before  # no checkpoint of the diverged state, nothing touched
    assert latest_checkpoint(ckpts) == ckpts / "step_000040"
    assert Trainer.resume(run_copy).step == 40


def test_max_seconds_stops_early_and_checkpoints(tiny_scene, tiny_train_config, tmp_path):
    cfg = tiny_train_config(tiny_scene, iterations=100_000, max_seconds=0.5, checkpoint_every=100_000, log_every=100_000)
    trainer = Trainer.create(cfg, tmp_path / "run")
    trainer.train()
    assert 0 < trainer.step < 100_000 and trainer.seconds >= 0.5
    ckpt = latest_checkpoint(tmp_path / "run" / "checkpoints")
    assert ckpt is not None and ckpt.name == f"step_{trainer.step:06d}"
    meta = json.loads((ckpt / "meta.json").read_text())
    assert meta["step"] == trainer.step and meta["seconds"] == pytest.approx(trainer.seconds, abs=0.5)
    assert Trainer.resume(tmp_path / "run").step == trainer.step
    assert trainer.budget_plan is None and trainer.budget_plan_text() is None  # --iterations set: the budget only stops


def test_schedule_fitted_to_the_time_budget(tiny_scene, tiny_train_config, tmp_path, monkeypatch):
    import dfield.training.trainer as trainer_module

    monkeypatch.setattr(trainer_module, "BUDGET_WINDOW", 20)
    cfg = tiny_train_config(tiny_scene, iterations=TrainConfig.iterations, max_seconds=6.0, log_every=100_000)
    trainer = Trainer.create(cfg, tmp_path / "run")
    moves, state = [], {"anchor": (0, 0.0), "n": TrainConfig.iterations}

    def fraction(anchor, n, step):  # the decay of the schedule as it was before a move
        k0, f0 = anchor
        return step / n if k0 == 0 else f0 + (1 - f0) * (step - k0) / (n - k0)

    def watch(t: Trainer) -> None:
        if t.cfg.lr_anchor != state["anchor"]:  # moved at this step: record the old schedule's fraction here
            k0, f0 = t.cfg.lr_anchor
            moves.append((k0, f0, t.cfg.iterations, fraction(state["anchor"], state["n"], k0)))
        state.update(anchor=t.cfg.lr_anchor, n=t.cfg.iterations)

    trainer.train(hooks=[watch])
    plan = trainer.budget_plan
    # Timed from 50 steps after the last reshape (upsample at 20), for 20 steps, then again every 20 steps.
    assert plan is not None and plan["first_step"] == 90 and plan["iterations_before"] == TrainConfig.iterations
    assert moves[0][:2] == (90, pytest.approx(90 / TrainConfig.iterations))
    assert all(b[0] - a[0] == 20 for a, b in zip(moves, moves[1:]))
    for k0, f0, n, before in moves:  # each move goes on with the decay from where the old schedule had it: no jump
        assert f0 == pytest.approx(before) and n > k0
    n = trainer.cfg.iterations
    assert f"{TrainConfig.iterations} -> {n} steps" in trainer.budget_plan_text()
    assert trainer.lr_fraction(n) == 1.0 and trainer.lr_fraction(plan["step"]) < trainer.lr_fraction(plan["step"] + 1)
    # It stopped at the fitted end (or, on a machine slower than it timed, at the budget).
    assert trainer.step == n or trainer.seconds >= 6.0
    saved = load_config(tmp_path / "run" / "config.json")
    assert saved.iterations == n and saved.lr_anchor == trainer.cfg.lr_anchor
    resumed = Trainer.resume(tmp_path / "run")  # continues the fitted schedule
    assert resumed.cfg.iterations == n and resumed.lr_fraction(n - 1) == trainer.lr_fraction(n - 1)
    assert resumed._budget_timing_start() is not None
    asked = Trainer.resume(tmp_path / "run", iterations=n + 100)  # steps of one's own: no longer moved
    assert asked._budget_timing_start() is None and asked.lr_fraction(n + 100) == 1.0
    assert asked.lr_fraction(plan["step"]) == pytest.approx(trainer.cfg.lr_anchor[1])


# ------------------------------------------------------------------------------ evaluation


def test_open_run_and_evaluate(trained_run):
    run = open_run(trained_run)
    assert run.step == 40 and not run.model.training
    data = load_eval_data(run.cfg)
    res = evaluate_views(run.model, data, with_lpips=False)
    assert res["views"] == 2 and len(res["per_view"]) == 2
    assert math.isfinite(res["psnr"]) and math.isfinite(res["ssim"]) and -1 <= res["ssim"] <= 1
    assert res["lpips"] is None

    # A model that has learned something beats the untrained one on held-out views.
    torch.manual_seed(0)
    untrained = build_model(run.cfg, run.scene).eval()
    assert res["psnr"] > evaluate_views(untrained, data, with_ssim=False, with_lpips=False)["psnr"]

    out = evaluate_run(trained_run, with_lpips=False)
    saved = json.loads((trained_run / "eval.json").read_text())
    assert saved["psnr"] == pytest.approx(res["psnr"]) and saved["step"] == 40 and saved["split"] == "test"
    assert saved["train_seconds"] > 0 and saved["model"] == "grid"
    assert out["psnr"] == saved["psnr"]
    assert not [p for p in os.listdir(trained_run) if p.startswith(".")]  # the atomic write left no temporary
