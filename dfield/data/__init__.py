"""Data: the scene type every layer reads (`Dataset`, `Cameras`), the readers that produce it (Blender/nerfstudio,
LLFF, COLMAP), procedural scenes with ground-truth object ids, and camera pose helpers.

The bottom layer: it imports only `dfield.errors`.

    from dfield.data import load_dataset
    data = load_dataset("data/lego", "train", downscale=4)   # a Dataset: images (N, H, W, 3) uint8, cameras, bounds
"""

from dfield.data.dataset import Cameras, Dataset
from dfield.data.load import load_dataset
from dfield.errors import DataError

__all__ = ["Cameras", "DataError", "Dataset", "load_dataset"]
