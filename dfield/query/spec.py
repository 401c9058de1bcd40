"""What a query asks (`QuerySpec`: texts, a box or a click on a training view, negatives, temperature,
threshold) and the checks that need no rendering, so bad input fails before any work is done."""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np

from dfield.errors import QueryError

OPAQUE = 0.5  # a pixel belongs to the scene (not to empty space) when its rendered opacity is above this
TEXT_NEGATIVES = ("object", "things", "stuff", "texture")  # LERF's canonical phrases: generic "anything else"


@dataclass
class QuerySpec:
    """What a query asks: positives (texts, a patch or a click on a training view), negatives, and how they are
    scored (temperature, threshold, patch source, automatic-negative clustering)."""

    text: list[str] = field(default_factory=list)
    """Positives by text (needs a text-aligned teacher such as clip)."""
    patch: tuple[int, int, int, int, int] | None = None
    """(view, x0, y0, x1, y1): a box in pixels of training view `view`; the positive is its mean feature."""
    click: tuple[int, int, int] | None = None
    """(view, x, y): a click on training view `view`; the positive is the mean feature of the pixels around it
    that show the same surface (`click_radius`)."""
    cluster: int | None = None
    """K: the K-th of the scene's feature clusters (k-means of the field's features, `clusters` of them) is the
    positive: the DFF paper's cluster selection. `dfield query --cluster K` also writes the cluster maps."""
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
    click_radius: float = 0.06
    """A click stands for the opaque pixels within this fraction of the image's longer side whose depth is within
    5 % of the clicked pixel's (0: that one pixel). One pixel's feature is noise-prone: on generated scenes the
    mean over such a neighbourhood lifted the 3D click IoU from 0.589 to 0.701 (seed 1) and 0.689 to 0.792 (seed 0)."""


def check_view(i: int, n: int) -> None:
    """Raise QueryError unless `i` is an integer training-view index in 0..n-1."""
    if not (isinstance(i, (int, np.integer)) and 0 <= i < n):
        raise QueryError(f"view {i} is out of range: the run has {n} training views (0..{n - 1})")


def validate(spec: QuerySpec, n_views: int, width: int, height: int) -> None:
    """Every check that needs no rendering, so bad input fails before any work is done."""
    if not (spec.text or spec.patch is not None or spec.click is not None or spec.cluster is not None):
        raise QueryError("empty query: give a text (--text), a patch (--patch VIEW X0 Y0 X1 Y1), "
                         "a click (--click VIEW X Y) or a cluster (--cluster K)")
    if spec.cluster is not None and not (isinstance(spec.cluster, (int, np.integer)) and 0 <= spec.cluster < spec.clusters):
        raise QueryError(f"cluster {spec.cluster} is out of range: the scene is split into {spec.clusters} clusters "
                         f"(0..{spec.clusters - 1}; --clusters N to change)")
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


def query_views(spec: QuerySpec) -> list[int]:
    """The training views the query's patch and click are on (none for a text-only query)."""
    return [q[0] for q in (spec.patch, spec.click) if q is not None]
