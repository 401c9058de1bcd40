"""The trainer: draws rays, renders, steps the optimiser, checkpoints, resumes, and refuses to diverge silently.

The model says what to optimise (`param_groups`), what its loss terms are (`losses`, `regularizer`) and how its
structure changes during training (`schedule`); the trainer adds the distillation loss when a teacher is set
and owns everything about the run: ray batches, learning rates, time budget, checkpoints and the log.
"""

from __future__ import annotations

import contextlib
import copy
import json
import math
import shutil
import time
import warnings
from collections.abc import Callable
from pathlib import Path

import torch

from dfield.config import TrainConfig, apply_scene_defaults, to_dict
from dfield.core import ranks
from dfield.core.metrics import peak_rss_bytes, psnr_from_mse
from dfield.core.optimizers import adam
from dfield.core.pixels import PixelRuns
from dfield.core.profiling import PROFILER
from dfield.core.rays import dataset_rays, pixel_coords
from dfield.core.sampling import ray_aabb
from dfield.data.dataset import Dataset
from dfield.errors import RunError, TrainingDiverged
from dfield.features.fitting import teacher_targets
from dfield.features.segmenters import make_segmenter
from dfield.features.smoothing import SmoothSpec
from dfield.features.targets import (
    load_targets_record,
    render_views,
    resolve_smooth,
    save_targets_record,
    smooth_targets,
)
from dfield.features.teachers import cached_features, feature_cache_dir, make_teacher
from dfield.io.checkpoint import (
    latest_checkpoint,
    load_checkpoint,
    optimizer_tensors,
    restore_optimizer,
    save_checkpoint,
)
from dfield.io.run import (
    SceneInfo,
    build_model,
    load_config,
    load_model_state,
    load_train_data,
    model_tensors,
    save_config,
    with_checkpoint_features,
)
from dfield.models.losses import feature_loss, patch_tv_loss
from dfield.training.parallel import Stream, gather_stream_states, make_streams, same_model, sum_over_processes

Progress = Callable[[str, int, int, dict | None], None]

BUDGET_WINDOW = 250
"""fit_to_budget times this many steps (a whole cycle of the grid's late occupancy updates) before it moves the
iterations, and again before every later move."""
BUDGET_MARGIN = 1.0
"""Share of the budget's remaining seconds the fitted schedule plans for. All of it: a run the budget cuts a few
percent before its last step has decayed its rates nearly as far (0.1^0.95 = 0.11 of the start, not 0.10), while
one that ends early leaves seconds unused (0.95 ended lego's 300 s budget at 273 s)."""


def _check_feature_options(cfg: TrainConfig) -> None:
    """Bad smoothing / patch settings fail before anything is read or written; "auto" smoothing is resolved (to
    nothing without a teacher), so the saved config says what the run trains on."""
    f = cfg.features
    if f.smooth.strip() not in ("", "none", "auto") and not f.teacher:
        raise RunError("--features.smooth needs a teacher (--features.teacher)")
    f.smooth = resolve_smooth(f.smooth) if f.teacher else ""
    if f.patch < 0 or f.tv < 0 or f.smooth_sigma <= 0:
        raise RunError(f"--features.patch and --features.tv must be >= 0 and --features.smooth-sigma > 0 "
                       f"(got {f.patch}, {f.tv}, {f.smooth_sigma})")
    if (f.patch or f.tv) and not f.teacher:
        raise RunError("--features.patch and --features.tv need a teacher (--features.teacher)")
    if f.tv > 0 and f.patch < 2:
        raise RunError(f"--features.tv {f.tv} regularises rendered patches: set --features.patch to 2 or more")
    if f.smooth:
        spec = SmoothSpec.parse(f.smooth)  # TeacherError naming the spec
        if spec.kind == "segments":
            make_segmenter(spec.segmenter)


class Trainer:
    """Trains one run folder. Create with `Trainer.create` (new run) or `Trainer.resume` (existing run).

    Example:
        >>> cfg = TrainConfig(iterations=1500)                     # doctest: +SKIP
        >>> cfg.data.path = Path("scenes/toy")                     # doctest: +SKIP
        >>> Trainer.create(cfg, Path("runs/toy")).train()          # doctest: +SKIP
    """

    def __init__(self, cfg: TrainConfig, run_dir: Path, data: Dataset, scene: SceneInfo, teacher=None,
                 progress: Progress | None = None, n_streams: int | None = None):
        self.cfg, self.run_dir, self.data, self.scene = cfg, Path(run_dir), data, scene
        if cfg.features.smooth in ("auto", "none"):  # a config built in code and handed straight to Trainer
            cfg.features.smooth = resolve_smooth(cfg.features.smooth) if cfg.features.teacher else ""
        if cfg.threads > 0:
            torch.set_num_threads(cfg.threads)
        if cfg.model == "blended":  # photometric training would fit the edit back to the unedited photos
            raise RunError(f"{run_dir} is a guided edit (dfield guide-edit); it is not trained with dfield train/resume")
        self.device = torch.device(cfg.device)
        torch.manual_seed(cfg.seed)
        self.model = build_model(cfg, scene).to(self.device)
        # Data parallel (training/parallel.py): this process's share of the run's ray streams; one stream, seeded
        # as before streams existed, when the run is a single process.
        self.n_streams = max(n_streams or cfg.ray_streams or ranks.world(), ranks.world())
        self.streams: list[Stream] = make_streams(data, cfg.batch_rays, cfg.seed, self.n_streams)
        self.batcher, self.jitter = self.streams[0].batcher, self.streams[0].jitter
        self.step = 0
        self.seconds = 0.0  # training time, excluding paused spans (evaluation by hooks)
        self.optimizer = self._make_optimizer()
        self.last = {}
        self.teacher_maps = None
        self.targets = None  # smoothed teacher maps (features.smooth), made when the features start
        self.progress = progress
        self._missed: tuple[PixelRuns, PixelRuns] | None = None
        self._budget_timing: tuple[int, float] | None = None  # (step, seconds) where fit_to_budget started timing
        self.budget_plan: dict | None = None  # what fit_to_budget did in this process (step, seconds_per_step, ...)
        if cfg.features.teacher and cfg.features.method != "lift":  # lifted features are a fixed grid: nothing to fit
            teacher = teacher or make_teacher(cfg.features.teacher)
            self.teacher_maps = cached_features(teacher, data, feature_cache_dir(), progress=progress)

    # -- construction -------------------------------------------------------------------------
    @classmethod
    def create(cls, cfg: TrainConfig, run_dir: Path, overwrite: bool = False, progress: Progress | None = None) -> "Trainer":
        """A new run in `run_dir` from `cfg` (copied: the caller's config is not changed). The data is read and
        checked before `run_dir` is touched, so bad input never leaves a half-made run. `progress` reports the
        teacher's feature maps being computed."""
        run_dir = Path(run_dir)
        cfg = copy.deepcopy(cfg)
        # The run folder is read from other working directories later (render, eval, query): keep the data's
        # absolute path, not the one relative to where training started.
        cfg.data.path = Path(cfg.data.path).resolve()
        _check_feature_options(cfg)
        data = ranks.main_first(lambda: load_train_data(cfg), local=True)  # the first decodes into the image store
        # The scene type auto chose is saved: every later load of the run (eval, render, resume) models it alike.
        cfg.data.scene_type = data.scene_type
        if cfg.scene_defaults:
            apply_scene_defaults(cfg, data.scene_type)
        teacher = None
        if cfg.features.teacher:  # built once here: its width goes into the saved config
            teacher = make_teacher(cfg.features.teacher)
            cfg.features.teacher_dim = teacher.dim
        if (run_dir / "config.json").exists() and not overwrite:
            raise RunError(f"{run_dir} already holds a run; use --resume to continue it or --overwrite to start over")
        ranks.barrier()  # every process has looked before rank 0 writes
        scene = SceneInfo.from_dataset(data)
        if ranks.is_main():
            if overwrite and run_dir.exists():
                shutil.rmtree(run_dir / "checkpoints", ignore_errors=True)
                for f in ("log.jsonl", "eval.json"):
                    (run_dir / f).unlink(missing_ok=True)
            run_dir.mkdir(parents=True, exist_ok=True)
            save_config(cfg, run_dir / "config.json")
            scene.save(run_dir / "scene.json")
        ranks.barrier()
        return cls(cfg, run_dir, data, scene, teacher, progress)

    @classmethod
    def resume(cls, run_dir: Path, iterations: int | None = None, max_seconds: float | None = None,
               progress: Progress | None = None) -> "Trainer":
        """The run in `run_dir` at its last checkpoint (or from scratch if it has none), optionally with a new
        iteration target or time budget (saved, so a killed extended run resumes to the new target)."""
        run_dir = Path(run_dir)
        if not (run_dir / "config.json").is_file():
            raise RunError(f"{run_dir}: nothing to resume (no config.json)")
        cfg = load_config(run_dir / "config.json")
        if cfg.features.smooth == "auto":  # a config written before smoothing had a default trained on raw targets
            cfg.features.smooth = ""
        if iterations is not None:
            cfg.iterations = iterations
            cfg.fit_to_budget = False  # steps asked for are kept (a fitted decay goes on from its anchor to them)
        if max_seconds is not None:
            cfg.max_seconds = max_seconds
        data = ranks.main_first(lambda: load_train_data(cfg), local=True)
        ckpt = latest_checkpoint(run_dir / "checkpoints")
        saved_features = cfg.features
        n_streams = None
        if ckpt is not None:
            meta = json.loads((ckpt / "meta.json").read_text())
            cfg = with_checkpoint_features(cfg, meta)
            n_streams = meta.get("streams", 1)
        if (iterations is not None or max_seconds is not None or cfg.features != saved_features) and ranks.is_main():
            save_config(cfg, run_dir / "config.json")
        trainer = cls(cfg, run_dir, data, SceneInfo.load(run_dir / "scene.json"), progress=progress, n_streams=n_streams)
        if ckpt is not None:
            trainer.load(ckpt)
        return trainer

    def _make_optimizer(self) -> torch.optim.Optimizer:
        groups = self.model.param_groups()
        for g in groups:
            g["initial_lr"] = g["lr"]
        return adam(groups, betas=(0.9, 0.99))

    # -- checkpoints ----------------------------------------------------------------------------
    def save(self) -> Path | None:
        """Checkpoint the current step: model, optimiser moments, every random generator and the ray pool, so that
        `load` continues exactly; returns the checkpoint folder. In a distributed job every process calls it and
        rank 0 writes (the others return None)."""
        self._check_same_model()
        opt_t, groups = optimizer_tensors(self.optimizer)
        trainer_t = {**opt_t, "rng.torch": torch.get_rng_state()}
        for k, (b, j) in gather_stream_states(self.streams).items():  # stream 0 under the names of one-stream runs
            trainer_t[f"rng.batcher.{k}" if k else "rng.batcher"], trainer_t[f"rng.jitter.{k}" if k else "rng.jitter"] = b, j
        if self.batcher.pool is not None:
            trainer_t["batcher.pool"] = self.batcher.pool.state()
        rss = max(ranks.all_gather_object(peak_rss_bytes()))  # the largest process's
        # The others wait until rank 0 has written it: what they read next (evaluation opens the run's latest
        # checkpoint) must be this checkpoint, not the one before.
        if not ranks.is_main():
            ranks.barrier()
            return None
        meta = {"seconds": self.seconds, "peak_rss_bytes": rss, "structure": self.model.structure(), "optimizer_groups": groups,
                "last": self.last, "features": to_dict(self.cfg.features), "streams": self.n_streams,
                "processes": ranks.world()}
        path = save_checkpoint(self.run_dir / "checkpoints", self.step, model_tensors(self.model), trainer_t, meta)
        ranks.barrier()
        return path

    def load(self, ckpt: Path) -> None:
        """Restore the state `save` wrote to checkpoint folder `ckpt` (model, a fresh optimiser with its moments,
        generators, ray pool, step, seconds and last logged figures)."""
        tensors, trainer_t, meta = load_checkpoint(ckpt, self.device)
        load_model_state(self.model, tensors, meta)
        self.optimizer = self._make_optimizer()
        restore_optimizer(self.optimizer, trainer_t, meta["optimizer_groups"], self.device)
        pool = trainer_t.get("batcher.pool")
        pool = PixelRuns.from_state(pool) if pool is not None else None
        for s in self.streams:
            b, j = (f"rng.batcher.{s.index}", f"rng.jitter.{s.index}") if s.index else ("rng.batcher", "rng.jitter")
            if b in trainer_t:  # else a stream the run did not have (more processes now): it starts from its seed
                s.batcher.set_state(trainer_t[b])
                s.jitter.set_state(trainer_t[j])
            s.batcher.restrict(pool)
        torch.set_rng_state(trainer_t["rng.torch"])
        self.step, self.seconds, self.last = meta["step"], meta["seconds"], meta.get("last", {})

    # -- training -------------------------------------------------------------------------------
    def lr_fraction(self, step: int) -> float:
        """How much of the learning-rate decay is done at `step`, in [0, 1]: step / iterations, or, once fit_to_budget
        has last moved the iterations at (k0, f0) = `cfg.lr_anchor`, f0 + (1 - f0) (step - k0) / (iterations - k0)
        from k0 on (before k0: f0 step / k0, a straight line in place of the history it does not keep)."""
        n = max(1, self.cfg.iterations)
        k0, f0 = self.cfg.lr_anchor
        if k0 > 0:
            return f0 * step / k0 if step < k0 else min(1.0, f0 + (1.0 - f0) * (step - k0) / max(1, n - k0))
        return min(1.0, step / n)

    def _set_lr(self) -> None:
        n, start = max(1, self.cfg.iterations), self.cfg.features.start_step
        for g in self.optimizer.param_groups:
            if g.get("name", "").startswith("feature_") and start > 0:
                # Radiance first: the feature branch decays over its own steps, from its full rate at start_step.
                frac = min(1.0, max(0, self.step - start) / max(1, n - start))
            else:
                frac = self.lr_fraction(self.step)
            g["lr"] = g["initial_lr"] * self.cfg.lr_final_ratio ** frac

    def budget_plan_text(self) -> str | None:
        """One line on what fit_to_budget did in this process (None when it did nothing), for the CLI and benchmarks."""
        p = self.budget_plan
        if p is None:
            return None
        return (f"schedule fitted to the {self.cfg.max_seconds:g} s budget: {p['iterations_before']} -> {p['iterations']} "
                f"steps, last at step {p['step']} ({1000 * p['seconds_per_step']:.0f} ms per step)")

    def _budget_timing_start(self) -> int | None:
        """The step from which fit_to_budget times the steps (the model's structure and the features have settled),
        or None when the schedule is not fitted to a budget."""
        c = self.cfg
        fitted = c.lr_anchor[0] > 0  # moved before (in this process or before a resume): keep it fitted
        if not (c.max_seconds > 0 and c.fit_to_budget and (fitted or c.iterations == TrainConfig.iterations)):
            return None
        settled = self.model.schedule.settled_step()
        if self.teacher_maps is not None:
            settled = max(settled, c.features.start_step)
        return settled + 50  # past the slow steps right after a reshape

    def _fit_to_budget(self) -> None:
        """fit_to_budget: once the structure has settled, time every BUDGET_WINDOW steps and move `iterations` so the
        schedule ends at the budget at the rate just measured, the learning-rate decay going on from where it is
        (`lr_fraction`). Timing again and again follows a machine whose speed drifts (a one-off estimate at step
        1300 left lego's 600 s budget 12 % of its steps short); the last window's moves are left alone."""
        start = self._budget_timing_start()
        if start is None or self.step < start:
            return
        if self._budget_timing is None:  # every process passes here at the same step
            self._budget_timing = (self.step, self.seconds)
            return
        s0, t0 = self._budget_timing
        if self.step - s0 < BUDGET_WINDOW or self.cfg.iterations - self.step < BUDGET_WINDOW:
            return
        per_step = max(self.seconds - t0, 1e-9) / (self.step - s0)
        left = max(0.0, self.cfg.max_seconds - self.seconds)
        # Rank 0's clock decides, as for the time budget itself: every process must take the same steps.
        n = ranks.broadcast_object(self.step + max(1, int(BUDGET_MARGIN * left / per_step)))
        self._budget_timing = (self.step, self.seconds)
        old = self.cfg.iterations
        self.cfg.lr_anchor = (self.step, self.lr_fraction(self.step))
        self.cfg.iterations = n
        first = self.budget_plan["first_step"] if self.budget_plan else self.step
        before = self.budget_plan["iterations_before"] if self.budget_plan else old
        self.budget_plan = {"first_step": first, "step": self.step, "seconds_per_step": per_step,
                            "iterations_before": before, "iterations": n}
        if ranks.is_main():  # a resumed run continues the fitted schedule
            save_config(self.cfg, self.run_dir / "config.json")

    def _restrict_rays_to_box(self) -> None:
        """Once the box has shrunk to the object, rays that miss it only ever see background: skip them.

        The pool is kept as runs of pixel ids (core/pixels.py), a few per image row; each process tests its share
        of the views and they all get the whole pool."""
        box = self.model.scene_box()
        if box is None or self.batcher.pool is not None:
            return
        data, hw = self.data, self.data.height * self.data.width
        mine, per_chunk = ranks.share(len(data)), max(1, (1 << 18) // hw)
        parts = []
        for v0 in range(mine.start, mine.stop, per_chunk):
            ids = torch.arange(v0 * hw, min(mine.stop, v0 + per_chunk) * hw)
            t0, t1 = ray_aabb(dataset_rays(data, *pixel_coords(ids, data.width, data.height)), box.cpu())
            parts.append(PixelRuns.from_mask(t1 > t0.clamp(min=self.scene.near), offset=v0 * hw))
        pool = PixelRuns.concat(ranks.all_gather_object(PixelRuns.concat(parts)))  # shares in rank order
        if 0 < len(pool) < self.batcher.n_pixels:
            for s in self.streams:
                s.batcher.restrict(pool)

    def _teacher_targets(self, ids: torch.Tensor) -> torch.Tensor:
        maps = self.targets if self.targets is not None else self.teacher_maps
        return teacher_targets(maps, self.data, ids).to(self.device)

    def smooth_source(self) -> str:
        """Where features.smooth makes its masks: "renders" or "photos" (auto: renders after radiance first)."""
        on = self.cfg.features.smooth_on
        return on if on != "auto" else ("renders" if self.cfg.features.start_step > 0 else "photos")

    def _make_targets(self) -> None:
        """Smoothed targets, once, when the features start: from RUN/targets.json on resume, else made now (by rank 0
        in a distributed job; the others then read its record)."""
        if not ranks.is_main():
            ranks.barrier()
            self.targets = load_targets_record(self.run_dir)
            if self.targets is None:
                raise RunError(f"{self.run_dir}/targets.json: rank 0 made smoothed targets this process cannot read")
            return
        try:
            self._make_targets_here()
        finally:
            if ranks.world() > 1:
                ranks.barrier()

    def _make_targets_here(self) -> None:
        fcfg = self.cfg.features
        self.targets = load_targets_record(self.run_dir)
        if self.targets is not None:
            return
        source = self.smooth_source()
        renders = None
        if source == "renders":
            self.model.eval()
            renders = render_views(self.model, self.data, self.device, progress=self.progress)
            self.model.train()
        self.targets = smooth_targets(self.teacher_maps, self.data, fcfg.smooth, renders, fcfg.smooth_sigma,
                                      fcfg.smooth_mode, progress=self.progress)
        save_targets_record(self.run_dir, self.targets, source, self.step, fcfg.smooth)

    def _missed_rays_feature_loss(self, n: int, jitter: torch.Generator | None = None) -> tuple[torch.Tensor, float] | None:
        """Feature loss on rays that miss the shrunk box, which the batcher no longer draws.

        Those rays render no samples, so their feature is the decoder applied to zero: without them a feature
        field that starts after the shrink (radiance first) never learns what empty background looks like.
        """
        pool = self.batcher.pool
        if pool is None or n == 0 or not self.model.trainable_features:
            return None
        if self._missed is None or self._missed[0] is not pool:
            self._missed = (pool, pool.complement(self.batcher.n_pixels))
        missed = self._missed[1]
        if len(missed) == 0:
            return None
        ids = missed[torch.randint(len(missed), (n,), generator=jitter or self.jitter)]
        empty = self.model.decode(torch.zeros(n, self.model.feature_dim, device=self.device))
        return feature_loss(empty, self._teacher_targets(ids), self.cfg.features.loss), len(missed) / self.batcher.n_pixels

    def train_step(self) -> dict:
        """One optimiser step on a fresh ray batch (after the model's schedule has run). Returns loss figures.

        The batch is this process's ray streams; in a distributed job the gradients and figures are summed over
        the processes before the step (training/parallel.py), so every process takes the same step."""
        with PROFILER.phase("schedule"):
            change = self.model.schedule.before_step(self.model, self.step)
            if change.reshaped:
                self._check_same_model()
                self.optimizer = self._make_optimizer()
            if change.shrunk:
                self._restrict_rays_to_box()
        self._set_lr()
        fcfg = self.cfg.features
        with_features = self.teacher_maps is not None and self.step >= fcfg.start_step
        if with_features and fcfg.smooth and self.targets is None:
            self._make_targets()
        patches = with_features and fcfg.patch > 0
        loss, mse, feat_loss = 0.0, 0.0, None
        for stream in self.streams:  # one, unless this process draws for more processes than there are now
            s_loss, s_mse, s_feat = self._stream_loss(stream, with_features, patches)
            w = stream.weight
            loss, mse = loss + (s_loss if w == 1.0 else w * s_loss), mse + w * s_mse.detach()
            if s_feat is not None:
                feat_loss = (0.0 if feat_loss is None else feat_loss) + w * s_feat.detach()
        reg = self.model.regularizer(self.step)
        if reg is not None:
            loss = loss + (reg if ranks.world() == 1 else reg / ranks.world())  # summed over the processes below
        self.optimizer.zero_grad(set_to_none=True)
        with PROFILER.phase("backward"):
            loss.backward()
        local = torch.stack([loss.detach(), mse, loss.new_zeros(()) if feat_loss is None else feat_loss]).float().cpu()
        with PROFILER.phase("all-reduce"):
            total = sum_over_processes([p for g in self.optimizer.param_groups for p in g["params"]], local)
        loss_value = total[0].item()
        if not math.isfinite(loss_value):
            ckpt = latest_checkpoint(self.run_dir / "checkpoints")
            folder = self.run_dir / "checkpoints"
            kept = f"the last good checkpoint {ckpt} is kept" if ckpt else f"no checkpoint in {folder} yet"
            raise TrainingDiverged(f"loss became {loss_value} at step {self.step}; stopped ({kept}). Try lower learning rates.")
        with PROFILER.phase("optimizer"):
            self.optimizer.step()
        self.step += 1
        stats = {"loss": loss_value, "mse": total[1].item()}
        if feat_loss is not None:
            stats["feature_loss"] = total[2].item()
        return stats

    def _stream_loss(self, stream: Stream, with_features: bool, patches: bool):
        """(loss, rgb mse, feature loss or None) of one stream's rays; the loss without the model's regulariser."""
        fcfg = self.cfg.features
        with PROFILER.phase("rays"):
            batcher = stream.batcher
            rays, target, ids = batcher.sample_patches(fcfg.patch) if patches else batcher.sample()
            rays, target = rays.to(self.device), target.to(self.device)
        with PROFILER.phase("render"):
            out = self.model.render_rays(rays, stream.jitter, features=with_features)
        terms = self.model.losses(out, target)
        loss = sum(terms.values())
        feat_loss = None
        if with_features:
            decoded = self.model.decode(out["feature"])
            feat_loss = feature_loss(decoded, self._teacher_targets(ids), fcfg.loss)
            if patches and fcfg.tv > 0:
                feat_loss = feat_loss + fcfg.tv * patch_tv_loss(decoded, fcfg.patch)
            miss = self._missed_rays_feature_loss(len(ids) // 8, stream.jitter)
            if miss is not None:  # weighted as if the batch had been drawn from every pixel
                value, frac = miss
                feat_loss = (1 - frac) * feat_loss + frac * value
            loss = loss + fcfg.weight * feat_loss
        return loss, terms["rgb"], feat_loss

    def _check_same_model(self) -> None:
        """Distributed: every process should hold the same model (see training/parallel.py); if one does not, rank
        0's is copied to the others. Nothing without a job."""
        if ranks.world() == 1:
            return
        tensors, structure = model_tensors(self.model), self.model.structure()
        if same_model(tensors, structure):
            return
        warnings.warn(f"step {self.step}: the processes' models differ; rank 0's is copied to the others", stacklevel=2)
        sent = (tensors, structure, self.optimizer.state_dict()) if ranks.is_main() else None
        tensors, structure, opt_state = ranks.broadcast_object(sent)
        if not ranks.is_main():
            load_model_state(self.model, {k: v.to(self.device) for k, v in tensors.items()}, {"structure": structure})
            self.optimizer = self._make_optimizer()
            self.optimizer.load_state_dict(opt_state)

    def train(self, hooks: list[Callable[["Trainer"], None]] = (), progress: Progress | None = None) -> None:
        """Train to `cfg.iterations` (or `cfg.max_seconds` of training), checkpointing and logging as configured.

        `hooks` run after every step, outside the timed span (evaluation there is not training time).
        `progress("train", step, iterations, stats)` is called after every step; `stats` (loss, PSNR, rays/s) on
        logged steps, else None.
        """
        cfg = self.cfg
        rays_done, sec_window = 0, self.seconds
        main = ranks.is_main()  # in a distributed job only rank 0 logs; every process checkpoints together

        def out_of_time() -> bool:  # rank 0's clock decides for all: processes must stop at the same step
            return bool(cfg.max_seconds) and ranks.broadcast_flag(self.seconds >= cfg.max_seconds)

        with open(self.run_dir / "log.jsonl", "a") if main else contextlib.nullcontext() as log:
            while self.step < cfg.iterations and not out_of_time():
                t0 = time.perf_counter()
                with PROFILER.phase("step"):
                    stats = self.train_step()
                rays_done += cfg.batch_rays
                if self.step % cfg.checkpoint_every == 0 or self.step == cfg.iterations:
                    self.save()
                self.seconds += time.perf_counter() - t0
                self._fit_to_budget()
                logged = None
                if self.step % cfg.log_every == 0 or self.step == cfg.iterations:
                    self.last = {"step": self.step, "loss": stats["loss"], "psnr": psnr_from_mse(stats["mse"]),
                                 "rays_per_s": rays_done / max(self.seconds - sec_window, 1e-9), "seconds": round(self.seconds, 2)}
                    if "feature_loss" in stats:
                        self.last["feature_loss"] = stats["feature_loss"]
                    if main:
                        log.write(json.dumps(self.last) + "\n")
                        log.flush()
                    rays_done, sec_window = 0, self.seconds
                    logged = self.last
                if progress is not None:
                    progress("train", self.step, cfg.iterations, logged)
                for hook in hooks:  # outside the timed span: evaluation is not training time
                    hook(self)
            if self.step % cfg.checkpoint_every != 0 and self.step != cfg.iterations:
                self.save()  # stopped by the time budget: keep what was learned
