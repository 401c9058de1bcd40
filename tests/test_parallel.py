"""Past one process: data-parallel training on torch.distributed (gloo, CPU) gives the model one process gets from
the joint batch, a killed 2-process run resumes with 1 or 2 processes, teacher features, evaluation and renders are
split over processes; and out-of-core data: images mapped from the on-disk store, the draw pool kept as runs, and
resident pages handed back after every batch.

The multi-process tests start real worker processes (`dfield.app.launch`, and torchrun once), a few seconds each.
"""

from __future__ import annotations

import errno
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
from safetensors.torch import load_file

from dfield.app import api
from dfield.app.cli import main as cli_main
from dfield.app.launch import free_port, launch
from dfield.core.pixels import PixelRuns
from dfield.core.rays import RayBatcher
from dfield.data import load_dataset, store
from dfield.data.dataset import Cameras, Dataset
from dfield.data.store import release, stored_stack
from dfield.errors import DataError, DfieldError
from dfield.features.teachers import cached_features, make_teacher
from dfield.io.checkpoint import latest_checkpoint
from dfield.io.run import load_eval_data, open_run
from dfield.training.evaluate import evaluate_run, evaluate_views
from dfield.training.parallel import stream_sizes, streams_of
from dfield.training.trainer import Trainer

ROOT = Path(__file__).resolve().parent.parent
STEPS = 50


def _log(run: Path) -> list[dict]:
    return [json.loads(line) for line in (run / "log.jsonl").read_text().splitlines()]


def _cfg(tiny_scene, tiny_train_config, **kw):
    cfg = tiny_train_config(tiny_scene, iterations=STEPS, log_every=1, ray_streams=2, **kw)
    cfg.data.path = Path(tiny_scene).resolve()
    return cfg


def _assert_same_curve(a: list[dict], b: list[dict], rtol: float = 1e-3):
    assert [r["step"] for r in a] == [r["step"] for r in b]
    la, lb = np.array([r["loss"] for r in a]), np.array([r["loss"] for r in b])
    worst = np.max(np.abs(la - lb) / np.abs(lb))
    assert worst < rtol, f"loss curves differ by up to {worst:.2e} (relative); steps {np.argmax(np.abs(la - lb) / lb) + 1}"


def _test_psnr(run: Path) -> float:
    r = open_run(run)
    return evaluate_views(r.model, load_eval_data(r.cfg), with_ssim=False, with_lpips=False)["psnr"]


@pytest.fixture(scope="module")
def joint_batch_run(tiny_scene, tiny_train_config, tmp_path_factory):
    """One process drawing the two ray streams two processes share: the joint batch, 50 steps."""
    run = tmp_path_factory.mktemp("joint") / "run"
    Trainer.create(_cfg(tiny_scene, tiny_train_config), run).train()
    return run


@pytest.fixture(scope="module")
def two_process_run(tiny_scene, tiny_train_config, tmp_path_factory):
    """The same run in 2 gloo processes, through what `dfield train --nproc 2` calls."""
    run = tmp_path_factory.mktemp("two") / "run"
    api.train(_cfg(tiny_scene, tiny_train_config, threads=1), run, evaluate=True, progress=False, nproc=2)
    return run


# ------------------------------------------------------------------------------ data-parallel training


def test_two_processes_train_the_model_of_one_process_with_the_joint_batch(joint_batch_run, two_process_run):
    a, b = _log(two_process_run), _log(joint_batch_run)
    assert len(a) == STEPS  # rank 0 alone logs: one line per step, not two
    _assert_same_curve(a, b)
    ma = load_file(str(latest_checkpoint(two_process_run / "checkpoints") / "model.safetensors"))
    mb = load_file(str(latest_checkpoint(joint_batch_run / "checkpoints") / "model.safetensors"))
    assert sorted(ma) == sorted(mb)
    assert torch.equal(ma["extra.occupancy.occupied"], mb["extra.occupancy.occupied"])  # the same grid and box
    for k in ma:  # Adam divides by the gradient's running size: float noise in near-zero gradients moves an entry
        if ma[k].is_floating_point():  # by up to ~1e-4 in 50 steps, whatever the summation order
            assert torch.allclose(ma[k], mb[k], rtol=1e-2, atol=1e-3), k
            assert (ma[k] - mb[k]).abs().mean() < 1e-4, k
    meta = json.loads((latest_checkpoint(two_process_run / "checkpoints") / "meta.json").read_text())
    assert meta["streams"] == 2 and meta["processes"] == 2 and meta["structure"]["shrunk"]
    assert abs(_test_psnr(two_process_run) - _test_psnr(joint_batch_run)) < 0.01
    # The evaluation at the end of training, split over the 2 processes, rendered the final model on both.
    saved = json.loads((two_process_run / "eval.json").read_text())
    assert saved["processes"] == 2 and saved["step"] == STEPS
    again = evaluate_run(two_process_run, with_lpips=False)
    assert [r["psnr"] for r in saved["per_view"]] == pytest.approx([r["psnr"] for r in again["per_view"]], abs=1e-4)


def _train_and_die(cfg, run: Path, die_at: int) -> None:
    """A 2-process run whose rank 0 is killed (no clean-up of any kind) right after step `die_at`."""
    from dfield.core import ranks

    with ranks.session("cpu"):
        trainer = Trainer.create(cfg, run)

        def kill(t):
            if t.step == die_at and ranks.is_main():
                os._exit(9)

        trainer.train(hooks=[kill])


@pytest.fixture(scope="module")
def killed_run(tiny_scene, tiny_train_config, tmp_path_factory):
    run = tmp_path_factory.mktemp("killed") / "run"
    with pytest.raises(RuntimeError, match="died"):
        launch(_train_and_die, 2, _cfg(tiny_scene, tiny_train_config, threads=1), run, 27)
    assert latest_checkpoint(run / "checkpoints").name == "step_000020"
    return run


@pytest.mark.parametrize("nproc", [1, 2])
def test_a_killed_two_process_run_resumes_with_one_or_two(killed_run, joint_batch_run, nproc, tmp_path):
    run = Path(shutil.copytree(killed_run, tmp_path / "run"))
    if nproc == 1:
        Trainer.resume(run).train()
    else:
        api.resume(run, evaluate=False, progress=False, nproc=2)
    log = _log(run)
    straight = _log(joint_batch_run)
    resumed = [r for r in log if r["step"] > 20][-(STEPS - 20):]  # steps 21..27 were logged twice: take the redo
    _assert_same_curve(resumed, straight[20:])
    assert abs(_test_psnr(run) - _test_psnr(joint_batch_run)) < 0.01


def test_stream_split():
    assert stream_sizes(1000, 3) == [334, 333, 333] and sum(stream_sizes(7, 7)) == 7
    assert [streams_of(r, 2, 4) for r in range(2)] == [[0, 2], [1, 3]]
    with pytest.raises(ValueError):
        stream_sizes(2, 3)


# ------------------------------------------------------------------------------ teacher, evaluation, renders


def _teacher_in_job(scene: Path, cache: Path) -> str:
    from dfield.core import ranks

    with ranks.session("cpu"):
        data = load_dataset(scene, "train")
        maps = cached_features(make_teacher("synthetic"), data, cache)
        assert maps.maps.shape[0] == len(data)
        return str(maps.path)


def test_teacher_features_are_encoded_in_shares_into_one_cache_file(tiny_scene, tmp_path):
    one = cached_features(make_teacher("synthetic"), load_dataset(tiny_scene, "train"), tmp_path / "one")
    two = Path(launch(_teacher_in_job, 2, tiny_scene, tmp_path / "two"))
    assert two.name == one.path.name  # the same key
    assert two.read_bytes() == one.path.read_bytes()
    assert not [p for p in two.parent.iterdir() if p.name.startswith(".")]  # no temporary left


def _eval_and_render(run: Path, out: Path) -> dict:
    with api._job("cpu"):
        res = api.evaluate(run)
        api.render(run, out=out, video=True, progress=False)
        return res


def test_eval_and_render_split_views_over_processes(joint_batch_run, tmp_path):
    run = Path(shutil.copytree(joint_batch_run, tmp_path / "run"))
    one = evaluate_run(run, with_lpips=False)
    two = launch(_eval_and_render, 2, run, tmp_path / "renders2")
    saved = json.loads((run / "eval.json").read_text())
    assert saved["processes"] == 2 and saved["views"] == one["views"] == 2
    assert [r["psnr"] for r in saved["per_view"]] == pytest.approx([r["psnr"] for r in one["per_view"]])
    assert two["psnr"] == pytest.approx(one["psnr"])
    api.render(run, out=tmp_path / "renders1", video=False, progress=False)
    for f in sorted((tmp_path / "renders1").glob("*.png")):
        assert np.array_equal(np.asarray(Image.open(f)), np.asarray(Image.open(tmp_path / "renders2" / f.name))), f.name
    assert (tmp_path / "renders2" / "rgb.mp4").is_file() and (tmp_path / "renders2" / "depth.mp4").is_file()


def test_torchrun_runs_the_dfield_module(tiny_scene, tmp_path):
    """`torchrun --nproc-per-node 2 -m dfield train ...`: one run folder, logged once."""
    env = {**os.environ, "PYTHONPATH": str(ROOT), "OMP_NUM_THREADS": "1"}
    # A free rendezvous port, not torchrun's fixed 29500, which another job on the machine may hold.
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc-per-node", "2", "--master-port", str(free_port()),
           "-m", "dfield", "train",
           str(tiny_scene), "--downscale", "1", "--out", str(tmp_path / "run"), "--iterations", "6", "--batch-rays", "128",
           "--log-every", "2", "--checkpoint-every", "3", "--no-eval"]
    p = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=300)
    assert p.returncode == 0, p.stdout[-2000:] + p.stderr[-6000:]
    assert [r["step"] for r in _log(tmp_path / "run")] == [2, 4, 6]
    assert latest_checkpoint(tmp_path / "run" / "checkpoints").name == "step_000006"
    assert p.stderr.count("trained 6 steps") == 1  # rank 1 is silent


def test_a_worker_error_is_one_line_on_the_cli(tmp_path, capsys):
    assert cli_main(["train", str(tmp_path / "nothing"), "--out", str(tmp_path / "run"), "--nproc", "2"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("dfield: bad data:") and "no such folder" in err[0]
    assert not (tmp_path / "run").exists()


# ------------------------------------------------------------------------------ out-of-core data


def test_pixel_runs_draw_what_an_id_list_draws():
    g = torch.Generator().manual_seed(0)
    mask = torch.rand(7, 13, generator=g) > 0.4
    ids = mask.reshape(-1).nonzero()[:, 0]
    runs = PixelRuns.from_mask(mask)
    assert len(runs) == len(ids) and torch.equal(runs.ids(), ids)
    r = torch.randint(len(ids), (500,), generator=g)
    assert torch.equal(runs[r], ids[r])
    assert torch.equal(PixelRuns.from_state(runs.state()).ids(), ids)
    assert torch.equal(PixelRuns.from_state(ids).ids(), ids)  # checkpoints of before: a list of ids
    comp = (~mask).reshape(-1).nonzero()[:, 0]
    assert torch.equal(runs.complement(mask.numel()).ids(), comp)
    assert torch.equal(PixelRuns.concat([PixelRuns.from_mask(mask[:3]), PixelRuns.from_mask(mask[3:], 39)]).ids(), ids)


def test_images_are_decoded_once_and_mapped(tiny_scene, tmp_path, monkeypatch):
    monkeypatch.setenv("DFIELD_IMAGE_STORE", str(tmp_path / "store"))
    a = load_dataset(tiny_scene, "train")
    files = sorted((tmp_path / "store").glob("*.npy"))
    assert len(files) == 2  # images and object ids
    assert release(a.images) and release(a.object_ids)
    b = load_dataset(tiny_scene, "train")
    assert sorted((tmp_path / "store").glob("*.npy")) == files  # mapped again, not decoded again
    assert torch.equal(a.images, b.images) and a.images.dtype == torch.uint8
    # A changed image is decoded again.
    scene = Path(shutil.copytree(tiny_scene, tmp_path / "scene"))
    load_dataset(scene, "train")
    n = len(list((tmp_path / "store").glob("*.npy")))
    im = np.asarray(Image.open(scene / "train" / "r_0.png")).copy()
    im[0, 0] = (0, 0, 0, 255) if im.shape[-1] == 4 else (0, 0, 0)
    Image.fromarray(im).save(scene / "train" / "r_0.png")
    c = load_dataset(scene, "train")
    assert len(list((tmp_path / "store").glob("*.npy"))) == n + 1
    assert not torch.equal(c.images[0], b.images[0]) and torch.equal(c.images[1:], b.images[1:])


def _resident_kib(path: Path) -> int:
    """Resident KiB of this process's mappings of `path` (Linux /proc/self/smaps)."""
    total, inside = 0, False
    for line in Path("/proc/self/smaps").read_text().splitlines():
        if line[:1].isalnum() and "-" in line.split()[0]:
            inside = line.rstrip().endswith(str(path))
        elif inside and line.startswith("Rss:"):
            total += int(line.split()[1])
    return total


@pytest.mark.skipif(not Path("/proc/self/smaps").exists(), reason="needs Linux /proc/self/smaps")
def test_ray_batches_leave_no_image_pages_resident(tmp_path, monkeypatch):
    """17 MB of images (1000 views of 64x88) over a resident budget of 4 MB: after 100 batches the process holds
    about one batch's pages of them (the kernel maps up to 64 KB around each page read), not all of them."""
    monkeypatch.setattr(store, "RESIDENT_BUDGET_BYTES", 4 << 20)
    n, h, w = 1000, 64, 88
    src = tmp_path / "one.png"
    src.write_bytes(b"x")
    rng = np.random.default_rng(0)
    images = stored_stack([src] * n, (n, h, w, 3), np.uint8, lambda i: rng.integers(0, 256, (h, w, 3)), "test",
                          folder=tmp_path / "store")
    path = next((tmp_path / "store").glob("*.npy"))
    total_kib = images.numel() // 1024
    cams = Cameras(torch.eye(4)[:3].expand(n, 3, 4).contiguous(), *(torch.full((n,), v) for v in (50.0, 50.0, w / 2, h / 2)),
                   w, h)
    data = Dataset(images, cams, [src] * n, torch.tensor([[-1.0] * 3, [1.0] * 3]), 0.1, 5.0)
    batcher = RayBatcher(data, 64, seed=0)
    for _ in range(100):
        batcher.sample()
    kept = _resident_kib(path)
    assert images.sum().item() > 0 and _resident_kib(path) > 0.9 * total_kib  # read it all: all resident
    assert kept < 0.4 * total_kib, f"{kept} KiB of {total_kib} KiB resident after sampling"


def test_a_full_disk_is_named_not_a_traceback(make_blender, tmp_path, monkeypatch, capsys):
    """The image store's disk: too little free space is found before decoding, and a write that still fails for
    lack of space names the folder and the setting that moves it; nothing half-written is left."""
    scene = make_blender(n=3)
    folder = tmp_path / "store"
    monkeypatch.setenv("DFIELD_IMAGE_STORE", str(folder))
    real = shutil.disk_usage
    monkeypatch.setattr(store.shutil, "disk_usage", lambda p: real(p)._replace(free=1000))
    with pytest.raises(DfieldError, match=r"store: decoded images .* need .* MiB free.*DFIELD_IMAGE_STORE"):
        load_dataset(scene, "train")
    assert cli_main(["train", str(scene), "--out", str(tmp_path / "run"), "--no-eval"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "DFIELD_IMAGE_STORE" in err[0], err
    monkeypatch.setattr(store.shutil, "disk_usage", real)

    def full(path, shape, dtype, n, decode):
        Path(path).write_bytes(b"partial")
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(store, "_write_npy", full)
    with pytest.raises(DfieldError, match=r"disk full while writing decoded images .*DFIELD_IMAGE_STORE"):
        load_dataset(scene, "train")
    assert list(folder.iterdir()) == []


def test_a_bad_image_leaves_nothing_in_the_store(make_blender, tmp_path, monkeypatch):
    """A truncated image (its header reads, its pixels do not) found while the store is being written: the error
    names it and the half-written array is removed."""
    scene = make_blender(n=3, width=32, height=32)
    monkeypatch.setenv("DFIELD_IMAGE_STORE", str(tmp_path / "store"))
    png = scene / "train" / "r_2.png"
    png.write_bytes(png.read_bytes()[:len(png.read_bytes()) // 2])
    with pytest.raises(DataError, match="r_2.png"):
        load_dataset(scene, "train")
    assert (tmp_path / "store").is_dir() and list((tmp_path / "store").iterdir()) == []
