"""A run opened for querying: its render cache, its teacher (built on first use), its dataset splits and teacher
maps (read once), and the scene's feature clusters (computed once per set of views)."""

from __future__ import annotations

import torch

from dfield.core.image_rendering import ndc_of
from dfield.data.dataset import Cameras, Dataset
from dfield.errors import QueryError
from dfield.features.teachers import cached_features, feature_cache_dir, make_teacher
from dfield.io.run import Run, load_eval_data, load_train_data, open_run
from dfield.query.clusters import scene_clusters
from dfield.query.render_cache import RenderCache, RenderedView
from dfield.query.spec import check_view


class QueryContext:
    """A run opened for querying: its render cache, its teacher (built on first use) and its training views."""

    def __init__(self, run: Run, disk_cache: bool = True):
        if not run.model.has_features:
            raise QueryError(f"{run.path}: this run has no feature field to query (train with --features.teacher ...)")
        self.run = run
        self.cache = RenderCache(run, disk=disk_cache)
        self.ndc = ndc_of(run.scene)
        self.train_cameras = run.scene.train_cameras()
        self._teacher = None
        self._data: dict[str, Dataset] = {}
        self._teacher_maps: dict[str, object] = {}
        self._clusters: dict[tuple, tuple[torch.Tensor, torch.Tensor]] = {}

    @property
    def teacher(self):
        """The run's teacher, built on first use (text queries and teacher-side comparisons need it)."""
        if self._teacher is None:
            self._teacher = make_teacher(self.run.cfg.features.teacher)
        return self._teacher

    def data(self, split: str) -> Dataset:
        """The run's dataset split (images, cameras, ground truth), read once."""
        if split not in self._data:
            cfg = self.run.cfg
            self._data[split] = load_train_data(cfg) if split == "train" else load_eval_data(cfg, split)
        return self._data[split]

    def teacher_maps(self, split: str):
        """The teacher's own 2D feature maps of a split (FeatureMaps), from the shared feature cache."""
        if split not in self._teacher_maps:
            self._teacher_maps[split] = cached_features(self.teacher, self.data(split), feature_cache_dir())
        return self._teacher_maps[split]

    def clusters(self, key: tuple, k: int, sample) -> tuple[torch.Tensor, torch.Tensor]:
        """Scene clusters of the features `sample()` returns, computed once per key: they do not depend on the
        positives, so every query over the same views shares them."""
        if (key, k) not in self._clusters:
            self._clusters[(key, k)] = scene_clusters(sample(), k)
        return self._clusters[(key, k)]

    def render(self, cameras: Cameras, i: int) -> RenderedView:
        """Camera `i` of `cameras`, rendered once per run and camera (see RenderCache)."""
        return self.cache.get(cameras, i, self.ndc)

    def train_view(self, i: int) -> RenderedView:
        """Training view `i`, rendered (QueryError when out of range)."""
        check_view(i, len(self.train_cameras))
        return self.render(self.train_cameras, i)

    @torch.no_grad()
    def decode(self, feature: torch.Tensor) -> torch.Tensor:
        """Rendered (..., C) features -> teacher space (..., D)."""
        model = self.run.model
        device = next(model.parameters()).device
        return model.decode(feature.to(device).float()).cpu()


def context(run) -> QueryContext:
    """A QueryContext for a run folder, an opened Run (one context per Run object) or a context."""
    if isinstance(run, QueryContext):
        return run
    if isinstance(run, Run):
        ctx = getattr(run, "_query_context", None)  # kept on the Run so every call shares its render cache
        if ctx is None:
            ctx = QueryContext(run)
            run._query_context = ctx
        return ctx
    return context(open_run(run))
