"""Queries: from a text, an image patch or a click to a query embedding, and from embeddings to a selection.

As in the DFF paper, each feature x gets p(query | x) = softmax over its dot products with every query
of a set (positives and negatives/background) at a temperature, and the probability of the positives is
the soft selection; a cosine threshold on one positive is the simple alternative.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path

import torch
import torch.nn.functional as F

from dfield.errors import QueryError
from dfield.io.atomic import atomic_write_text
from dfield.query.spec import OPAQUE


@dataclass
class QuerySet:
    """Positive and negative query embeddings in one feature space, and how features are scored against them
    (softmax temperature, cosine or raw dot products, an optional common centre): see `probability`."""

    positives: torch.Tensor  # (P, D)
    negatives: torch.Tensor = field(default_factory=lambda: torch.zeros(0, 0))  # (Q, D)
    temperature: float = 0.1
    normalize: bool = True
    center: torch.Tensor | None = None
    """(D,) point every feature and query is measured from (e.g. the scene's mean feature). Dense features share a
    large common component; without removing it every cosine is close to 1 and nothing stands out."""

    def __post_init__(self):
        self.positives = torch.as_tensor(self.positives, dtype=torch.float32).reshape(-1, self.positives.shape[-1])
        if len(self.positives) == 0:
            raise QueryError("a query set needs at least one positive query")
        if self.negatives.numel() == 0:
            self.negatives = self.positives.new_zeros(0, self.positives.shape[1])
        if self.negatives.shape[1] != self.positives.shape[1]:
            raise QueryError(f"negatives have {self.negatives.shape[1]} dims, positives {self.positives.shape[1]}")
        if self.temperature <= 0:
            raise QueryError(f"temperature must be > 0, got {self.temperature}")

    def probability(self, features: torch.Tensor) -> torch.Tensor:
        """(..., D) features -> (...) probability that each matches one of the positives."""
        q = torch.cat([self.positives, self.negatives]).to(features)
        f = features
        if self.center is not None:
            c = torch.as_tensor(self.center).to(features)
            f, q = f - c, q - c
        if self.normalize:
            f, q = F.normalize(f, dim=-1), F.normalize(q, dim=-1)
        p = torch.softmax(f @ q.T / self.temperature, dim=-1)
        return p[..., : len(self.positives)].sum(-1)


def cosine_selection(features: torch.Tensor, query: torch.Tensor, threshold: float) -> torch.Tensor:
    """Hard selection: cosine similarity to `query` (D,) at least `threshold`."""
    sim = F.normalize(features, dim=-1) @ F.normalize(query.to(features), dim=0)
    return sim >= threshold


def patch_embedding(feature_map: torch.Tensor, box: tuple[float, float, float, float], image_size: tuple[int, int]) -> torch.Tensor:
    """Mean feature inside a box (x0, y0, x1, y1) given in image pixels; the map may be coarser than the image.

    A box that falls between feature cells still takes the cell it lies in, so tiny boxes work.
    """
    h, w = feature_map.shape[:2]
    width, height = image_size
    x0, y0, x1, y1 = box
    if not (0 <= x0 < x1 <= width and 0 <= y0 < y1 <= height):
        raise QueryError(f"box {box} is not inside the {width}x{height} image (x0 < x1, y0 < y1 needed)")
    c0, c1 = int(x0 * w / width), max(int(x0 * w / width) + 1, round(x1 * w / width))
    r0, r1 = int(y0 * h / height), max(int(y0 * h / height) + 1, round(y1 * h / height))
    return feature_map[r0:r1, c0:c1].reshape(-1, feature_map.shape[-1]).float().mean(0)


def click_embedding(feature_map: torch.Tensor, xy: tuple[float, float], image_size: tuple[int, int]) -> torch.Tensor:
    """The feature under a click (x, y) in image pixels."""
    width, height = image_size
    x, y = xy
    if not (0 <= x < width and 0 <= y < height):
        raise QueryError(f"click ({x}, {y}) is outside the {width}x{height} image")
    h, w = feature_map.shape[:2]
    return feature_map[int(y * h / height), int(x * w / width)].float()


def click_region(acc: torch.Tensor, depth: torch.Tensor, x: int, y: int, radius: float,
                 tolerance: float = 0.05) -> torch.Tensor:
    """(H, W) mask of the pixels a click on pixel (x, y) stands for: opaque (`acc` > OPAQUE), within `radius` x the
    longer image side of it (a square), and at a depth (`depth`: opacity-normalised, (H, W)) within `tolerance` of the
    clicked pixel's, so a click near an edge does not take in what lies behind. Always holds (x, y) when it is opaque.

    Example:
        >>> acc = torch.ones(5, 5); depth = torch.ones(5, 5); depth[:, 3:] = 2.0   # a step in depth at column 3
        >>> click_region(acc, depth, 1, 2, radius=0.4).int()
        tensor([[1, 1, 1, 0, 0],
                [1, 1, 1, 0, 0],
                [1, 1, 1, 0, 0],
                [1, 1, 1, 0, 0],
                [1, 1, 1, 0, 0]], dtype=torch.int32)
    """
    h, w = acc.shape
    r = int(round(radius * max(h, w)))
    mask = torch.zeros(h, w, dtype=torch.bool)
    if acc[y, x] <= OPAQUE:
        return mask
    ys, xs = slice(max(0, y - r), y + r + 1), slice(max(0, x - r), x + r + 1)
    d0 = depth[y, x]
    mask[ys, xs] = (acc[ys, xs] > OPAQUE) & ((depth[ys, xs] - d0).abs() <= tolerance * d0.abs())
    mask[y, x] = True
    return mask


def query_set_dict(q: QuerySet) -> dict:
    """A QuerySet as JSON-able lists (what `save_query_set` writes)."""
    return {"positives": q.positives.tolist(), "negatives": q.negatives.tolist(), "temperature": q.temperature,
            "normalize": q.normalize, "center": None if q.center is None else torch.as_tensor(q.center).tolist()}


def save_query_set(path, q: QuerySet) -> Path:
    """Write a query set as JSON (positives, negatives, temperature, centre), atomically: a query made in the
    viewer becomes a file an edit spec can name (`select: {query: FILE}`)."""
    atomic_write_text(Path(path), json.dumps(query_set_dict(q)))
    return Path(path)


def load_query_set(path) -> QuerySet:
    """Read a query set written by `save_query_set`; QueryError naming the file when it is not one."""
    path = Path(path)
    try:
        d = json.loads(path.read_text())
        pos = torch.tensor(d["positives"], dtype=torch.float32)
        neg = torch.tensor(d.get("negatives") or [], dtype=torch.float32).reshape(-1, pos.shape[-1])
        center = None if d.get("center") is None else torch.tensor(d["center"], dtype=torch.float32)
        return QuerySet(pos, neg, temperature=float(d.get("temperature", 0.1)), normalize=bool(d.get("normalize", True)),
                        center=center)
    except FileNotFoundError:
        raise QueryError(f"{path}: query file not found") from None
    except (ValueError, KeyError, TypeError, RuntimeError, IndexError) as e:
        raise QueryError(f"{path}: not a dfield query file ({type(e).__name__}: {e})") from None
