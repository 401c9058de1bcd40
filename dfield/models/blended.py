"""A guided edit as a model: a trained grid model, frozen, blended with an edit field under an attention field.

`BlendedModel` is a GridModel (same source field, occupancy, features and decoder, loaded from the source run's
weights) whose `as_field` is the dfield.fields.blended.BlendedField of that source with its own edit,
attention and optional deformation fields. So everything that opens a grid run (render, eval, query, edit, the
viewer) opens an edited one; only the edit's parameters ever receive gradients.
"""

from __future__ import annotations

import copy
from dataclasses import dataclass, field

import torch

from dfield.fields.attention import AttentionField
from dfield.fields.blended import KINDS, BlendedField, DeformationField, EditField, EditFieldConfig
from dfield.models.grid import GridModel, GridModelConfig, GridSceneField
from dfield.models.schedule import Schedule


@dataclass
class BlendConfig:
    """What a blended model adds to its source: the edit kinds, the boxes and resolutions of its edit, attention
    and deformation fields, and where it came from. Written by `dfield guide-edit`, not a training option."""

    kinds: tuple[str, ...] = ("color",)
    """Edit kinds: add (density addition), remove (density removal), color (colour change)."""
    edit_aabb: list = field(default_factory=lambda: [[-1.0] * 3, [1.0] * 3])
    edit_res: list = field(default_factory=lambda: [32, 32, 32])
    attention_aabb: list = field(default_factory=lambda: [[-1.0] * 3, [1.0] * 3])
    attention_res: list = field(default_factory=lambda: [32, 32, 32])
    floor: float = 0.02
    """Attention values below this are exactly zero (the source passes through untouched there)."""
    ratio_full: float = 1.0
    """Attention from which the density-removal and colour ratios act fully (dfield.fields.blended; 1: in
    proportion to the attention, what edits written before this option did; dfield guide-edit writes its
    GuidedConfig's)."""
    deform_res: list = field(default_factory=list)
    """Cells per axis of the deformation field over the edit box (empty: no deformation)."""
    edit: EditFieldConfig = field(default_factory=EditFieldConfig)
    source: str = ""
    """The run folder the source weights came from (for the record; the weights are in this run's checkpoint)."""


class BlendedModel(GridModel):
    """A frozen grid model plus the edit, attention and (optional) deformation fields of `blend`.

    Example:
        >>> box = torch.tensor([[-1.0] * 3, [1.0] * 3])
        >>> m = BlendedModel(box, 0.1, 5.0, [1.0, 1.0, 1.0], GridModelConfig(voxels_init=16**3), 0, BlendConfig())
        >>> any(p.requires_grad for p in m.source_parameters()), all(p.requires_grad for p in m.edit_parameters())
        (False, True)
    """

    def __init__(self, aabb: torch.Tensor, near: float, far: float, background, cfg: GridModelConfig | None = None,
                 teacher_dim: int = 0, blend: BlendConfig | None = None):
        super().__init__(aabb, near, far, background, cfg, teacher_dim)
        self.schedule = Schedule()  # the source's structure never changes
        self.blend = copy.deepcopy(blend) if blend is not None else BlendConfig()
        b = self.blend
        if not b.kinds or not set(b.kinds) <= set(KINDS):
            raise ValueError(f"blend kinds must be a non-empty subset of {KINDS}, got {list(b.kinds)}")
        as_box = lambda v: torch.tensor(v, dtype=torch.float32)  # noqa: E731
        self.edit = EditField(as_box(b.edit_aabb), b.edit_res, b.edit)
        self.attention = AttentionField(as_box(b.attention_aabb), b.attention_res, floor=b.floor)
        self.deform = DeformationField(as_box(b.edit_aabb), b.deform_res) if b.deform_res else None
        for p in self.source_parameters():
            p.requires_grad_(False)
        self._occupancy_cache = None

    def source_parameters(self) -> list[torch.nn.Parameter]:
        """The source's radiance and feature parameters (frozen)."""
        return list(self.field.parameters()) + (list(self.decoder.parameters()) if self.decoder is not None else [])

    def edit_parameters(self) -> list[torch.nn.Parameter]:
        """The edit field's and deformation field's parameters (what guided training optimises)."""
        return list(self.edit.parameters()) + (list(self.deform.parameters()) if self.deform is not None else [])

    def source_field(self, decoded: bool = False) -> GridSceneField:
        """The unedited source as a field."""
        return GridSceneField(self, decoded)

    def as_field(self, decoded: bool = False) -> BlendedField:
        """The blended field (features, when asked `decoded`, are the source's in teacher space)."""
        source = self.source_field(decoded)
        occupancy = None
        if "add" in self.blend.kinds:
            key = (id(self.occupancy), id(self.attention.logits), self.attention.logits._version)
            if self._occupancy_cache is None or self._occupancy_cache[0] != key:
                f = BlendedField(source, self.edit, self.attention, self.blend.kinds, self.deform,
                                 ratio_full=self.blend.ratio_full)
                self._occupancy_cache = (key, f.occupancy)  # a full-grid attention pass: once per weights
                return f
            occupancy = self._occupancy_cache[1]
        return BlendedField(source, self.edit, self.attention, self.blend.kinds, self.deform, occupancy,
                            self.blend.ratio_full)

    def param_groups(self, lr_scale: float = 1.0) -> list[dict]:
        """Only the edit's parameters: the source is frozen."""
        return [{"params": self.edit_parameters(), "lr": self.cfg.lr_grid * lr_scale, "name": "edit"}]

    def regularizer(self, step: int) -> torch.Tensor | None:
        """None: guided training (dfield.edit.guided) owns the edit's priors."""
        return None
