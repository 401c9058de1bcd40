"""2D segmenters that cut each view into object-sized regions, their registry and their disk cache; the masks
steer feature smoothing (dfield.features.smoothing): teacher features are blurred inside a region, never across
its edge.

    from dfield.features.segmenters import make_segmenter, cached_segments, segment_cache_dir
    seg = make_segmenter("felzenszwalb:scale=200")    # or "litemedsam", "gt", "files:<folder>"
    labels = cached_segments(seg, images, segment_cache_dir())   # int32 (N, H, W); 0 = under no mask

Every segmenter returns a label map per image (masks that overlap are resolved smallest-first by
`masks_to_labels`). The LiteMedSAM back end loads only when it first runs.
"""

from dfield.features.segmenters.base import Segmenter, SegmentInputs, masks_to_labels
from dfield.features.segmenters.cache import cached_segments, segment_cache_dir
from dfield.features.segmenters.registry import make_segmenter, register_segmenter, segmenter_names

__all__ = ["SegmentInputs", "Segmenter", "cached_segments", "make_segmenter", "masks_to_labels",
           "register_segmenter", "segment_cache_dir", "segmenter_names"]
