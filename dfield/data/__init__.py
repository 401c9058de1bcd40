"""Scene readers. Every reader returns a `Dataset` (see dataset.py for the conventions)."""

from dfield.data.dataset import Cameras, DataError, Dataset

__all__ = ["Cameras", "DataError", "Dataset", "load_dataset"]


def load_dataset(*args, **kwargs) -> Dataset:
    from dfield.data.load import load_dataset as _load

    return _load(*args, **kwargs)
