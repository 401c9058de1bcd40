"""Decoded images kept once on disk and memory-mapped, so a scene's pixels never all sit in a process's memory.

A reader decodes each image once into one uint8 `.npy` array under `$DFIELD_CACHE_DIR/images/` (default
`~/.cache/dfield/images`; `$DFIELD_IMAGE_STORE` moves it alone), keyed by the image files (path, size, modification time) and the decoding settings;
every later load of the same scene maps that file instead of decoding again. The array is written with plain file
writes, one image at a time (a memory map being written would count every page in the writer's memory), and
published by a rename, so a crash never leaves half an array under the final name.

Reading a mapped array brings its pages into the process's resident memory, where they stay until the kernel needs
them back; a training loop that samples random pixels of every image would end up with all of them resident.
`release` hands them back (they stay in the page cache, so the next read is a minor fault). The ray batcher and the
teacher maps call `trim` after every draw: it releases the pages of arrays larger than `RESIDENT_BUDGET_BYTES`
($DFIELD_RESIDENT_MB, 64 MiB), so what stays resident is at most that much or one batch's pages (the kernel maps up
to 64 KiB around each page it reads in: about 40 MiB for 1024 random pixels), whatever the number of images, and
arrays that fit the budget keep their pages (releasing costs 2 ms and re-reading 3 ms per 1024 random pixels).

    images = stored_stack(paths, (n, h, w, 3), np.uint8, decode, "rgb x4 white")   # (n, h, w, 3) uint8 tensor
    release(images)                                                                # drop its resident pages
"""

from __future__ import annotations

import errno
import hashlib
import mmap
import os
import shutil
import tempfile
import warnings
import weakref
from collections.abc import Callable, Sequence
from pathlib import Path

import numpy as np
import torch

from dfield.errors import DataError, DfieldError

STORE_FORMAT = 1  # bump when the layout or the key recipe changes

RESIDENT_BUDGET_BYTES = int(float(os.environ.get("DFIELD_RESIDENT_MB", "64")) * 2**20)
"""Mapped arrays up to this size keep their pages resident between `trim` calls."""

# start address of each mapped array's data -> (end address, weak reference to the np.memmap owning the mapping)
_MAPPED: dict[int, tuple[int, weakref.ref]] = {}


def default_cache_dir() -> Path:
    """$DFIELD_CACHE_DIR, else $XDG_CACHE_HOME/dfield, else ~/.cache/dfield: where dfield keeps what it can make
    again (decoded images, teacher features, masks, converted model files)."""
    if os.environ.get("DFIELD_CACHE_DIR"):
        return Path(os.environ["DFIELD_CACHE_DIR"]).expanduser()
    base = os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache"
    return Path(base).expanduser() / "dfield"


def image_store_dir() -> Path:
    """Where decoded images are kept: $DFIELD_IMAGE_STORE, else `default_cache_dir() / "images"`."""
    if os.environ.get("DFIELD_IMAGE_STORE"):
        return Path(os.environ["DFIELD_IMAGE_STORE"]).expanduser()
    return default_cache_dir() / "images"


def _key(files: Sequence[Path], shape: tuple, dtype, settings: str) -> str:
    h = hashlib.sha1(f"dfield-images-v{STORE_FORMAT}\0{np.dtype(dtype).str}\0{tuple(shape)}\0{settings}\0".encode())
    for f in files:
        st = os.stat(f)
        h.update(f"{Path(f).resolve()}\0{st.st_size}\0{st.st_mtime_ns}\0".encode())
    return h.hexdigest()


def open_mapped(path: Path, writable_copy: bool = True) -> np.memmap:
    """Memory-map the `.npy` array at `path`; `release` can then drop its resident pages.

    With `writable_copy` the mapping is copy-on-write (mode "c"): the array can be wrapped by `torch.from_numpy`
    without a warning, and a write changes this process's copy only (never the file; a later `release` drops it)."""
    arr = np.load(path, mmap_mode="c" if writable_copy else "r")
    start = arr.__array_interface__["data"][0]
    _MAPPED[start] = (start + arr.nbytes, weakref.ref(arr))
    for k in [k for k, (_, ref) in _MAPPED.items() if ref() is None]:
        del _MAPPED[k]
    return arr


def _address(x) -> int | None:
    if isinstance(x, torch.Tensor):
        return x.data_ptr() if x.device.type == "cpu" else None
    if isinstance(x, np.ndarray):
        return x.__array_interface__["data"][0]
    return None


def _mapping(x) -> np.memmap | None:
    addr = _address(x)
    if addr is None:
        return None
    for start, (end, ref) in list(_MAPPED.items()):
        arr = ref()
        if arr is not None and start <= addr < max(end, start + 1):
            return arr
    return None


def release(x) -> bool:
    """Drop the resident pages of the memory-mapped array that tensor or array `x` (or a view of it) lies in.
    The data stays in the file and the page cache; the next read maps it back. Returns False (and does nothing)
    for arrays that are not mapped by `open_mapped`."""
    arr = _mapping(x)
    mm = getattr(arr, "_mmap", None) if arr is not None else None
    if mm is None or not hasattr(mm, "madvise"):
        return False
    mm.madvise(mmap.MADV_DONTNEED)
    return True


def trim(x) -> bool:
    """`release` the mapping `x` lies in when it is larger than `RESIDENT_BUDGET_BYTES` (what a loop over random
    samples calls after each one); returns whether it did."""
    arr = _mapping(x)
    return arr is not None and arr.nbytes > RESIDENT_BUDGET_BYTES and release(arr)


def check_free_space(folder: Path, needed: int, what: str, moved_by: str) -> None:
    """Raise DfieldError naming `folder` when its disk has less than `needed` bytes free for `what`; `moved_by` is
    the setting that puts `what` elsewhere. Nothing when the free space cannot be read."""
    try:
        free = shutil.disk_usage(folder).free
    except OSError:
        return
    if free < needed:
        raise DfieldError(f"{folder}: {what} need {needed / 2**20:.0f} MiB but the disk has {free / 2**20:.0f} MiB free; "
                        f"free some space or set {moved_by} to a folder on a disk with room")


def no_space(e: OSError, folder: Path, what: str, moved_by: str) -> OSError | DfieldError:
    """The DfieldError to raise for a write that failed with `e`: a full disk or quota names `folder` and `moved_by`;
    any other error is returned as it is."""
    if e.errno in (errno.ENOSPC, errno.EDQUOT):
        return DfieldError(f"{folder}: disk full while writing {what} ({e.strerror}); free some space or set "
                         f"{moved_by} to a folder on a disk with room")
    return e


def _write_npy(path: str, shape: tuple, dtype, n: int, decode: Callable[[int], np.ndarray]) -> None:
    dtype = np.dtype(dtype)
    header = {"descr": np.lib.format.dtype_to_descr(dtype), "fortran_order": False, "shape": tuple(shape)}
    with open(path, "wb") as f:
        np.lib.format.write_array_header_1_0(f, header)
        for i in range(n):
            f.write(np.ascontiguousarray(decode(i), dtype=dtype).tobytes())


def stored_stack(files: Sequence[Path], shape: tuple, dtype, decode: Callable[[int], np.ndarray], settings: str,
                 folder: Path | None = None) -> torch.Tensor:
    """`decode(i)` of every file i, stacked into one array of `shape` (`shape[0] == len(files)`), as a tensor mapped
    from the store in `folder` (default `image_store_dir()`); decoded and written there first when the store has
    no array for these files (path, size, modification time), `shape`, `dtype` and `settings` (the decoding
    options: downscale, background...). `decode(i)` must return an array of `shape[1:]`; it raises DataError
    naming the file when it cannot. Where the store cannot be written, the images are decoded into memory.

    Example:
        >>> images = stored_stack(paths, (len(paths), 6, 8, 3), np.uint8, lambda i: read_image(paths[i]), "rgb")  # doctest: +SKIP
    """
    folder = Path(folder) if folder is not None else image_store_dir()
    n = len(files)
    if shape[0] != n:
        raise ValueError(f"shape {shape} does not start with the number of files ({n})")
    key = _key(files, shape, dtype, settings)
    path = folder / f"{key}.npy"
    if path.is_file():
        try:
            arr = open_mapped(path)
            if arr.shape == tuple(shape) and arr.dtype == np.dtype(dtype):
                return torch.from_numpy(arr)
        except (OSError, ValueError):
            pass  # unreadable or truncated: written again below
    try:
        folder.mkdir(parents=True, exist_ok=True)
        fd, tmp = tempfile.mkstemp(prefix=f".{key}.", suffix=".npy", dir=folder)
        os.close(fd)
    except OSError as e:
        warnings.warn(f"cannot write decoded images to {folder} ({e}); keeping them in memory", stacklevel=3)
        return torch.from_numpy(np.stack([np.asarray(decode(i), dtype=dtype) for i in range(n)]).reshape(shape))
    # io.atomic's helper sits in a higher layer; this is the same write-then-rename, without the fsync (a cache).
    what, moved_by = f"decoded images ({n} x {' x '.join(map(str, shape[1:]))})", "DFIELD_IMAGE_STORE"
    try:
        check_free_space(folder, int(np.prod(shape)) * np.dtype(dtype).itemsize + (64 << 20), what, moved_by)
        _write_npy(tmp, shape, dtype, n, decode)
        os.replace(tmp, path)
    except BaseException as e:
        if os.path.exists(tmp):
            os.remove(tmp)
        err = no_space(e, folder, what, moved_by) if isinstance(e, OSError) else e
        if err is not e:
            raise err from None
        raise
    return torch.from_numpy(open_mapped(path))


def check_shape(a: np.ndarray, shape: tuple, path: Path, what: str = "image") -> np.ndarray:
    """`a` when its shape is `shape`, else a DataError naming `path` (decoders of `stored_stack`)."""
    if a.shape != tuple(shape):
        raise DataError(f"{path}: {what} is {a.shape[1]}x{a.shape[0]} after decoding, expected {shape[1]}x{shape[0]}")
    return a
