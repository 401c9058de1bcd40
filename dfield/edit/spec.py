"""The edit spec: a JSON or YAML file listing edits, applied in order, each on a selection.

    edits:
      - op: recolor                       # extract | delete | recolor | transform | composite
        select: {patch: [VIEW, X0, Y0, X1, Y1]}   # or text: [...], click: [VIEW, X, Y], box: [[x,y,z], [x,y,z]],
                                                  # query: FILE (a query set saved by the viewer)
        hue_shift: 120                    # recolor: one of hue_shift (degrees), color [r, g, b], transfer IMAGE
      - op: transform
        select: {click: [3, 50, 42]}
        translate: [0, 0.4, 0]            # transform/composite: translate, rotate (xyz degrees), scale, pivot
        rotate: [0, 0, 30]
      - op: composite
        run: runs/other                   # the other trained run; `select` (optional) picks part of it
        translate: [0.8, 0, 0]
      - op: guided                        # a trained edit (dfield guide-edit's, cached under RUN/cache/guided/)
        select: {click: [3, 50, 42]}      # optional with painted views (they say where)
        to: painted/                      # a folder of edited views, an exemplar image, color:R,G,B, or a text
        kinds: [color]                    # add, remove, color

Validation happens before anything is rendered: an unknown op or key, a missing value, a bad shape or a
composite run that does not exist is an EditError naming the edit.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field, fields
from pathlib import Path

import yaml

from dfield.errors import EditError

OPS = ("extract", "delete", "recolor", "transform", "composite", "guided")
GUIDED_KINDS = ("add", "remove", "color")


@dataclass
class Select:
    """What an edit acts on: exactly one of text queries, a patch, a click, a world box or a saved query, and how the selection
    is scored and cleaned up (negatives, threshold, temperature, hysteresis, connectivity, dilation, grid size)."""

    text: list[str] = field(default_factory=list)
    patch: list[float] | None = None
    """[VIEW, X0, Y0, X1, Y1]: a box in pixels of training view VIEW."""
    click: list[float] | None = None
    """[VIEW, X, Y]: a pixel of training view VIEW."""
    box: list[list[float]] | None = None
    """[[x0, y0, z0], [x1, y1, z1]]: a world-space box (no features needed)."""
    query: str | None = None
    """A query-set file (JSON: positives, negatives, temperature, centre), as the viewer saves its selections."""
    seeds: list[list[float]] | None = None
    """World points the selection must touch (with `connected`): where the viewer's clicks landed."""
    negatives: list[str] | str | None = None
    """Texts, or "auto" (scene feature clusters unlike the query); default: auto for patch/click, stock phrases for text."""
    threshold: float = 0.5
    temperature: float = 0.1
    low: float | None = None
    """Cells connected to confident ones join the selection down to this probability (default threshold / 5)."""
    connected: bool = True
    """Patch/click: keep only the connected pieces of the selection that the patch or click landed on."""
    dilate: int = 0
    """Grow the selection by this many whole cells."""
    resolution: int = 128
    """Cells along the longest side of the grid the selection is sampled on."""


@dataclass
class Edit:
    """One edit of a spec: the op, its selection, the recolour (one of hue_shift, color, transfer), the placement
    (translate, rotate in xyz degrees, scale, pivot) and, for composite, the other run to insert."""

    op: str
    select: Select | None = None
    hue_shift: float | None = None
    color: list[float] | None = None
    transfer: str | None = None
    translate: list[float] = field(default_factory=lambda: [0.0, 0.0, 0.0])
    rotate: list[float] = field(default_factory=lambda: [0.0, 0.0, 0.0])
    scale: float = 1.0
    pivot: list[float] | str = "center"
    """A world point, or 'center' (the centre of the selection's box)."""
    run: str | None = None
    to: str | None = None
    """guided: what the selection should become (edited-views folder, exemplar image, color:R,G,B or text)."""
    kinds: list[str] = field(default_factory=list)
    """guided: edit kinds, of add, remove, color (default color)."""
    steps: int | None = None
    """guided: training steps (default: dfield guide-edit's)."""
    clip: str | None = None
    """guided with a text: CLIP / SigLIP weights, hub name or folder."""
    source_text: str = "a photo of an object"
    """guided with a text: what the selection is before the edit (the directional loss's reference)."""


def _vec(where: str, name: str, v, n: int) -> list[float]:
    if not (isinstance(v, (list, tuple)) and len(v) == n and all(isinstance(a, (int, float)) for a in v)):
        raise EditError(f"{where}: '{name}' must be a list of {n} numbers, got {v!r}")
    return [float(a) for a in v]


def _keys(where: str, d, cls) -> None:
    if not isinstance(d, dict):
        raise EditError(f"{where}: expected a mapping, got {type(d).__name__}")
    known = {f.name for f in fields(cls)}
    unknown = sorted(set(d) - known)
    if unknown:
        raise EditError(f"{where}: unknown key(s) {unknown}; known: {sorted(known)}")


def parse_select(where: str, d, base_dir: Path = Path(".")) -> Select:
    """Validate a `select:` mapping into a Select (a text string becomes a one-item list, vectors become floats,
    a query file is resolved against `base_dir`).

    Raises:
        EditError: naming `where`, for an unknown key, not exactly one of text/patch/click/box/query, a vector of
            the wrong length, a query file that does not exist, or a threshold outside (0, 1).
    """
    _keys(where, d, Select)
    s = Select(**d)
    given = [k for k in ("text", "patch", "click", "box", "query") if getattr(s, k)]
    if len(given) != 1:
        raise EditError(f"{where}: give exactly one of text, patch, click, box, query (got {given or 'none'})")
    if s.query is not None:
        s.query = str((base_dir / s.query).resolve())
        if not Path(s.query).is_file():
            raise EditError(f"{where}: query file {s.query} not found")
    if s.seeds is not None:
        if not isinstance(s.seeds, list):
            raise EditError(f"{where}: 'seeds' must be a list of [x, y, z] points")
        s.seeds = [_vec(where, "seeds", p, 3) for p in s.seeds]
    if isinstance(s.text, str):
        s.text = [s.text]
    if s.patch is not None:
        s.patch = _vec(where, "patch", s.patch, 5)
    if s.click is not None:
        s.click = _vec(where, "click", s.click, 3)
    if s.box is not None:
        if not (isinstance(s.box, list) and len(s.box) == 2):
            raise EditError(f"{where}: 'box' must be [[x0, y0, z0], [x1, y1, z1]]")
        s.box = [_vec(where, "box", s.box[0], 3), _vec(where, "box", s.box[1], 3)]
    if not 0 < s.threshold < 1:
        raise EditError(f"{where}: threshold must be in (0, 1), got {s.threshold}")
    return s


def parse_edit(i: int, d, base_dir: Path) -> Edit:
    """Validate edit number `i` of a spec into an Edit; `transfer` and `run` paths are resolved against `base_dir`.

    Raises:
        EditError: naming the edit, for an unknown op or key, a missing select (all ops but composite) or value,
            a bad vector, a non-positive scale, or a transfer image / composite run that does not exist.
    """
    where = f"edit {i}"
    _keys(where, d, Edit)
    if d.get("op") not in OPS:
        raise EditError(f"{where}: unknown op {d.get('op')!r}; expected one of {', '.join(OPS)}")
    where = f"edit {i} ({d['op']})"
    e = Edit(**d)
    if e.select is not None:
        e.select = parse_select(f"{where} select", e.select, base_dir)
    elif e.op not in ("composite", "guided"):
        raise EditError(f"{where}: needs a 'select'")
    if e.op == "guided":
        _check_guided(where, e, base_dir)
    if e.op == "recolor":
        given = [k for k in ("hue_shift", "color", "transfer") if getattr(e, k) is not None]
        if len(given) != 1:
            raise EditError(f"{where}: give exactly one of hue_shift, color, transfer (got {given or 'none'})")
        if e.color is not None:
            e.color = _vec(where, "color", e.color, 3)
            if not all(0 <= c <= 1 for c in e.color):
                raise EditError(f"{where}: color components must be in [0, 1], got {e.color}")
        if e.transfer is not None:
            e.transfer = str((base_dir / e.transfer).resolve())
            if not Path(e.transfer).is_file():
                raise EditError(f"{where}: transfer image {e.transfer} not found")
    e.translate = _vec(where, "translate", e.translate, 3)
    e.rotate = _vec(where, "rotate", e.rotate, 3)
    if not isinstance(e.scale, (int, float)) or e.scale <= 0:
        raise EditError(f"{where}: scale must be a positive number, got {e.scale!r}")
    if e.pivot != "center":
        e.pivot = _vec(where, "pivot", e.pivot, 3)
    if e.op == "composite":
        if not e.run:
            raise EditError(f"{where}: needs 'run', the trained run folder to insert")
        run = (base_dir / e.run).resolve()
        if not (run / "config.json").is_file():
            raise EditError(f"{where}: run {run} not found (no config.json there)")
        e.run = str(run)
    return e


def _check_guided(where: str, e: Edit, base_dir: Path) -> None:
    if not isinstance(e.to, str) or not e.to.strip():
        raise EditError(f"{where}: needs 'to': a folder of edited views, an exemplar image, color:R,G,B or a text")
    if not e.to.startswith(("text:", "color:")) and (base_dir / e.to).exists():
        e.to = str((base_dir / e.to).resolve())
    folder = Path(e.to).is_dir()
    if e.select is None and not folder:
        raise EditError(f"{where}: needs a 'select' (only painted views can say where by themselves)")
    if isinstance(e.kinds, str):
        e.kinds = [e.kinds]
    bad = [k for k in e.kinds if k not in GUIDED_KINDS]
    if bad:
        raise EditError(f"{where}: unknown kind(s) {bad}; expected some of {', '.join(GUIDED_KINDS)}")
    if e.steps is not None and (not isinstance(e.steps, int) or e.steps < 1):
        raise EditError(f"{where}: steps must be a positive integer, got {e.steps!r}")


def parse_where(text: str, base_dir: Path = Path(".")) -> Select:
    """A region written on one line, as `dfield guide-edit --where` takes it: `patch:VIEW,X0,Y0,X1,Y1`,
    `click:VIEW,X,Y`, `text:red mug`, `box:X0,Y0,Z0,X1,Y1,Z1`, or a query file saved by the viewer (JSON).

    Example:
        >>> parse_where("click:3,40,58").click, parse_where("box:0,0,0,1,1,1").box
        ([3.0, 40.0, 58.0], [[0.0, 0.0, 0.0], [1.0, 1.0, 1.0]])
    """
    s = str(text).strip()
    kind, _, rest = s.partition(":")
    try:
        nums = lambda: [float(v) for v in rest.split(",")]  # noqa: E731
        if kind == "patch":
            return parse_select("--where", {"patch": nums()})
        if kind == "click":
            return parse_select("--where", {"click": nums()})
        if kind == "box":
            v = nums()
            if len(v) != 6:
                raise EditError(f"--where {s}: a box is box:X0,Y0,Z0,X1,Y1,Z1")
            return parse_select("--where", {"box": [v[:3], v[3:]]})
    except ValueError:
        raise EditError(f"--where {s}: expected numbers after '{kind}:'") from None
    if kind == "text" and rest.strip():
        return parse_select("--where", {"text": [rest.strip()]})
    if Path(s).expanduser().is_file():
        return parse_select("--where", {"query": s}, base_dir)
    raise EditError(f"--where {s}: expected patch:VIEW,X0,Y0,X1,Y1, click:VIEW,X,Y, text:WORDS, "
                    "box:X0,Y0,Z0,X1,Y1,Z1 or a query file")


def parse_spec(data, base_dir: Path = Path(".")) -> list[Edit]:
    """A spec as loaded from JSON/YAML: {'edits': [...]} or a bare list."""
    items = data.get("edits") if isinstance(data, dict) else data
    if isinstance(data, dict) and set(data) - {"edits"}:
        raise EditError(f"unknown top-level key(s) {sorted(set(data) - {'edits'})}; expected 'edits'")
    if not isinstance(items, list) or not items:
        raise EditError("the spec needs a non-empty list of edits (top-level 'edits:')")
    return [parse_edit(i, d, base_dir) for i, d in enumerate(items)]


def load_spec(path) -> list[Edit]:
    """Read a .json, .yaml or .yml spec; paths inside it are relative to the spec's folder."""
    path = Path(path)
    if not path.is_file():
        raise EditError(f"{path}: edit spec not found")
    text = path.read_text()
    try:
        if path.suffix.lower() in (".yaml", ".yml"):
            data = yaml.safe_load(text)
        else:
            data = json.loads(text)
    except Exception as e:  # the parser's own message says where
        raise EditError(f"{path}: cannot parse: {e}") from None
    try:
        return parse_spec(data, path.parent)
    except EditError as e:
        raise EditError(f"{path}: {e}") from None
