"""Automatic negatives: the scene's rendered features clustered by cosine similarity (spherical k-means), and the
clusters unlike a query's positives taken as its negatives, all measured from the scene's centre."""

from __future__ import annotations

import torch
import torch.nn.functional as F

from dfield.query.sets import QuerySet
from dfield.query.spec import QuerySpec

MAX_CLUSTER_SAMPLES = 20000


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


def scene_clusters(sample: torch.Tensor, k: int) -> tuple[torch.Tensor, torch.Tensor]:
    """(centre, (K, D) cluster means) of a sample of the scene's features, clustered by cosine similarity.

    Dense features share a large common component, so cosines are compared from a centre. The centre is the
    mean of the cluster means, not of the pixels: pixels are mostly floor or wall, and measured from their
    mean every object looks alike (on a generated scene with DINOv2 features this halves per-object IoU).
    Clusters come largest first (in the sample), so cluster numbers in maps and legends read from the dominant surfaces down."""
    x = sample.float()
    assign = (F.normalize(x, dim=-1) @ spherical_kmeans(x, k).T).argmax(1)
    ids, counts = assign.unique(return_counts=True)
    order = ids[torch.argsort(counts, descending=True, stable=True)]
    means = torch.stack([x[assign == j].mean(0) for j in order])
    return means.mean(0), means


def nearest_cluster(features: torch.Tensor, clusters: tuple[torch.Tensor, torch.Tensor]) -> torch.Tensor:
    """(...) index of each (..., D) feature's most similar cluster mean, by cosine measured from the scene's centre
    (the same similarity the clusters were made with)."""
    center, means = clusters
    f = F.normalize(features.float() - center, dim=-1)
    return (f @ F.normalize(means - center, dim=-1).T).argmax(-1)


def contrast_query(positives: torch.Tensor, clusters: tuple[torch.Tensor, torch.Tensor], spec: QuerySpec) -> QuerySet:
    """Automatic negatives: the scene's feature clusters unlike the positives, all measured from the scene's centre."""
    center, means = clusters
    negatives = far_clusters(means, positives, center, spec.claim)
    return QuerySet(positives, negatives, temperature=spec.temperature, center=center)


def auto_view_ids(n: int, k: int, extra: list[int]) -> list[int]:
    """`k` view ids spread evenly over 0..n-1 (first and last included; at most n) plus `extra`, sorted, no repeats.

    Example:
        >>> auto_view_ids(10, 4, [5])
        [0, 3, 5, 6, 9]
    """
    spread = torch.linspace(0, n - 1, max(1, min(k, n))).round().long().tolist()
    return sorted(set(spread) | set(extra))


def subsample(x: torch.Tensor, limit: int) -> torch.Tensor:
    """`x` itself when it has at most `limit` rows, else `limit` of its rows picked at random with a fixed seed."""
    if len(x) <= limit:
        return x
    return x[torch.randperm(len(x), generator=torch.Generator().manual_seed(0))[:limit]]
