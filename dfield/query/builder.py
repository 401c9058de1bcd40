"""Queries on a trained feature field: a text, a patch or a click -> per-view relevance, masks and a 3D selection.

Rendering is the slow part (seconds per view on a CPU), a query is not: the relevance of a pixel is a
softmax over the dot products of its decoded feature with the query set (dfield.query.sets). So every
rendered view keeps its low-dimensional features (plus rgb, depth and opacity), in memory and on disk
(dfield.query.render_cache), and a new query on an already rendered view costs one decode and one softmax.

    from dfield.query.builder import QuerySpec, make_query
    from dfield.query.outputs import relevance
    q = make_query("runs/toy", QuerySpec(patch=(3, 40, 40, 60, 60)))   # a box on training view 3
    maps = relevance("runs/toy", q)                                    # every training view
    maps[0].probability, maps[0].mask                                  # (H, W) each

Everything is compared in teacher space: rendered features go through the run's decoder first. This module
builds query sets; dfield.query.outputs turns them into maps, images and points, dfield.query.evaluation scores them.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np
import torch
import torch.nn.functional as F

from dfield.data.dataset import Cameras, Dataset
from dfield.query.sets import QueryError, QuerySet, click_embedding, patch_embedding
from dfield.query.render_cache import RenderCache, RenderedView
from dfield.io.run import Run, open_run
from dfield.core.image_rendering import ndc_of

OPAQUE = 0.5  # a pixel belongs to the scene (not to empty space) when its rendered opacity is above this
TEXT_NEGATIVES = ("object", "things", "stuff", "texture")  # LERF's canonical phrases: generic "anything else"
MAX_CLUSTER_SAMPLES = 20000

# ---------------------------------------------------------------------------------------- query context


def has_feature_field(model) -> bool:
    return getattr(model, "decoder", None) is not None or getattr(model, "feature_source", None) is not None


class QueryContext:
    """A run opened for querying: its render cache, its teacher (built on first use) and its training views."""

    def __init__(self, run: Run, disk_cache: bool = True):
        if not has_feature_field(run.model):
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
        if self._teacher is None:
            from dfield.features.teachers import make_teacher

            self._teacher = make_teacher(self.run.cfg.features.teacher)
        return self._teacher

    def data(self, split: str) -> Dataset:
        """The run's dataset split (images, cameras, ground truth), read once."""
        if split not in self._data:
            from dfield.training.trainer import load_eval_data, load_train_data

            cfg = self.run.cfg
            self._data[split] = load_train_data(cfg) if split == "train" else load_eval_data(cfg, split)
        return self._data[split]

    def teacher_maps(self, split: str):
        """The teacher's own 2D feature maps of a split (FeatureMaps), from the shared feature cache."""
        if split not in self._teacher_maps:
            from dfield.features.teachers import cached_features
            from dfield.training.trainer import feature_cache_dir

            self._teacher_maps[split] = cached_features(self.teacher, self.data(split), feature_cache_dir(),
                                                        progress=False)
        return self._teacher_maps[split]

    def clusters(self, key: tuple, k: int, sample) -> tuple[torch.Tensor, torch.Tensor]:
        """Scene clusters of the features `sample()` returns, computed once per key: they do not depend on the
        positives, so every query over the same views shares them."""
        if (key, k) not in self._clusters:
            self._clusters[(key, k)] = scene_clusters(sample(), k)
        return self._clusters[(key, k)]

    def render(self, cameras: Cameras, i: int) -> RenderedView:
        return self.cache.get(cameras, i, self.ndc)

    def train_view(self, i: int) -> RenderedView:
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


# ------------------------------------------------------------------------------------------------ queries


@dataclass
class QuerySpec:
    text: list[str] = field(default_factory=list)
    """Positives by text (needs a text-aligned teacher such as clip)."""
    patch: tuple[int, int, int, int, int] | None = None
    """(view, x0, y0, x1, y1): a box in pixels of training view `view`; the positive is its mean feature."""
    click: tuple[int, int, int] | None = None
    """(view, x, y): the feature under one pixel of training view `view`."""
    negatives: list[str] | str | None = None
    """Texts, or "auto" (clusters of the scene's features far from the positives). None: "auto" for patch and
    click queries, LERF's canonical phrases for text-only queries."""
    temperature: float = 0.1
    """Softmax temperature over cosine similarities."""
    threshold: float = 0.5
    """Probability above which a pixel is selected in hard masks."""
    patch_source: str = "field"
    """field: the patch embedding comes from the field's rendering of the view; teacher: from the teacher's own map."""
    auto_views: int = 4
    """Training views whose rendered features are clustered for automatic negatives (plus the query's view)."""
    clusters: int = 24
    """k of the k-means over those views' features (the scene's kinds of stuff: a few per object, more for floors)."""
    claim: float = 0.8
    """A cluster at least `claim` times as similar to the query as the query's closest cluster belongs to the
    query; every other cluster is a negative."""


def check_view(i: int, n: int) -> None:
    if not (isinstance(i, (int, np.integer)) and 0 <= i < n):
        raise QueryError(f"view {i} is out of range: the run has {n} training views (0..{n - 1})")


def validate(spec: QuerySpec, n_views: int, width: int, height: int) -> None:
    """Every check that needs no rendering, so bad input fails before any work is done."""
    if not (spec.text or spec.patch is not None or spec.click is not None):
        raise QueryError("empty query: give a text (--text), a patch (--patch VIEW X0 Y0 X1 Y1) "
                         "or a click (--click VIEW X Y)")
    if any(not str(t).strip() for t in spec.text):
        raise QueryError("empty text in the query")
    if spec.patch is not None:
        if len(spec.patch) != 5:
            raise QueryError(f"a patch is (view, x0, y0, x1, y1), got {spec.patch}")
        v, x0, y0, x1, y1 = spec.patch
        check_view(v, n_views)
        if not (0 <= x0 < x1 <= width and 0 <= y0 < y1 <= height):
            raise QueryError(f"box ({x0}, {y0}, {x1}, {y1}) is not inside the {width}x{height} image of view {v} "
                             "(x0 < x1, y0 < y1 needed)")
    if spec.click is not None:
        if len(spec.click) != 3:
            raise QueryError(f"a click is (view, x, y), got {spec.click}")
        v, x, y = spec.click
        check_view(v, n_views)
        if not (0 <= x < width and 0 <= y < height):
            raise QueryError(f"click ({x}, {y}) is outside the {width}x{height} image of view {v}")
    if not 0 < spec.threshold < 1:
        raise QueryError(f"threshold must be between 0 and 1, got {spec.threshold}")
    if spec.temperature <= 0:
        raise QueryError(f"temperature must be > 0, got {spec.temperature}")
    if spec.patch_source not in ("field", "teacher"):
        raise QueryError(f"patch_source must be 'field' or 'teacher', got {spec.patch_source!r}")
    if isinstance(spec.negatives, str) and spec.negatives != "auto":
        raise QueryError(f"negatives must be 'auto' or a list of texts, got {spec.negatives!r}")


def encode_texts(teacher, texts) -> torch.Tensor:
    from dfield.features.teachers import TeacherError

    if not getattr(teacher, "text_aligned", False):
        raise QueryError(f"teacher {teacher.name} has no text encoder: text queries need a text-aligned teacher "
                         "(e.g. clip); use a patch or click query")
    try:
        return torch.as_tensor(teacher.encode_text(list(texts))).float().reshape(len(texts), -1)
    except TeacherError as e:
        raise QueryError(f"teacher {teacher.name} cannot encode text: {e}") from None


def field_patch_embedding(ctx: QueryContext, view: int, box) -> torch.Tensor:
    """Mean decoded feature over the box's opaque pixels: empty space inside a box says nothing about the object."""
    r = ctx.train_view(view)
    opaque = (r.acc > OPAQUE).float()[..., None]
    both = torch.cat([ctx.decode(r.feature) * opaque, opaque], -1)
    mean = patch_embedding(both, box, (ctx.train_cameras.width, ctx.train_cameras.height))
    if mean[-1] <= 0:
        raise QueryError(f"box {tuple(box)} on view {view} covers only empty space (nothing is rendered there)")
    return mean[:-1] / mean[-1]


def field_click_embedding(ctx: QueryContext, view: int, xy) -> torch.Tensor:
    r = ctx.train_view(view)
    size = (ctx.train_cameras.width, ctx.train_cameras.height)
    if click_embedding(r.acc[..., None], xy, size).item() <= OPAQUE:
        raise QueryError(f"click {tuple(xy)} on view {view} hits empty space (nothing is rendered there)")
    return ctx.decode(click_embedding(r.feature, xy, size))


def spherical_kmeans(x: torch.Tensor, k: int, iterations: int = 25, seed: int = 0) -> torch.Tensor:
    """(N, D) -> (<=k, D) unit centroids clustering by cosine similarity (k-means++ seeding, fixed seed)."""
    x = F.normalize(x.float(), dim=-1)
    g = torch.Generator().manual_seed(seed)
    centroids = [x[torch.randint(len(x), (1,), generator=g)]]
    dist = _cosine_distance(x, centroids[0])
    for _ in range(1, k):
        if dist.sum() == 0:
            break  # fewer distinct features than clusters
        centroids.append(x[torch.multinomial(dist**2, 1, generator=g)])
        dist = torch.minimum(dist, _cosine_distance(x, centroids[-1]))
    c = torch.cat(centroids)
    for _ in range(iterations):
        assign = (x @ c.T).argmax(1)
        sums = torch.zeros_like(c).index_add_(0, assign, x)
        filled = torch.bincount(assign, minlength=len(c)) > 0
        c = torch.where(filled[:, None], F.normalize(sums, dim=-1), c)
    return c


def _cosine_distance(x: torch.Tensor, c: torch.Tensor) -> torch.Tensor:
    d = 1 - (x @ c.T)[:, 0]
    return torch.where(d < 1e-6, torch.zeros_like(d), d)  # rounding must not turn duplicates into new seeds


def far_clusters(means: torch.Tensor, positives: torch.Tensor, center: torch.Tensor, claim: float) -> torch.Tensor:
    """The cluster means unlike every positive (cosine, measured from `center`): those below `claim` times the
    similarity of the closest cluster. Relative, because how close a query gets to its own cluster depends on
    the teacher and on the query (a box averages noise away, a click does not). The closest cluster is never
    a negative, and at least one other cluster always is, so there is always some contrast."""
    sim = (F.normalize(means - center, dim=-1) @ F.normalize(positives - center, dim=-1).T).max(1).values
    best = int(sim.argmax())
    keep = sim < claim * sim[best].clamp(min=0)
    keep[best] = False
    if not keep.any():
        keep = torch.ones_like(keep)
        keep[best] = False
    return means[keep]


def auto_view_ids(n: int, k: int, extra: list[int]) -> list[int]:
    spread = torch.linspace(0, n - 1, max(1, min(k, n))).round().long().tolist()
    return sorted(set(spread) | set(extra))


def field_feature_sample(ctx: QueryContext, views: list[int], limit: int = MAX_CLUSTER_SAMPLES) -> torch.Tensor:
    """Decoded features of the opaque pixels of some training views (a fixed random subset beyond `limit`)."""
    feats = []
    for v in views:
        r = ctx.train_view(v)
        feats.append(ctx.decode(r.feature[r.acc > OPAQUE]))
    x = torch.cat(feats)
    if len(x) == 0:
        raise QueryError(f"training views {views} render nothing opaque; is the run trained?")
    return subsample(x, limit)


def subsample(x: torch.Tensor, limit: int) -> torch.Tensor:
    if len(x) <= limit:
        return x
    return x[torch.randperm(len(x), generator=torch.Generator().manual_seed(0))[:limit]]


def query_views(spec: QuerySpec) -> list[int]:
    return [q[0] for q in (spec.patch, spec.click) if q is not None]


def make_query(run, spec: QuerySpec) -> QuerySet:
    """The query set of `spec` in the run's teacher space: positives, then negatives (texts or automatic)."""
    ctx = context(run)
    cams = ctx.train_cameras
    validate(spec, len(cams), cams.width, cams.height)
    positives = []
    if spec.text:
        positives.append(encode_texts(ctx.teacher, spec.text))
    if spec.patch is not None:
        v, *box = spec.patch
        if spec.patch_source == "teacher":
            positives.append(patch_embedding(ctx.teacher_maps("train").view(v), box, (cams.width, cams.height))[None])
        else:
            positives.append(field_patch_embedding(ctx, v, box)[None])
    if spec.click is not None:
        v, x, y = spec.click
        positives.append(field_click_embedding(ctx, v, (x, y))[None])
    pos = torch.cat(positives)
    negatives = spec.negatives
    if negatives is None:
        negatives = "auto" if spec.patch is not None or spec.click is not None else list(TEXT_NEGATIVES)
    if negatives == "auto":
        views = auto_view_ids(len(cams), spec.auto_views, query_views(spec))
        return contrast_query(pos, ctx.clusters(("field", *views), spec.clusters,
                                                lambda: field_feature_sample(ctx, views)), spec)
    texts = [str(t) for t in negatives if str(t).strip()]
    neg = encode_texts(ctx.teacher, texts) if texts else torch.zeros(0, pos.shape[1])
    return QuerySet(pos, neg, temperature=spec.temperature)


def scene_clusters(sample: torch.Tensor, k: int) -> tuple[torch.Tensor, torch.Tensor]:
    """(centre, (K, D) cluster means) of a sample of the scene's features, clustered by cosine similarity.

    Dense features share a large common component, so cosines are compared from a centre. The centre is the
    mean of the cluster means, not of the pixels: pixels are mostly floor or wall, and measured from their
    mean every object looks alike (on a generated scene with DINOv2 features this halves per-object IoU)."""
    x = sample.float()
    assign = (F.normalize(x, dim=-1) @ spherical_kmeans(x, k).T).argmax(1)
    means = torch.stack([x[assign == j].mean(0) for j in assign.unique()])
    return means.mean(0), means


def contrast_query(positives: torch.Tensor, clusters: tuple[torch.Tensor, torch.Tensor], spec: QuerySpec) -> QuerySet:
    """Automatic negatives: the scene's feature clusters unlike the positives, all measured from the scene's centre."""
    center, means = clusters
    negatives = far_clusters(means, positives, center, spec.claim)
    return QuerySet(positives, negatives, temperature=spec.temperature, center=center)
