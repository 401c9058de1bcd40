"""The teacher registry: teachers by name, built from a spec string such as "dinov2:block=7,input_size=518".

`make_teacher("name:arg", **kw)` calls the factory as `factory(arg, **kw)` (or `factory(**kw)` without an
argument), so "files:/data/feats" becomes `FileTeacher("/data/feats")`. Building a teacher is cheap: the heavy
back ends (onnxruntime, transformers) load when a teacher first encodes.
"""

from __future__ import annotations

from collections.abc import Callable

from dfield.errors import TeacherError
from dfield.features.specs import parse_spec
from dfield.features.teachers.base import Teacher
from dfield.features.teachers.clip import ClipTeacher
from dfield.features.teachers.dinov2_onnx import DinoV2Teacher
from dfield.features.teachers.files import FileTeacher
from dfield.features.teachers.synthetic import SyntheticTeacher

_REGISTRY: dict[str, Callable[..., Teacher]] = {}


def register_teacher(name: str, factory: Callable[..., Teacher]) -> None:
    """Make `make_teacher(name, ...)` / `make_teacher("name:arg", ...)` call `factory` (replaces an earlier one)."""
    if not name or ":" in name:
        raise ValueError(f"teacher name must be non-empty and contain no ':', got {name!r}")
    _REGISTRY[name] = factory


def teacher_names() -> list[str]:
    """The registered teacher names, sorted (the names `make_teacher` accepts before any ':')."""
    return sorted(_REGISTRY)


def make_teacher(spec: str, **kw) -> Teacher:
    """Build a teacher from a spec: "synthetic", "dinov2", "clip", "files:<folder>" or a registered name.

    Settings ride along as "name:key=value,key=value" (e.g. "dinov2:block=7,input_size=518",
    "synthetic:noise=0.8"); an argument without "=" is passed positionally ("files:feats/", "clip:PATH").
    """
    try:
        name, arg, settings = parse_spec(spec)
    except ValueError as e:
        raise TeacherError(f"teacher {e}") from None
    factory = _REGISTRY.get(name)
    if factory is None:
        raise TeacherError(f"unknown teacher {spec!r}; known: {', '.join(teacher_names())} "
                           "(add one with dfield.features.teachers.register_teacher)")
    if settings:
        try:
            return factory(arg, **settings, **kw) if arg is not None else factory(**settings, **kw)
        except TypeError as e:
            raise TeacherError(f"bad settings for teacher {name!r} in {spec!r}: {e}") from None
    return factory(arg, **kw) if arg is not None else factory(**kw)


def _files_factory(folder=None, **kw):
    if not folder:
        raise TeacherError("the files teacher needs a folder: files:<folder>")
    return FileTeacher(folder, **kw)


register_teacher("synthetic", SyntheticTeacher)
register_teacher("dinov2", DinoV2Teacher)
register_teacher("clip", ClipTeacher)
register_teacher("files", _files_factory)
