"""Atomic file writes: one helper every writer uses (checkpoints, configs, exports, caches), so a crash or a
concurrent reader never sees a half-written file.

A file is written under a temporary name in its target folder, then renamed over the target with
`os.replace`, which is atomic on POSIX and Windows. `durable=True` also fsyncs the data before the rename (for
what must survive a power cut: checkpoints, configs).
"""

from __future__ import annotations

import os
import tempfile
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path


@contextmanager
def atomic_path(path, durable: bool = False) -> Iterator[str]:
    """Yield a temporary path beside `path` (same suffix, so writers that pick a format by extension work);
    on success it replaces `path`, on any error it is removed and `path` is left as it was.

    Example:
        >>> with atomic_path(tmp / "out.png") as t:  # doctest: +SKIP
        ...     image.save(t)
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.stem}.", suffix=path.suffix, dir=path.parent)
    os.close(fd)
    try:
        yield tmp
        if durable:
            fsync_file(tmp)
        os.replace(tmp, path)
    except BaseException:
        if os.path.exists(tmp):
            os.remove(tmp)
        raise


def fsync_file(path) -> None:
    """Flush a file's data to disk."""
    with open(path, "rb") as f:
        os.fsync(f.fileno())


def atomic_write_bytes(path, data: bytes, durable: bool = False) -> Path:
    """Write `data` to `path` atomically; returns `path`."""
    with atomic_path(path, durable) as tmp, open(tmp, "wb") as f:
        f.write(data)
    return Path(path)


def atomic_write_text(path, text: str, durable: bool = True) -> Path:
    """Write `text` (UTF-8) to `path` atomically, durable by default (configs and run metadata)."""
    return atomic_write_bytes(path, text.encode(), durable)
