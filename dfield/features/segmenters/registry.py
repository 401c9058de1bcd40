"""The segmenter registry: segmenters by name, built from a spec string such as "felzenszwalb:scale=200"
(the same spec grammar as teachers, dfield.features.specs).
"""

from __future__ import annotations

from collections.abc import Callable

from dfield.errors import DfieldError, TeacherError
from dfield.features.segmenters.base import Segmenter
from dfield.features.segmenters.classical import FelzenszwalbSegmenter
from dfield.features.segmenters.litemedsam import LiteMedSAMSegmenter
from dfield.features.segmenters.sam import SAMSegmenter
from dfield.features.segmenters.simple import FileSegmenter, TruthSegmenter
from dfield.features.specs import parse_spec

_REGISTRY: dict[str, Callable[..., Segmenter]] = {}


def register_segmenter(name: str, factory: Callable[..., Segmenter]) -> None:
    """Make `make_segmenter(name, ...)` call `factory` (replaces an earlier one)."""
    if not name or ":" in name:
        raise ValueError(f"segmenter name must be non-empty and contain no ':', got {name!r}")
    _REGISTRY[name] = factory


def segmenter_names() -> list[str]:
    """The registered segmenter names, sorted."""
    return sorted(_REGISTRY)


def make_segmenter(spec: str) -> Segmenter:
    """Build a segmenter from a spec: "felzenszwalb[:key=value,...]", "litemedsam[:...]", "sam:CHECKPOINT[,...]",
    "gt", "files:<folder>".

    Example:
        >>> make_segmenter("felzenszwalb:scale=50").scale
        50.0
    """
    try:
        name, arg, settings = parse_spec(spec)
    except ValueError as e:
        raise TeacherError(f"segmenter {e}") from None
    factory = _REGISTRY.get(name)
    if factory is None:
        raise TeacherError(f"unknown segmenter {spec!r}; known: {', '.join(segmenter_names())}")
    try:
        return factory(arg, **settings) if arg is not None else factory(**settings)
    except DfieldError:
        raise
    except (TypeError, ValueError) as e:
        raise TeacherError(f"bad settings for segmenter {name!r} in {spec!r}: {e}") from None


def _files(folder=None):
    if not folder:
        raise TeacherError("the files segmenter needs a folder: files:<folder>")
    return FileSegmenter(folder)


register_segmenter("felzenszwalb", FelzenszwalbSegmenter)
register_segmenter("litemedsam", LiteMedSAMSegmenter)
register_segmenter("sam", SAMSegmenter)
register_segmenter("gt", TruthSegmenter)
register_segmenter("files", _files)
