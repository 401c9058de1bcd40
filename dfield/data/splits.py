"""Which views of a scene without explicit split files are held out: one rule for every reader."""

from __future__ import annotations

from dfield.errors import DataError

SPLITS = ("train", "val", "test", "all")


def holdout_indices(n: int, split: str, every: int, where: str, what: str = "images") -> list[int]:
    """Indices of `split` among `n` views where every `every`-th view (0, every, 2 every, ...) is held out.

    "train" gets the others, "val" and "test" both get the held-out views, "all" gets every view. A split that
    comes out empty raises DataError naming `where` (the scene) and `what` is counted.

    Example:
        >>> holdout_indices(10, "test", 4, "scene")
        [0, 4, 8]
    """
    if split not in SPLITS:
        raise ValueError(f"split must be one of {SPLITS}, got {split!r}")
    idx = [i for i in range(n) if split == "all" or (i % every == 0) == (split != "train")]
    if not idx:
        raise DataError(f"{where}: split '{split}' has no {what} (holdout_every={every})")
    return idx
