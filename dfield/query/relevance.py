"""Per-view relevance of a query: every pixel's probability of matching it, and the hard mask of opaque pixels
above the threshold. Views are rendered once (the render cache); a new query only decodes and softmaxes."""

from __future__ import annotations

from dataclasses import dataclass

import torch

from dfield.data.dataset import Cameras
from dfield.query.context import QueryContext, context
from dfield.query.render_cache import RenderedView
from dfield.query.sets import QuerySet
from dfield.query.spec import OPAQUE


@dataclass
class Relevance:
    """A query's relevance on one view: per-pixel probability, hard mask and the rendered view it came from."""

    view: int
    probability: torch.Tensor  # (H, W) p(query | pixel), before the opacity mask
    mask: torch.Tensor  # (H, W) bool: probability above the threshold on an opaque pixel
    rendered: RenderedView


@torch.no_grad()
def view_relevance(ctx: QueryContext, query: QuerySet, cameras: Cameras, i: int, threshold: float) -> Relevance:
    """Relevance of `query` on camera `i` (rendered once, then from the render cache): p(query | pixel) of the
    decoded features, and the mask of opaque pixels above `threshold`."""
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
