"""Queries on a trained feature field: a text, a patch or a click -> per-view relevance, masks and a 3D selection.

Rendering is the slow part (seconds per view on a CPU), a query is not: the relevance of a pixel is a
softmax over the dot products of its decoded feature with the query set (dfield.query.sets). So every
rendered view keeps its low-dimensional features (plus rgb, depth and opacity), in memory and on disk
(dfield.query.render_cache), and a new query on an already rendered view costs one decode and one softmax.

    q = make_query("runs/toy", QuerySpec(patch=(3, 40, 40, 60, 60)))   # a box on training view 3
    maps = relevance("runs/toy", q)                                    # every training view
    maps[0].probability, maps[0].mask                                  # (H, W) each

Everything is compared in teacher space: rendered features go through the run's decoder first. This module
builds query sets; dfield.query.relevance turns them into per-view maps, dfield.query.outputs into images and
points, dfield.query.evaluation scores them against ground truth.
"""

from __future__ import annotations

import torch

from dfield.errors import QueryError, TeacherError
from dfield.query.clusters import MAX_CLUSTER_SAMPLES, auto_view_ids, contrast_query, subsample
from dfield.query.context import QueryContext, context
from dfield.query.sets import QuerySet, click_region, patch_embedding
from dfield.query.spec import OPAQUE, TEXT_NEGATIVES, QuerySpec, query_views, validate


def encode_texts(teacher, texts) -> torch.Tensor:
    """(T, D) float32 embeddings of `texts` in the teacher's space; QueryError if the teacher has no text encoder."""
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


def field_click_embedding(ctx: QueryContext, view: int, xy, radius: float = 0.0) -> torch.Tensor:
    """(D,) decoded feature the field renders under a click (x, y) in pixels of training view `view`: the mean over
    the click's `click_region` (`radius`: fraction of the image's longer side; 0: the one pixel); QueryError when the
    pixel is empty space (opacity at most OPAQUE)."""
    r = ctx.train_view(view)
    h, w = r.acc.shape
    x, y = int(xy[0] * w / ctx.train_cameras.width), int(xy[1] * h / ctx.train_cameras.height)
    if r.acc[y, x] <= OPAQUE:
        raise QueryError(f"click {tuple(xy)} on view {view} hits empty space (nothing is rendered there)")
    mask = click_region(r.acc, r.depth / r.acc.clamp(min=1e-6), x, y, radius)
    return ctx.decode(r.feature[mask].float()).mean(0)


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
        positives.append(field_click_embedding(ctx, v, (x, y), spec.click_radius)[None])
    views = auto_view_ids(len(cams), spec.auto_views, query_views(spec))
    scene = lambda: ctx.clusters(("field", *views), spec.clusters, lambda: field_feature_sample(ctx, views))  # noqa: E731
    if spec.cluster is not None:
        means = scene()[1]
        if spec.cluster >= len(means):
            raise QueryError(f"cluster {spec.cluster} is empty: only {len(means)} of the {spec.clusters} clusters hold "
                             f"features (0..{len(means) - 1})")
        positives.append(means[spec.cluster][None])
    pos = torch.cat(positives)
    negatives = spec.negatives
    if negatives is None:
        negatives = "auto" if spec.patch is not None or spec.click is not None or spec.cluster is not None \
            else list(TEXT_NEGATIVES)
    if negatives == "auto":
        return contrast_query(pos, scene(), spec)
    texts = [str(t) for t in negatives if str(t).strip()]
    neg = encode_texts(ctx.teacher, texts) if texts else torch.zeros(0, pos.shape[1])
    return QuerySet(pos, neg, temperature=spec.temperature)
