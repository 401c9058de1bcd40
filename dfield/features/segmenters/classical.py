"""The offline default segmenter (no weights): a Felzenszwalb over-segmentation merged into object-sized regions.

Felzenszwalb's graph segmentation (scikit-image) cuts the image into many small, colour-coherent pieces; adjacent
pieces are then merged greedily, most similar pair first, while their distance

    d(a, b) = sqrt( (|W (lab_a - lab_b)| / colour)^2 + (|z_a - z_b| / (depth * min(z_a, z_b)))^2
                    + ((1 - cos(f_a, f_b)) / feature)^2 )

stays below 1, with lab the mean CIELAB colour (W = diag(lightness, 1, 1); with lightness below 1 the two colour
axes are taken from the intensity-normalised image, so the lit and shaded faces of one object can merge), z the mean rendered depth and f the mean teacher feature of a piece
(each cue only where it is given). Depth keeps two same-coloured objects apart when one stands in front of the
other; teacher features keep them apart when they touch at the same depth.
"""

from __future__ import annotations

import heapq

import numpy as np
import torch
import torch.nn.functional as F
from skimage.color import rgb2lab
from skimage.segmentation import felzenszwalb

from dfield.features.segmenters.base import Segmenter, SegmentInputs, relabel


class FelzenszwalbSegmenter(Segmenter):
    """Felzenszwalb pieces merged by colour, depth and teacher features (see the module docstring for `d`).

    Args:
        scale: Felzenszwalb's scale (larger: larger pieces), in the units of a 0-255 image.
        sigma: Gaussian smoothing before the graph cut, pixels.
        min_size: smallest Felzenszwalb piece, pixels.
        colour: CIELAB distance that counts as one unit of d.
        depth: relative depth difference that counts as one unit.
        feature: cosine distance of mean teacher features that counts as one unit.
        min_area: merged regions smaller than this become 0 (their pixels keep the raw teacher features).
        lightness: weight of the CIELAB lightness difference against the two colour axes (shading changes
            lightness far more than hue).
    """

    uses_depth = True
    uses_features = True

    def __init__(self, scale: float = 100.0, sigma: float = 0.8, min_size: int = 20, colour: float = 10.0,
                 depth: float = 0.05, feature: float = 0.2, min_area: int = 16, lightness: float = 1.0):
        for key, v in (("scale", scale), ("min_size", min_size), ("colour", colour), ("depth", depth),
                       ("feature", feature), ("lightness", lightness)):
            if not v > 0:
                raise ValueError(f"felzenszwalb: {key} must be positive, got {v}")
        self.scale, self.sigma, self.min_size = float(scale), float(sigma), int(min_size)
        self.colour, self.depth, self.feature, self.min_area = float(colour), float(depth), float(feature), int(min_area)
        self.lightness = float(lightness)
        self.name = (f"felzenszwalb(scale={self.scale:g},sigma={self.sigma:g},min_size={self.min_size},"
                     f"colour={self.colour:g},depth={self.depth:g},feature={self.feature:g},min_area={self.min_area}"
                     + (f",lightness={self.lightness:g}" if self.lightness != 1.0 else "") + ")")

    def _colour(self, image: np.ndarray) -> np.ndarray:
        lab = rgb2lab(image)
        if self.lightness == 1.0:
            return lab
        # Shading scales a surface's RGB: the colour axes come from the intensity-normalised image (the brightest
        # channel at 1), so only the weighted lightness term sees how lit the surface is.
        rgb = image.astype(np.float64) / 255.0
        chroma = rgb2lab(rgb / np.maximum(rgb.max(-1, keepdims=True), 1e-3))
        return np.concatenate([lab[..., :1] * self.lightness, chroma[..., 1:]], -1)

    def segment(self, inputs: SegmentInputs) -> np.ndarray:
        """Felzenszwalb pieces of `inputs.image`, merged with whichever of depth and features `inputs` holds."""
        image = np.asarray(inputs.image)
        pieces = felzenszwalb(image, scale=self.scale, sigma=self.sigma, min_size=self.min_size)
        h, w = pieces.shape
        cues = [(self._colour(image).reshape(h * w, 3), "colour")]
        if inputs.depth is not None:
            cues.append((np.asarray(inputs.depth, np.float64).reshape(h * w, 1), "depth"))
        if inputs.features is not None:
            f = torch.as_tensor(np.asarray(inputs.features, np.float32)).permute(2, 0, 1)[None]
            f = F.interpolate(f, size=(h, w), mode="bilinear", align_corners=False)[0].permute(1, 2, 0)
            cues.append((F.normalize(f, dim=-1).reshape(h * w, -1).double().numpy(), "feature"))
        merged = merge_regions(pieces, cues, {"colour": self.colour, "depth": self.depth, "feature": self.feature})
        return relabel(merged + 1, self.min_area)


def merge_regions(labels: np.ndarray, cues: list[tuple[np.ndarray, str]], scales: dict[str, float]) -> np.ndarray:
    """Greedy merging of adjacent regions of `labels` (H, W) ints while d < 1 (module docstring).

    `cues` are (H*W, C) per-pixel values with their kind ("colour", "depth" or "feature"); region means are kept
    as running sums, so a merge costs the size of the two regions' neighbourhoods. Returns labels 0..K-1.
    """
    flat = labels.reshape(-1)
    _, flat = np.unique(flat, return_inverse=True)
    n = int(flat.max()) + 1
    count = np.bincount(flat, minlength=n).astype(np.float64)
    sums = [np.stack([np.bincount(flat, weights=v[:, c], minlength=n) for c in range(v.shape[1])], 1)
            for v, _ in cues]
    kinds = [k for _, k in cues]
    lab = flat.reshape(labels.shape)
    pairs = np.concatenate([np.stack([lab[:, 1:].ravel(), lab[:, :-1].ravel()], 1),
                            np.stack([lab[1:, :].ravel(), lab[:-1, :].ravel()], 1)])
    pairs = pairs[pairs[:, 0] != pairs[:, 1]]
    pairs = np.unique(np.sort(pairs, 1), axis=0)
    neighbours: list[set[int]] = [set() for _ in range(n)]
    for a, b in pairs.tolist():
        neighbours[a].add(b)
        neighbours[b].add(a)

    def dist(a: int, b: int) -> float:
        total = 0.0
        for s, kind in zip(sums, kinds):
            ma, mb = s[a] / count[a], s[b] / count[b]
            if kind == "colour":
                d = np.linalg.norm(ma - mb) / scales["colour"]
            elif kind == "depth":
                near = max(min(ma[0], mb[0]), 1e-6)
                d = abs(ma[0] - mb[0]) / (scales["depth"] * near)
            else:
                cos = float(ma @ mb) / max(np.linalg.norm(ma) * np.linalg.norm(mb), 1e-12)
                d = (1.0 - cos) / scales["feature"]
            total += d * d
        return total**0.5

    version = [0] * n
    heap = [(dist(a, b), a, b, 0, 0) for a, b in pairs.tolist()]
    heapq.heapify(heap)
    parent = list(range(n))
    while heap:
        d, a, b, va, vb = heapq.heappop(heap)
        if d >= 1.0:
            break
        if parent[a] != a or parent[b] != b or version[a] != va or version[b] != vb:
            continue  # stale: one side has merged since this distance was computed
        parent[b] = a  # b joins a
        count[a] += count[b]
        for s in sums:
            s[a] += s[b]
        neighbours[a] |= neighbours[b]
        neighbours[a] -= {a, b}
        for c in neighbours[b]:
            neighbours[c].discard(b)
            if c != a:
                neighbours[c].add(a)
        neighbours[b] = set()
        version[a] += 1
        for c in neighbours[a]:
            heapq.heappush(heap, (dist(a, c), a, c, version[a], version[c]) if a < c else
                           (dist(c, a), c, a, version[c], version[a]))

    def root(i: int) -> int:
        while parent[i] != i:
            parent[i] = parent[parent[i]]
            i = parent[i]
        return i

    roots = np.array([root(i) for i in range(n)])
    _, compact = np.unique(roots, return_inverse=True)
    return compact[flat].reshape(labels.shape).astype(np.int32)
