"""Features computed elsewhere: one file per image, matched to the dataset's images by file name.

For an image `.../train/r_3.png` the teacher reads, first match wins:
  <folder>/train/r_3.npy, <folder>/train/r_3.safetensors, <folder>/r_3.npy, <folder>/r_3.safetensors
(the split-folder form tells apart Blender scenes whose splits reuse names). Each file holds one
(h, w, D) array, channels last; a .safetensors file keeps it under the key "features". Every file
must have the same shape. The map is taken to cover the whole image (cell centres evenly spread).
"""

from __future__ import annotations

import hashlib
from pathlib import Path

import numpy as np
import torch
from safetensors import safe_open

from dfield.data.dataset import Dataset
from dfield.errors import TeacherError
from dfield.features.teachers.base import Teacher

SUFFIXES = (".npy", ".safetensors")
KEY = "features"


def _shape(path: Path) -> tuple[int, ...]:
    try:
        if path.suffix == ".npy":
            return tuple(np.load(path, mmap_mode="r").shape)
        with safe_open(str(path), framework="pt") as f:
            if KEY not in f.keys():
                raise TeacherError(f"{path}: no tensor named {KEY!r} (found {', '.join(f.keys()) or 'none'})")
            return tuple(f.get_slice(KEY).get_shape())
    except TeacherError:
        raise
    except Exception as e:
        raise TeacherError(f"{path}: cannot read features ({e})") from None


def _read(path: Path) -> torch.Tensor:
    try:
        if path.suffix == ".npy":
            return torch.from_numpy(np.asarray(np.load(path), dtype=np.float32))
        with safe_open(str(path), framework="pt") as f:
            return f.get_tensor(KEY).float()
    except Exception as e:
        raise TeacherError(f"{path}: cannot read features ({e})") from None


class FileTeacher(Teacher):
    def __init__(self, folder, text_aligned: bool = False):
        self.folder = Path(folder).expanduser()
        if not self.folder.is_dir():
            raise TeacherError(f"feature folder {self.folder} does not exist")
        self.name = f"files:{self.folder.resolve()}"
        self.text_aligned = text_aligned  # no text encoder here either way; informs what queries make sense
        self._dim: int | None = None
        first = next((p for s in SUFFIXES for p in sorted(self.folder.rglob(f"*{s}"))), None)
        if first is None:
            raise TeacherError(f"feature folder {self.folder} has no .npy or .safetensors files")
        shape = _shape(first)
        if len(shape) != 3:
            raise TeacherError(f"{first}: features must be (h, w, D), got shape {shape}")
        self._dim = shape[-1]

    @property
    def dim(self) -> int:
        return self._dim

    def file_for(self, image_path) -> Path:
        """The feature file of one image (see the module docstring for the names tried); TeacherError if none."""
        p = Path(image_path)
        tried = [self.folder / p.parent.name / f"{p.stem}{s}" for s in SUFFIXES] if p.parent.name else []
        tried += [self.folder / f"{p.stem}{s}" for s in SUFFIXES]
        for t in tried:
            if t.is_file():
                return t
        raise TeacherError(f"no feature file for image {p}: looked for {', '.join(str(t) for t in tried)}")

    def files(self, data: Dataset, idx=None) -> list[Path]:
        """The feature files of the views `idx` of `data` (default: all), in that order."""
        idx = range(len(data)) if idx is None else idx
        return [self.file_for(data.image_paths[i]) for i in idx]

    def cache_token(self, data: Dataset) -> bytes:
        h = hashlib.sha1()
        for f in self.files(data):
            st = f.stat()
            h.update(f"{f.resolve()}|{st.st_size}|{st.st_mtime_ns}\n".encode())
        return h.digest()

    def encode(self, images, object_ids=None):
        raise TeacherError("the files teacher reads features by image file name; "
                           "use cached_features(teacher, dataset, cache_dir)")

    def encode_views(self, data: Dataset, idx) -> torch.Tensor:
        paths = self.files(data, idx)
        ref = self.file_for(data.image_paths[0])
        ref_shape = _shape(ref)
        out = []
        for p in paths:
            s = _shape(p)
            if len(s) != 3:
                raise TeacherError(f"{p}: features must be (h, w, D), got shape {s}")
            if s[-1] != self.dim:
                raise TeacherError(f"{p}: features have D={s[-1]} but other files have D={self.dim}")
            if s != ref_shape:
                raise TeacherError(f"{p}: features are {s} but {ref} is {ref_shape}; every file must have one shape")
            out.append(_read(p))
        return torch.stack(out)
