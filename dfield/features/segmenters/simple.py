"""Segmenters that need no model: the ground truth of generated scenes (`gt`, to test smoothing without a
segmenter's errors) and the user's own masks (`files:DIR`).
"""

from __future__ import annotations

import hashlib
from pathlib import Path

import numpy as np
from PIL import Image

from dfield.errors import DataError
from dfield.features.segmenters.base import Segmenter, SegmentInputs, masks_to_labels, relabel


class TruthSegmenter(Segmenter):
    """One region per ground-truth id (background, ground and each object): the upper bound of segment smoothing."""

    uses_object_ids = True
    name = "gt"

    def segment(self, inputs: SegmentInputs) -> np.ndarray:
        """The view's object ids as labels 1..K (every pixel in some region)."""
        if inputs.object_ids is None:
            raise DataError("the gt segmenter needs ground-truth object ids; only generated scenes have them")
        return relabel(np.asarray(inputs.object_ids).astype(np.int64) + 1)


class FileSegmenter(Segmenter):
    """Masks made elsewhere, one file per image, matched by file name (first match wins, as for file teachers):
    <folder>/<split>/<stem>.png|.npy, then <folder>/<stem>.png|.npy.

    A .png is a label image (8 or 16 bit; 0 = under no mask); a .npy holds either an (H, W) label map or (M, H, W)
    boolean masks, which may overlap (the smallest wins, `masks_to_labels`). Sizes must match the images.
    """

    def __init__(self, folder):
        self.folder = Path(folder).expanduser()
        if not self.folder.is_dir():
            raise DataError(f"{self.folder}: mask folder not found")
        self.name = f"files({self.folder.resolve()})"

    def _file(self, image_path: str) -> Path:
        p = Path(image_path)
        for base in (self.folder / p.parent.name, self.folder):
            for suffix in (".png", ".npy"):
                if (base / f"{p.stem}{suffix}").is_file():
                    return base / f"{p.stem}{suffix}"
        raise DataError(f"{self.folder}: no mask file for image {p.name} (looked for {p.parent.name}/{p.stem}.png|.npy "
                        f"and {p.stem}.png|.npy)")

    def segment(self, inputs: SegmentInputs) -> np.ndarray:
        """The labels stored for `inputs.path`."""
        f = self._file(inputs.path)
        try:
            a = np.asarray(Image.open(f)) if f.suffix == ".png" else np.load(f)
        except Exception as e:
            raise DataError(f"{f}: cannot read masks ({e})") from None
        h, w = inputs.image.shape[:2]
        if a.ndim == 3 and a.dtype == bool and a.shape[1:] == (h, w):
            return masks_to_labels(a)
        if a.ndim != 2 or a.shape != (h, w) or not np.issubdtype(a.dtype, np.integer):
            raise DataError(f"{f}: expected an integer ({h}, {w}) label map or boolean (M, {h}, {w}) masks, "
                            f"got {a.dtype} {a.shape}")
        return relabel(a.astype(np.int64))

    def cache_token(self) -> bytes:
        """Sizes and times of the mask files, so edited masks are read again."""
        h = hashlib.sha1()
        for f in sorted(self.folder.rglob("*")):
            if f.suffix in (".png", ".npy"):
                st = f.stat()
                h.update(f"{f}\0{st.st_size}\0{st.st_mtime_ns}\0".encode())
        return h.digest()
