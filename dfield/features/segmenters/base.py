"""The segmenter interface: an image (and, where a segmenter wants them, its depth, teacher features or the
ground-truth ids) in, an int32 label map out, 0 meaning "under no mask".

Adding a segmenter:

    from dfield.features.segmenters import Segmenter, register_segmenter

    class MySegmenter(Segmenter):
        def __init__(self, k=8):
            self.name = f"mine(k={k})"         # every setting that changes the output goes in here
            self.k = k
        def segment(self, inputs):             # SegmentInputs -> int32 (H, W)
            ...

    register_segmenter("mine", MySegmenter)    # then --features.smooth segments:mine:k=4
"""

from __future__ import annotations

import contextlib
import sys
import types
from dataclasses import dataclass

import numpy as np


@dataclass
class SegmentInputs:
    """What a segmenter may look at for one view: the image, and optionally depth, teacher features and true ids."""

    image: np.ndarray  # uint8 (H, W, 3)
    depth: np.ndarray | None = None  # float32 (H, W), rendered depth; None for input photos
    features: np.ndarray | None = None  # float32 (h, w, D) teacher features of this view, any resolution
    object_ids: np.ndarray | None = None  # int (H, W) ground truth (generated scenes only)
    index: int = 0  # the view's position in its dataset (file-backed segmenters look masks up by it)
    path: str = ""  # the view's image file, when it has one


class Segmenter:
    """Base class: set `name` (a stable id holding every output-changing setting) and implement `segment`."""

    name: str = "segmenter"
    uses_depth: bool = False  # the cache key then includes the depth maps
    uses_features: bool = False  # ... the teacher features
    uses_object_ids: bool = False  # ... the ground-truth ids

    def segment(self, inputs: SegmentInputs) -> np.ndarray:
        """One view -> int32 (H, W) labels: 1..K for K regions, 0 for pixels under no mask."""
        raise NotImplementedError

    def cache_token(self) -> bytes:
        """Extra bytes for the cache key beyond the name and the inputs (e.g. source-file stamps)."""
        return b""

    def __repr__(self) -> str:
        return f"<{type(self).__name__} {self.name}>"


def masks_to_labels(masks: np.ndarray, min_area: int = 0) -> np.ndarray:
    """Possibly overlapping boolean masks (M, H, W) -> int32 (H, W) labels 1..M' (0: no mask).

    Larger masks are painted first, so where masks overlap the smallest wins (a part inside a whole keeps its
    own label, as in SAM's "segment everything" views). Masks with fewer than `min_area` pixels of their own
    left are dropped, and labels are renumbered without gaps.

    Example:
        >>> m = np.zeros((2, 2, 3), bool); m[0] = True; m[1, 0, 0] = True
        >>> masks_to_labels(m).tolist()
        [[2, 1, 1], [1, 1, 1]]
    """
    masks = np.asarray(masks, dtype=bool)
    if masks.ndim != 3:
        raise ValueError(f"masks must be (M, H, W), got shape {masks.shape}")
    order = np.argsort(-masks.reshape(len(masks), -1).sum(1), kind="stable")

    def paint(order):
        labels = np.zeros(masks.shape[1:], np.int32)
        for k, m in enumerate(order, start=1):
            labels[masks[m]] = k
        return labels

    labels = paint(order)
    if min_area > 0:  # a dropped mask's pixels fall to the mask under it (removing one only grows the others)
        own = np.bincount(labels.ravel(), minlength=len(order) + 1)[1:]
        labels = paint(order[own >= min_area])
    return relabel(labels)


def relabel(labels: np.ndarray, min_area: int = 0) -> np.ndarray:
    """Labels with regions below `min_area` pixels set to 0 and the rest renumbered 1..K in order of first label.

    Example:
        >>> relabel(np.array([[5, 5, 9], [0, 5, 9]]), min_area=2).tolist()
        [[1, 1, 2], [0, 1, 2]]
    """
    labels = np.asarray(labels)
    ids, counts = np.unique(labels, return_counts=True)
    keep = ids[(ids != 0) & (counts >= max(1, min_area))]
    lut = np.zeros(int(labels.max()) + 1 if labels.size else 1, np.int32)
    lut[keep] = np.arange(1, len(keep) + 1, dtype=np.int32)
    return lut[np.clip(labels, 0, None)]


@contextlib.contextmanager
def stand_in_modules(modules: dict[str, types.ModuleType]):
    """Importable stand-ins for the few functions an optional package takes from a module that cannot be imported
    here (torchvision, timm: they need a torchvision that does not import beside dfield's torch). They are in
    `sys.modules` only while the block runs and never replace a module that is already there, so nothing imported
    later mistakes them for the real thing.

    Example:
        >>> fake = types.ModuleType("no_such_pkg"); fake.answer = 42
        >>> with stand_in_modules({"no_such_pkg": fake}):
        ...     import no_such_pkg
        >>> no_such_pkg.answer, "no_such_pkg" in sys.modules
        (42, False)
    """
    added = {k: v for k, v in modules.items() if k not in sys.modules}
    sys.modules.update(added)
    try:
        yield
    finally:
        for name in added:
            sys.modules.pop(name, None)
