"""Queries on a trained feature field: a text, a patch or a click -> per-view relevance, masks and a 3D selection.

Rendering is the slow part (seconds per view on a CPU), a query is not: the relevance of a pixel is a
softmax over the dot products of its decoded feature with the query set (dfield.query). So every
rendered view keeps its low-dimensional features (plus rgb, depth and opacity), in memory and on disk
under RUN/cache/render/<checkpoint>/, and a new query on an already rendered view costs one decode and
one softmax.

    from dfield.querying import QuerySpec, make_query, relevance
    q = make_query("runs/toy", QuerySpec(patch=(3, 40, 40, 60, 60)))   # a box on training view 3
    maps = relevance("runs/toy", q)                                    # every training view
    maps[0].probability, maps[0].mask                                  # (H, W) each

Everything is compared in teacher space: rendered features go through the run's decoder first.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import tempfile
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

from dfield.data.dataset import Cameras, Dataset
from dfield.query import QueryError, QuerySet, click_embedding, patch_embedding
from dfield.run import Run, model_tensors, open_run
from dfield.views import ndc_of, render_camera

CACHE_FORMAT = 1  # bump when what a cached render holds, or how its key is made, changes
OPAQUE = 0.5  # a pixel belongs to the scene (not to empty space) when its rendered opacity is above this
TEXT_NEGATIVES = ("object", "things", "stuff", "texture")  # LERF's canonical phrases: generic "anything else"
MAX_CLUSTER_SAMPLES = 20000


# ------------------------------------------------------------------------------------------- render cache


@dataclass
class RenderedView:
    rgb: torch.Tensor  # (H, W, 3)
    depth: torch.Tensor  # (H, W), weighted sum of sample distances (not divided by opacity)
    acc: torch.Tensor  # (H, W) opacity
    feature: torch.Tensor  # (H, W, C) low-dim rendered features, fp16 (halves memory and disk; far below query noise)

    def tensors(self) -> dict[str, torch.Tensor]:
        return {"rgb": self.rgb, "depth": self.depth, "acc": self.acc, "feature": self.feature}


def checkpoint_key(run: Run) -> str:
    """Step plus a hash of the weights: a retrained or resumed run never reuses renders of other weights."""
    h = hashlib.sha1(f"dfield-render-cache-v{CACHE_FORMAT}".encode())
    for name, t in sorted(model_tensors(run.model).items()):
        h.update(name.encode())
        h.update(t.detach().cpu().contiguous().view(torch.uint8).numpy().tobytes())
    return f"step{run.step:06d}-{h.hexdigest()[:12]}"


def camera_key(cameras: Cameras, i: int, ndc) -> str:
    h = hashlib.sha1(f"{cameras.width}x{cameras.height}|{ndc}".encode())
    for t in (cameras.c2w[i], cameras.fx[i], cameras.fy[i], cameras.cx[i], cameras.cy[i]):
        h.update(t.detach().cpu().float().numpy().tobytes())
    return h.hexdigest()[:20]


class RenderCache:
    """Rendered views of one run's weights, by camera; `renders` counts the views actually rendered."""

    def __init__(self, run: Run, disk: bool = True):
        self.run = run
        self.memory: dict[str, RenderedView] = {}
        self.renders = 0
        self.folder = Path(run.path) / "cache" / "render" / checkpoint_key(run) if disk else None
        self._pruned = False

    def get(self, cameras: Cameras, i: int, ndc=None) -> RenderedView:
        key = camera_key(cameras, i, ndc)
        view = self.memory.get(key) or self._load(key)
        if view is None:
            view = self._render(cameras, i, ndc)
            self.renders += 1
            self._save(key, view)
        self.memory[key] = view
        return view

    def _render(self, cameras: Cameras, i: int, ndc) -> RenderedView:
        device = next(self.run.model.parameters()).device
        o = render_camera(self.run.model, cameras, i, ndc, device=device, features=True)
        return RenderedView(o["rgb"].float(), o["depth"].float(), o["acc"].float(), o["feature"].half())

    def _load(self, key: str) -> RenderedView | None:
        if self.folder is None or not (self.folder / f"{key}.safetensors").is_file():
            return None
        from safetensors.torch import load_file

        try:
            t = load_file(str(self.folder / f"{key}.safetensors"))
            return RenderedView(t["rgb"], t["depth"], t["acc"], t["feature"])
        except (OSError, KeyError, RuntimeError):
            return None  # a damaged cache file is rendered again

    def _save(self, key: str, view: RenderedView) -> None:
        if self.folder is None:
            return
        from safetensors.torch import save_file

        try:
            self.folder.mkdir(parents=True, exist_ok=True)
            if not self._pruned:  # renders of earlier checkpoints can never be hit again
                for old in self.folder.parent.iterdir():
                    if old.is_dir() and old != self.folder:
                        shutil.rmtree(old, ignore_errors=True)
                self._pruned = True
            fd, tmp = tempfile.mkstemp(dir=self.folder, prefix=f".{key}.", suffix=".tmp")
            os.close(fd)
            save_file({k: v.contiguous() for k, v in view.tensors().items()}, tmp)
            os.replace(tmp, self.folder / f"{key}.safetensors")
        except OSError:
            pass  # a read-only run folder still queries, from memory only


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
            from dfield.teachers import make_teacher

            self._teacher = make_teacher(self.run.cfg.features.teacher)
        return self._teacher

    def data(self, split: str) -> Dataset:
        """The run's dataset split (images, cameras, ground truth), read once."""
        if split not in self._data:
            from dfield.train import load_eval_data, load_train_data

            cfg = self.run.cfg
            self._data[split] = load_train_data(cfg) if split == "train" else load_eval_data(cfg, split)
        return self._data[split]

    def teacher_maps(self, split: str):
        """The teacher's own 2D feature maps of a split (FeatureMaps), from the shared feature cache."""
        if split not in self._teacher_maps:
            from dfield.teachers import cached_features
            from dfield.train import feature_cache_dir

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
    from dfield.teachers import TeacherError

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


# ---------------------------------------------------------------------------------------------- relevance


@dataclass
class Relevance:
    view: int
    probability: torch.Tensor  # (H, W) p(query | pixel), before the opacity mask
    mask: torch.Tensor  # (H, W) bool: probability above the threshold on an opaque pixel
    rendered: RenderedView


@torch.no_grad()
def view_relevance(ctx: QueryContext, query: QuerySet, cameras: Cameras, i: int, threshold: float) -> Relevance:
    r = ctx.render(cameras, i)
    p = query.probability(ctx.decode(r.feature))
    return Relevance(i, p, (p > threshold) & (r.acc > OPAQUE), r)


def relevance(run, query: QuerySet, cameras: Cameras | None = None, views=None,
              threshold: float = 0.5) -> list[Relevance]:
    """Per-view probability maps and hard masks of `query` (default: every training view). Views are rendered
    once per run and camera; later queries on them only decode and softmax."""
    ctx = context(run)
    cameras = ctx.train_cameras if cameras is None else cameras
    views = range(len(cameras)) if views is None else views
    return [view_relevance(ctx, query, cameras, int(i), threshold) for i in views]


def heatmap_image(rel: Relevance) -> np.ndarray:
    """Turbo colours of the probability, faded to white where nothing is rendered."""
    from dfield.export import turbo

    acc = rel.rendered.acc.clamp(0, 1).numpy()[..., None]
    return turbo(rel.probability.numpy()) * acc + (1 - acc)


def overlay_image(rel: Relevance, tint=(1.0, 0.1, 0.6), strength: float = 0.5) -> np.ndarray:
    """The rgb render with the selection tinted and everything else greyed out, so any object colour stands out."""
    rgb = rel.rendered.rgb.clamp(0, 1).numpy()
    m = rel.mask.numpy()[..., None].astype(np.float32)
    tinted = rgb * (1 - strength) + np.asarray(tint) * strength
    grey = 0.35 + 0.5 * (rgb @ np.array([0.299, 0.587, 0.114]))[..., None].repeat(3, -1)
    return m * tinted + (1 - m) * grey


def ndc_to_world(points: torch.Tensor, focal: float, width: int, height: int, near: float = 1.0) -> torch.Tensor:
    """Inverse of rays.to_ndc for points: NDC (x, y, z) -> the forward-facing world frame."""
    ax, ay = -2.0 * focal / width, -2.0 * focal / height
    z = 2.0 * near / (points[:, 2] - 1.0).clamp(max=-1e-6)
    return torch.stack([points[:, 0] * z / ax, points[:, 1] * z / ay, z], -1)


def selection_points(rels: list[Relevance], cameras: Cameras, ndc=None,
                     voxels: int = 512) -> tuple[torch.Tensor, torch.Tensor]:
    """Selected pixels back-projected to 3D at their rendered depth, merged over views: (N, 3) points and
    (N, 3) colours, one point per cell of a `voxels`^3 grid over their extent (views overlap a lot)."""
    from dfield.rays import camera_image_rays

    pts, cols = [], []
    for rel in rels:
        m = rel.mask.reshape(-1)
        if not m.any():
            continue
        rays = camera_image_rays(cameras, rel.view, ndc)
        r = rel.rendered
        # Depth is a weighted sum over samples; dividing by the opacity gives the expected surface distance.
        t = (r.depth / r.acc.clamp(min=1e-6)).reshape(-1)[m]
        p = rays.origins[m] + rays.directions[m] * t[:, None]
        pts.append(ndc_to_world(p, *ndc) if ndc is not None else p)
        cols.append(r.rgb.reshape(-1, 3)[m])
    if not pts:
        return torch.zeros(0, 3), torch.zeros(0, 3)
    pts, cols = torch.cat(pts), torch.cat(cols)
    lo, hi = pts.min(0).values, pts.max(0).values
    cell = ((pts - lo) / ((hi - lo).max().clamp(min=1e-9) / voxels)).long()
    _, inverse = torch.unique(cell, dim=0, return_inverse=True)
    first = torch.full((int(inverse.max()) + 1,), len(pts), dtype=torch.long).scatter_reduce(
        0, inverse, torch.arange(len(pts)), reduce="amin")
    return pts[first], cols[first].clamp(0, 1)


# ------------------------------------------------------------------------------------- evaluation (GT ids)


def iou(pred: torch.Tensor, gt: torch.Tensor) -> float | None:
    """Intersection over union of two boolean masks, pooled over all pixels (None if both are empty)."""
    pred, gt = torch.as_tensor(pred).bool(), torch.as_tensor(gt).bool()
    union = (pred | gt).sum().item()
    return None if union == 0 else (pred & gt).sum().item() / union


def inscribed_square(mask: torch.Tensor) -> tuple[int, int, int]:
    """(x, y, r) of the pixel deepest inside `mask` (H, W) by chessboard distance: the square of half-width r-1
    around it lies entirely inside. Non-convex objects (a torus) get a box on the object, not on its hole."""
    depth = torch.zeros(mask.shape, dtype=torch.long)
    inside = mask.bool().clone()
    r = 0
    while inside.any():
        r += 1
        depth[inside] = r
        # Erode by one pixel (3x3); the image border counts as outside.
        eroded = -F.max_pool2d(-inside.float()[None, None], 3, stride=1, padding=1, ceil_mode=False)[0, 0]
        eroded[[0, -1], :] = 0
        eroded[:, [0, -1]] = 0
        inside = inside & (eroded > 0.5)
    if r == 0:
        raise QueryError("empty mask has no interior")
    flat = int(depth.reshape(-1).argmax())
    return flat % mask.shape[1], flat // mask.shape[1], int(depth.reshape(-1)[flat])


def object_prompt(ids: torch.Tensor, obj: int, box_mode: str = "interior") -> dict | None:
    """The training view where object `obj` is most visible (deepest interior), a box and a click on it there."""
    best = None
    for v in range(len(ids)):
        m = ids[v] == obj
        if m.sum() == 0:
            continue
        x, y, r = inscribed_square(m)
        if best is None or (r, int(m.sum())) > best[0]:
            best = ((r, int(m.sum())), v, x, y, m)
    if best is None:
        return None
    (r, _), v, x, y, m = best
    if box_mode == "interior":
        box = (x - r + 1, y - r + 1, x + r, y + r)
    elif box_mode == "bbox":
        ys, xs = torch.nonzero(m, as_tuple=True)
        box = (int(xs.min()), int(ys.min()), int(xs.max()) + 1, int(ys.max()) + 1)
    else:
        raise QueryError(f"box mode must be 'interior' or 'bbox', got {box_mode!r}")
    return {"view": v, "box": [int(b) for b in box], "click": [int(x), int(y)]}


def teacher_query(ctx: QueryContext, spec: QuerySpec) -> QuerySet:
    """The same patch or click, answered by the teacher alone: embedding and automatic negatives from the
    teacher's own maps of the training views (what a user of the 2D model would get)."""
    maps = ctx.teacher_maps("train")
    cams = ctx.train_cameras
    size = (cams.width, cams.height)
    if spec.patch is not None:
        v, *box = spec.patch
        pos = patch_embedding(maps.view(v), box, size)[None]
    else:
        v, x, y = spec.click
        pos = click_embedding(maps.view(v), (x, y), size)[None]
    views = auto_view_ids(len(cams), spec.auto_views, [v])

    def sample():
        return subsample(torch.cat([maps.view(i).reshape(-1, maps.dim) for i in views]), MAX_CLUSTER_SAMPLES)

    return contrast_query(pos, ctx.clusters(("teacher", *views), spec.clusters, sample), spec)


@torch.no_grad()
def teacher_masks(ctx: QueryContext, query: QuerySet, split: str, threshold: float) -> torch.Tensor:
    """(N, H, W) hard masks of `query` on the teacher's maps of a split, upsampled to the images."""
    from dfield.evaluate_features import upsample_map

    data, maps = ctx.data(split), ctx.teacher_maps(split)
    return torch.stack([query.probability(upsample_map(maps.view(i), data.height, data.width)) > threshold
                        for i in range(len(data))])


def query_iou_per_object(run, box: str = "interior", split: str = "test", teacher: bool = True, **settings) -> dict:
    """For every object of a generated scene (ground included, empty space not): a patch and a click query from
    the training view where the object is most visible, scored by IoU of the hard masks on the held-out
    views against ground-truth ids, for the field and (optionally) for the teacher's own 2D maps.
    `settings` are QuerySpec fields (temperature, threshold, negatives, clusters, ...)."""
    ctx = context(run)
    train, test = ctx.data("train"), ctx.data(split)
    if train.object_ids is None or test.object_ids is None:
        raise QueryError(f"{ctx.run.cfg.data.path}: no ground-truth object ids; per-object IoU needs a generated scene")
    t0 = time.perf_counter()
    base = QuerySpec(**settings)
    gt = test.object_ids.long()
    names = {int(k): v for k, v in train.object_names.items()}
    ids = sorted(i for i in torch.unique(train.object_ids.long()).tolist() if i != 0)
    objects = {}
    for obj in ids:
        prompt = object_prompt(train.object_ids, obj, box)
        if prompt is None:
            continue
        row = {"id": obj, **prompt, "test_pixels": int((gt == obj).sum())}
        for kind, where in (("patch", (prompt["view"], *prompt["box"])), ("click", (prompt["view"], *prompt["click"]))):
            spec = QuerySpec(**{**asdict(base), kind: where})
            try:
                q = make_query(ctx, spec)
            except QueryError as e:  # e.g. the field renders empty space under the click: a failed query scores 0
                row.setdefault("errors", []).append(f"field {kind}: {e}")
                row[f"field_{kind}"] = 0.0
            else:
                masks = torch.stack([r.mask for r in relevance(ctx, q, test.cameras, threshold=spec.threshold)])
                row[f"field_{kind}"] = iou(masks, gt == obj)
            if teacher:
                masks = teacher_masks(ctx, teacher_query(ctx, spec), split, spec.threshold)
                row[f"teacher_{kind}"] = iou(masks, gt == obj)
        objects[names.get(obj, str(obj))] = row
    return {"objects": objects, "mean": mean_scores(objects), "box": box, "split": split, "views": len(test),
            "settings": asdict(base), "seconds": time.perf_counter() - t0}


def mean_scores(objects: dict) -> dict:
    """Mean of every score column over the objects (ground excluded: id 1 is the ground in generated scenes)."""
    rows = [r for r in objects.values() if r["id"] != 1]
    cols = [k for k in (rows[0] if rows else {}) if k.startswith(("field_", "teacher_"))]
    means = {}
    for c in cols:
        values = [r[c] for r in rows if r.get(c) is not None]
        means[c] = float(np.mean(values)) if values else None
    return means


# ------------------------------------------------------------------------------------------- command line


def query_cameras(ctx: QueryContext, path: str, frames: int = 48) -> Cameras:
    if path == "train":
        return ctx.train_cameras
    if path == "test":
        return ctx.data("test").cameras
    if path == "orbit":
        from dfield.camera_paths import orbit_path

        return orbit_path(ctx.train_cameras, frames)
    raise QueryError(f"unknown camera path {path!r}: expected test, train or orbit")


def run_query(run: Path, spec: QuerySpec, path: str = "test", out: Path | None = None, ply: bool = True,
              eval_objects: bool = False, frames: int = 48) -> dict:
    """What `dfield query` does: relevance on every view of `path`, written as heatmaps, overlays, masks, a PLY
    of the selected region and query.json (with per-object IoU when asked, on generated scenes)."""
    from dfield.export import save_ply, save_png

    t0 = time.perf_counter()
    ctx = context(run)
    cams = ctx.train_cameras
    validate(spec, len(cams), cams.width, cams.height)
    if eval_objects and ctx.data("train").object_ids is None:
        raise QueryError(f"{ctx.run.cfg.data.path}: --eval-objects needs ground-truth object ids (a generated scene)")
    q = make_query(ctx, spec)
    cameras = query_cameras(ctx, path, frames)
    rels = relevance(ctx, q, cameras, threshold=spec.threshold)
    selected = sum(int(r.mask.sum()) for r in rels)
    if selected == 0:
        best = max(float((r.probability * (r.rendered.acc > OPAQUE)).max()) for r in rels)
        raise QueryError(f"nothing selected: no pixel has probability above {spec.threshold} in any of the {len(rels)} "
                         f"{path} views (the highest is {best:.2f}); lower --threshold")
    evaluation = query_iou_per_object(ctx, **{k: getattr(spec, k) for k in TUNABLE}) if eval_objects else None
    out = Path(out) if out is not None else Path(ctx.run.path) / "query"
    files = []
    for r in rels:
        files.append(save_png(out / f"heatmap_{r.view:03d}.png", heatmap_image(r)))
        files.append(save_png(out / f"overlay_{r.view:03d}.png", overlay_image(r)))
        files.append(save_png(out / f"mask_{r.view:03d}.png", r.mask.numpy().astype(np.uint8) * 255))
    points = None
    if ply:
        pts, cols = selection_points(rels, cameras, ctx.ndc)
        points = len(pts)
        files.append(save_ply(out / "selection.ply", pts.numpy(), cols.numpy()))
    summary = {
        "run": str(ctx.run.path), "step": ctx.run.step, "path": path, "views": len(rels),
        "spec": asdict(spec), "positives": len(q.positives), "negatives": len(q.negatives),
        "selected_pixels": selected, "selected_fraction": [float(r.mask.float().mean()) for r in rels],
        "ply_points": points, "renders": ctx.cache.renders, "seconds": time.perf_counter() - t0,
        "objects": evaluation,
    }
    files.append(out / "query.json")
    (out / "query.json").write_text(json.dumps(summary, indent=1))
    print(f"selected {selected} pixels over {len(rels)} {path} views ({len(q.positives)} positive, "
          f"{len(q.negatives)} negative embeddings); {ctx.cache.renders} views rendered, the rest from the cache")
    if evaluation is not None:
        print(format_object_table(evaluation))
    print(f"wrote {len(files)} files to {out}")
    return summary


TUNABLE = ("negatives", "temperature", "threshold", "auto_views", "clusters", "claim")


def format_object_table(res: dict) -> str:
    cols = [c for c in ("field_patch", "teacher_patch", "field_click", "teacher_click")
            if any(c in r for r in res["objects"].values())]
    lines = [f"{'object':<18}" + "".join(f"{c:>15}" for c in cols)]
    for name, r in res["objects"].items():
        lines.append(f"{name:<18}" + "".join(f"{_fmt(r.get(c)):>15}" for c in cols))
    lines.append(f"{'mean (objects)':<18}" + "".join(f"{_fmt(res['mean'].get(c)):>15}" for c in cols))
    return "\n".join(lines)


def _fmt(v) -> str:
    return "-" if v is None else f"{v:.3f}"
