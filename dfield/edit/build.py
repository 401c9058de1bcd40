"""From an edit spec and a trained run to an edited scene you can render, score and mesh.

`build_edited(run, edits)` stacks the wrappers of dfield.edit.wrappers over the run's field, turning each edit's
`select` into a VoxelSelection (queries go through dfield.query.builder). The result is a Model: everything
that renders a run renders an edited one.
"""

from __future__ import annotations

import numpy as np
import torch
from PIL import Image

from dfield.core.image_rendering import ndc_of
from dfield.core.rays import field_rays
from dfield.core.rendering import render_field
from dfield.edit.colors import color_transfer, hue_shift, rgb_to_hsv, set_color
from dfield.edit.selection import BoxSelection, FeatureSelection, VoxelSelection, selection_bounds
from dfield.edit.spec import Edit, Select
from dfield.edit.wrappers import Delete, Extract, Place, Recolor, affine
from dfield.errors import EditError, QueryError, RunError
from dfield.io.run import Run, open_run
from dfield.models.base import Model
from dfield.models.grid import GridModel
from dfield.query.builder import make_query
from dfield.query.sets import load_query_set
from dfield.query.spec import QuerySpec


class EditedModel(Model):
    """A trained grid model seen through a stack of edit wrappers; features (if any) are in teacher space."""

    def __init__(self, base, field, layers: list):
        super().__init__()
        self.base, self.field, self.layers = base, field, layers
        self.background = base.background

    def render_rays(self, rays, generator=None, features: bool = False, channels=None,
                    visible: bool = False) -> dict[str, torch.Tensor]:
        """Like the base model's, through the edits (never jittered); `channels` composites extra functions of
        points (e.g. `touched`)."""
        return render_field(self.field, rays, self.base.render_settings(), None, features, channels, visible=visible)

    def as_field(self, decoded: bool = True):
        return self.field

    @property
    def has_features(self) -> bool:
        return self.field.features is not None

    def touched(self, x: torch.Tensor) -> torch.Tensor:
        """Points any edit may have changed (evaluated in world space, so it also marks moved-to places)."""
        out = torch.zeros(len(x), dtype=torch.bool, device=x.device)
        for layer in self.layers:
            out |= layer.touched(x)
        return out

    def decode(self, rendered: torch.Tensor) -> torch.Tensor:
        """Edited fields render features already in teacher space."""
        return rendered


class _DenseCells:
    """Occupancy that also asks the field: selections are sampled only where there is matter."""

    def __init__(self, field, step: float, min_alpha: float = 0.01):
        self.field, self.step, self.min_alpha = field, step, min_alpha

    def query(self, x):
        keep = torch.ones(len(x), dtype=torch.bool) if self.field.occupancy is None else self.field.occupancy.query(x)
        idx = keep.nonzero()[:, 0]
        if len(idx):
            alpha = 1 - torch.exp(-self.field.density(x[idx]) * self.step)
            keep[idx] = alpha > self.min_alpha
        return keep


def select_query(sel: Select, run):
    """The query set of a feature `select` (text, patch, click or a saved query file) in the run's teacher space."""
    if sel.query is not None:
        try:
            query = load_query_set(sel.query)
        except QueryError as e:
            raise EditError(str(e)) from None
        if query.positives.shape[1] != run.cfg.features.teacher_dim:
            raise EditError(f"{sel.query}: the query has {query.positives.shape[1]}-d embeddings, the run's teacher "
                            f"{run.cfg.features.teacher_dim}-d")
        return query
    as_view = lambda v: None if v is None else (int(v[0]), *v[1:])  # noqa: E731 (the view is an index)
    spec = QuerySpec(text=list(sel.text), patch=as_view(sel.patch), click=as_view(sel.click),
                     negatives=sel.negatives, temperature=sel.temperature, threshold=sel.threshold)
    return make_query(run, spec)


def make_selection(sel: Select, run, field, step: float):
    """A Select from the spec -> a selection over `field` (queries score the field's own features)."""
    if sel.box is not None:
        return BoxSelection(*sel.box)
    if field.features is None:
        raise EditError(f"{run.path}: this run has no feature field, so it can only be edited with 'box' selections "
                        "(add features with dfield distill RUN --teacher ...)")
    query = select_query(sel, run)
    exact = FeatureSelection(field.features, query, sel.threshold)
    low = sel.threshold / 5 if sel.low is None else sel.low
    grid = VoxelSelection.sample(exact, field.aabb, sel.resolution, _DenseCells(field, step), sel.dilate, low=low,
                                 seeds=seed_points(run, sel) if sel.connected else None, density=field.density)
    if grid.voxel_count() == 0:
        raise EditError(f"the selection {_describe(sel)} is empty: no occupied cell scores above {sel.threshold} "
                        "(try a lower threshold or another query)")
    return grid


@torch.no_grad()
def seed_points(run, sel: Select) -> torch.Tensor | None:
    """The 3D points a click or a patch (its centre and a 3x3 grid inside it) lands on, from rendered depth, or
    the spec's own `seeds`."""
    if sel.seeds:
        return torch.tensor(sel.seeds, dtype=torch.float32)
    if sel.click is not None:
        view, us, vs = int(sel.click[0]), [sel.click[1] + 0.5], [sel.click[2] + 0.5]
    elif sel.patch is not None:
        view, x0, y0, x1, y1 = int(sel.patch[0]), *sel.patch[1:]
        grid = [0.25, 0.5, 0.75]
        us = [x0 + a * (x1 - x0) for a in grid for _ in grid]
        vs = [y0 + b * (y1 - y0) for _ in grid for b in grid]
    else:
        return None
    cams = run.scene.train_cameras()
    device = run.model.field.aabb.device
    rays = field_rays(cams, torch.full((len(us),), view, dtype=torch.long), torch.tensor(us), torch.tensor(vs),
                      ndc_of(run.scene)).to(device)
    out = run.model.render_rays(rays)
    hit = out["acc"] > 0.5
    t = out["depth"][hit] / out["acc"][hit]
    return (rays.origins[hit] + rays.directions[hit] * t[:, None]).cpu() if hit.any() else None


def _describe(sel: Select) -> str:
    for k in ("text", "patch", "click", "box", "query"):
        if getattr(sel, k):
            return f"{k}={getattr(sel, k)}"
    return "?"


@torch.no_grad()
def region_colors(field, selection, step: float, n: int = 20000) -> torch.Tensor:
    """Colours of the visible matter inside a selection, seen from the six axis directions."""
    box = selection_bounds(selection, field.aabb)
    g = torch.Generator().manual_seed(0)
    pts = box[0] + torch.rand(n * 4, 3, generator=g) * (box[1] - box[0])
    pts = pts[selection.mask(pts)]
    pts = pts[(1 - torch.exp(-field.density(pts) * step)) > 0.05][:n]
    if len(pts) == 0:
        raise EditError("the selection holds no visible matter to take colours from")
    dirs = torch.eye(3).repeat(2, 1) * torch.tensor([1.0, 1.0, 1.0, -1.0, -1.0, -1.0])[:, None]
    return torch.stack([field.color(pts, dirs[k].expand_as(pts)) for k in range(6)]).mean(0)


def _recolor_fn(e: Edit, field, selection, step: float):
    if e.hue_shift is not None:
        return hue_shift(e.hue_shift)
    colors = region_colors(field, selection, step)
    if e.color is not None:
        return set_color(e.color, rgb_to_hsv(colors)[:, 2].median().item())
    img = torch.from_numpy(np.asarray(Image.open(e.transfer).convert("RGBA"))).float() / 255
    target = img[..., :3][img[..., 3] > 0.5]
    if len(target) == 0:
        raise EditError(f"transfer image {e.transfer} has no opaque pixels")
    return color_transfer(colors, target)


def _matrix(e: Edit, box: torch.Tensor) -> torch.Tensor:
    pivot = ((box[0] + box[1]) / 2).tolist() if e.pivot == "center" else e.pivot
    return affine(e.translate, e.rotate, e.scale, pivot)


def build_edited(run: Run, edits: list[Edit], device: str = "cpu", guided=None) -> EditedModel:
    """Stack `edits` (parsed by dfield.edit.spec) over an opened run's field; queries are answered on the run (or,
    for composite, on the other run). Raises EditError/RunError naming the edit that cannot be built.

    `guided(run, field, edit, below)` makes the layer of a `guided` edit (dfield.edit.guided.guided_layer, which
    trains it or loads it from the run's cache); without it a spec with a guided edit is refused.

    Example:
        >>> edited = build_edited(open_run("runs/toy"), parse_spec({"edits": [{"op": "delete", "select": {"click": [0, 40, 58]}}]}))  # doctest: +SKIP
        >>> render_image(edited, run.scene.train_cameras(), 0)["rgb"]  # doctest: +SKIP
    """
    if not isinstance(run.model, GridModel):
        raise RunError(f"{run.path}: edits need a grid model run (this one is {run.cfg.model})")
    step = run.model.step
    field = run.model.as_field(decoded=True)
    layers = []
    for i, e in enumerate(edits):
        where = f"edit {i} ({e.op})"
        try:
            if e.op == "composite":
                other = open_run(e.run, device)
                if not isinstance(other.model, GridModel):
                    raise RunError(f"{e.run}: composite needs a grid model run")
                src = other.model.as_field(decoded=True)
                sel = make_selection(e.select, other, src, other.model.step) if e.select else None
                box = selection_bounds(sel, src.aabb) if sel else _occupied_box(other.model)
                if field.features is not None and src.features is not None and \
                        other.cfg.features.teacher_dim != run.cfg.features.teacher_dim:
                    raise EditError(f"{e.run} has {other.cfg.features.teacher_dim}-d features, {run.path} "
                                    f"{run.cfg.features.teacher_dim}-d: composite needs the same teacher")
                layer = Place(field, src, sel, _matrix(e, box), box)
            elif e.op == "guided":
                if guided is None:
                    raise EditError("guided edits train for minutes: apply this spec with dfield edit")
                layer = guided(run, field, e, edits[:i])
            else:
                sel = make_selection(e.select, run, field, step)
                if e.op == "extract":
                    layer = Extract(field, sel)
                elif e.op == "delete":
                    layer = Delete(field, sel)
                elif e.op == "recolor":
                    layer = Recolor(field, sel, _recolor_fn(e, field, sel, step))
                else:
                    box = selection_bounds(sel, field.aabb)
                    layer = Place(field, field, sel, _matrix(e, box), box, remove=True)
        except (EditError, RunError, ValueError) as err:
            raise type(err)(f"{where}: {err}") from None
        layers.append(layer)
        field = layer
    return EditedModel(run.model, field, layers).to(device)


def _occupied_box(model) -> torch.Tensor:
    return model.occupancy.occupied_aabb() if model.occupancy is not None else model.field.aabb


def mesh_box(edited: EditedModel) -> torch.Tensor:
    """Where to mesh: the selection's box when the last edit extracts (an object on its own), else everything."""
    last = edited.layers[-1] if edited.layers else None
    box = edited.field.aabb
    if isinstance(last, Extract):
        sel = selection_bounds(last.selection, box)
        pad = 0.05 * (sel[1] - sel[0]).max()  # marching cubes closes no surface that touches the box
        box = torch.stack([torch.maximum(sel[0] - pad, box[0]), torch.minimum(sel[1] + pad, box[1])])
    return box
