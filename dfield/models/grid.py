"""The default model: a TensoRF field, occupancy-grid marching, and a coarse-to-fine schedule.

The schedule is what makes a CPU budget work: start with a coarse grid (cheap steps, fast convergence
of the overall shape), mark empty space and shrink the box to the object early, then refine the grid.
"""

from __future__ import annotations

import copy
import dataclasses
from dataclasses import dataclass, field
from typing import Literal

import torch

from dfield.core.contraction import Contraction
from dfield.core.grids import voxel_res
from dfield.core.rays import Rays
from dfield.core.rendering import RenderSettings, render_field
from dfield.core.sampling import OccupancyGrid
from dfield.fields.lifted import LiftedFeatures
from dfield.fields.tensorf import TensoRFConfig, TensoRFField
from dfield.models.base import Model
from dfield.models.schedule import GridSchedule


@dataclass
class GridModelConfig:
    """Settings of a GridModel: its field, the coarse-to-fine voxel schedule, occupancy updates and the box
    shrink, ray marching, learning rates and regularisation weights."""

    field: TensoRFConfig = field(default_factory=TensoRFConfig)
    voxels_init: int = 32**3
    voxels_final: int = 128**3
    voxel_aspect: tuple[float, float, float] = (1.0, 1.0, 1.0)
    """Relative voxel size along x, y, z (forward-facing scenes: deeper voxels along NDC depth than across the
    image plane, where the detail is)."""
    upsample_steps: tuple[int, ...] = (200, 400, 700, 1000)
    """Steps at which the grid is refined; voxel counts grow log-linearly from init to final."""
    occupancy_start: int = 25
    """First step at which empty space is marked in the occupancy grid."""
    occupancy_every: int = 25
    """Re-mark empty space this often until `occupancy_slow_after` (density clears fast early on)."""
    occupancy_slow_after: int = 500
    occupancy_every_late: int = 250
    """Re-mark empty space this often after `occupancy_slow_after`."""
    shrink_step: int = 300
    """Shrink the box to the occupied region here: the same voxel budget then buys a finer resolution."""
    occupancy_threshold: float = 1e-4
    """A cell is occupied when one step through it at its centre's density is at least this opaque (then the mask is
    dilated by a cell), until `occupancy_late_step`: low, so content still forming is never cut off from its samples."""
    occupancy_threshold_late: float = 1e-2
    """The same from `occupancy_late_step` on, capped at the grid's mean opacity per step (a scene still faint
    everywhere, such as a short run on a small scene, keeps its cells) and never below `occupancy_threshold`. 1e-2
    (was 1e-4 throughout, as in TensoRF) drops the near-transparent shell around surfaces: half the samples, with 95 %
    of the visible ones (weight >= 1e-3) kept (README "Measured figures"). Unbounded scenes keep 1e-4."""
    occupancy_late_step: int = -1
    """The step from which `occupancy_threshold_late` applies (-1: from the box shrink, `shrink_step`). From the shrink
    rather than from the last upsampling (step 1000): fern 23.52 dB at a 150 s budget instead of 23.06, lego 32.94."""
    occupancy_max_res: int = 160
    step_ratio: float = 0.7
    """Sample spacing along rays, in voxels. 0.7 with weight_threshold 1e-3 (was 0.5 and 1e-4): lego 100 px 31.92 /
    33.25 dB at 150 / 300 s instead of 30.67 / 32.62, measured side by side (README "Measured figures")."""
    weight_threshold: float = 1e-3
    """Samples with a smaller rendering weight skip the colour and feature branches."""
    lr_grid: float = 0.02
    lr_network: float = 1e-3
    l1_weight_init: float = 8e-5
    l1_weight_rest: float = 4e-5
    tv_density: float = 0.0
    """Total-variation weight on the density volume (forward-facing scenes with few views: ~1.0)."""
    tv_app: float = 0.0
    """Total-variation weight on the appearance volume (forward-facing scenes: ~1.0)."""
    max_samples: int = 1024
    random_background: bool = False
    """Unbounded scenes: train against a random background colour per ray (every pixel sees something)."""
    distortion_weight: float = 0.0
    """Unbounded scenes: weight of mip-NeRF 360's distortion loss (`dfield.core.rendering.distortion_loss`), which
    keeps far content from collapsing into clouds near the cameras."""
    contraction: Literal["inf", "l2"] = "inf"
    """Unbounded scenes: the norm of the scene contraction (inf: the unit cube stays and all space maps into the
    cube [-2, 2]^3 the grid covers; l2: mip-NeRF 360's unit ball, into the ball of radius 2)."""


class GridModel(Model):
    """A TensoRF field over a box, marched through an occupancy grid, with an optional feature branch.

    Features come either from a learned low-dimensional feature volume plus a linear `decoder` to the teacher's
    width (distillation), or from `lifted`: teacher-space features averaged per voxel (one-pass lifting).

    With a `contraction` (unbounded scenes) the field and its occupancy grid cover the contracted cube [-2, 2]^3,
    world points are contracted on their way in, rays are marched in warped distance from near to far, and the
    box never shrinks.
    """

    def __init__(self, aabb: torch.Tensor, near: float, far: float, background, cfg: GridModelConfig | None = None,
                 teacher_dim: int = 0, contraction: Contraction | None = None):
        super().__init__()
        # A copy: the schedule and the feature branch change the model's settings, never the caller's config.
        cfg = copy.deepcopy(cfg) if cfg is not None else GridModelConfig()
        self.cfg = cfg
        self.near, self.far = float(near), float(far)
        self.register_buffer("background", torch.as_tensor(background, dtype=torch.float32))
        self.schedule = GridSchedule(cfg)
        self.contraction = contraction
        if contraction is not None:
            aabb = torch.tensor([[-2.0] * 3, [2.0] * 3], device=aabb.device)
        self.field = TensoRFField(aabb, voxel_res(aabb, cfg.voxels_init, aspect=cfg.voxel_aspect), cfg.field)
        self.field.contraction = contraction
        # Low-dim rendered features -> teacher space, applied after compositing (once per ray, not per sample).
        self.decoder = torch.nn.Linear(cfg.field.feature_dim, teacher_dim) if cfg.field.feature_dim and teacher_dim else None
        self.lifted: LiftedFeatures | None = None
        self.occupancy: OccupancyGrid | None = None
        # A contracted grid already spans all of space: there is nothing to shrink to, so it counts as shrunk.
        self.shrunk = contraction is not None
        self._update_step_size()

    # -- structure (changed by the schedule) ----------------------------------------------------
    def _update_step_size(self) -> None:
        aabb = self.field.aabb
        voxel = ((aabb[1] - aabb[0]) / torch.tensor(self.field.res, device=aabb.device)).mean().item()
        self.step = voxel * self.cfg.step_ratio

    def resize_grid(self, n_voxels: int) -> None:
        """Resample the volumes at about `n_voxels` cells over the current box."""
        self.field.resize(voxel_res(self.field.aabb, n_voxels, aspect=self.cfg.voxel_aspect))
        self._update_step_size()

    @torch.no_grad()
    def update_occupancy(self, shrink: bool = False, threshold: float | None = None) -> float:
        """Rebuild the occupancy grid from the current density (cubic, at most `occupancy_max_res` per side) and
        return the occupied fraction. `threshold`: the opacity a cell needs (default `occupancy_threshold`; a higher
        one is capped at the grid's mean opacity).

        With `shrink`, the box also shrinks to the occupied cells plus a two-cell margin and the volumes are
        resampled over it with the same voxel count, so the resolution gets finer."""
        res = tuple(min(r, self.cfg.occupancy_max_res) for r in self.field.res)
        grid = OccupancyGrid(self.field.aabb, max(res), self.contraction)
        # The grid spans the field's box (contracted cube included), so its cell centres are a lattice of the
        # field's box coordinates: densities for all of them at once (0.8 s -> a few ms at 118^3 cells).
        sigma = self.field.density_on_lattice(grid.lattice_axes())
        base = self.cfg.occupancy_threshold
        threshold = base if threshold is None else threshold
        # A higher threshold is capped at the grid's mean opacity, never below the early one.
        frac = grid.mark(sigma, self.step, threshold, floor=base if threshold > base else None)
        if shrink and self.contraction is None:
            box = grid.occupied_aabb()
            # Keep a margin of two cells so surfaces near the edge are not clipped.
            pad = 2 * (grid.aabb[1] - grid.aabb[0]) / grid.resolution
            box = torch.stack([torch.maximum(box[0] - pad, grid.aabb[0]), torch.minimum(box[1] + pad, grid.aabb[1])])
            vox = int(torch.tensor(self.field.res).prod())
            self.field.resize(voxel_res(box, vox, aspect=self.cfg.voxel_aspect), box)
            self._update_step_size()
            self.shrunk = True
        self.occupancy = grid
        return frac

    # -- rendering ------------------------------------------------------------------------------
    def render_settings(self) -> RenderSettings:
        """How this model's rays are marched now (the step follows the grid's resolution)."""
        return RenderSettings(self.near, self.far, self.step, self.background, self.cfg.weight_threshold,
                              self.cfg.max_samples, contraction=self.contraction,
                              distortion=self.contraction is not None and self.cfg.distortion_weight > 0)

    def as_field(self, decoded: bool = False) -> "GridSceneField":
        """The renderer's view of this model; `decoded` gives features in the teacher's space (for queries, edits)."""
        return GridSceneField(self, decoded)

    def render_rays(self, rays: Rays, generator: torch.Generator | None = None, features: bool = False,
                    visible: bool = False) -> dict[str, torch.Tensor]:
        settings = self.render_settings()
        if generator is not None and self.contraction is not None and self.cfg.random_background:
            # Every pixel of an unbounded scene sees something: a random colour behind each training ray makes any
            # transparency cost, so a white sky is not left to the background colour and far content gets built.
            background = torch.rand(len(rays), 3, generator=generator).to(rays.origins.device)
            settings = dataclasses.replace(settings, background=background)
        return render_field(self.as_field(), rays, settings, generator, features, visible=visible)

    def scene_box(self) -> torch.Tensor | None:
        return self.field.aabb if self.contraction is None else None

    # -- features -------------------------------------------------------------------------------
    @property
    def has_features(self) -> bool:
        return self.decoder is not None or self.lifted is not None

    @property
    def trainable_features(self) -> bool:
        return self.decoder is not None and self.lifted is None

    @property
    def feature_dim(self) -> int:
        """Width of the rendered features (before `decode`)."""
        if self.lifted is not None:
            return self.lifted.grid.shape[1]
        return self.decoder.in_features if self.decoder is not None else 0

    def decode(self, rendered: torch.Tensor) -> torch.Tensor:
        """Rendered features -> teacher space (lifted features are, or are coordinates in a basis of it)."""
        if self.lifted is not None:
            return self.lifted.decode(rendered)
        if self.decoder is None:
            return super().decode(rendered)
        return self.decoder(rendered)

    def add_feature_field(self, dim: int, teacher_dim: int, comp: int = 16) -> None:
        """A fresh learned feature branch: a `dim`-wide feature volume at the grid's resolution and a linear decoder
        to `teacher_dim` (replaces any features the model had)."""
        self.lifted = None
        self.field.add_feature_volume(dim, comp)
        self.cfg.field = self.field.cfg
        self.decoder = torch.nn.Linear(dim, teacher_dim).to(self.field.aabb.device)

    def set_lifted_features(self, lifted: LiftedFeatures) -> None:
        """Features from one-pass lifting replace any learned feature branch."""
        self.field.drop_feature_volume()
        self.cfg.field = self.field.cfg
        self.decoder = None
        self.lifted = lifted.to(self.field.aabb.device)

    # -- training -------------------------------------------------------------------------------
    def param_groups(self, lr_scale: float = 1.0) -> list[dict]:
        """Radiance and feature parameters in separate groups: a feature branch that starts late (radiance first)
        gets a learning-rate schedule of its own, starting where it starts."""
        f = self.field
        feat_grid = [f.feature_vol.planes, f.feature_vol.lines] if f.feature_vol is not None else []
        feat_net = (list(f.feature_basis.parameters()) if f.feature_vol is not None else []) + \
            (list(self.decoder.parameters()) if self.decoder is not None else [])
        ids = {id(q) for q in feat_grid + feat_net}
        groups = [
            {"params": [q for q in f.grid_parameters() if id(q) not in ids], "lr": self.cfg.lr_grid * lr_scale, "name": "grid"},
            {"params": [q for q in f.network_parameters() if id(q) not in ids], "lr": self.cfg.lr_network * lr_scale,
             "name": "network"},
        ]
        if feat_grid:
            groups.append({"params": feat_grid, "lr": self.cfg.lr_grid * lr_scale, "name": "feature_grid"})
        if feat_net:
            groups.append({"params": feat_net, "lr": self.cfg.lr_network * lr_scale, "name": "feature_network"})
        return groups

    def losses(self, out: dict[str, torch.Tensor], target_rgb: torch.Tensor) -> dict[str, torch.Tensor]:
        """The colour MSE, plus the weighted distortion loss of unbounded scenes when the render carries it."""
        terms = super().losses(out, target_rgb)
        if "distortion" in out and self.cfg.distortion_weight > 0:
            terms["distortion"] = self.cfg.distortion_weight * out["distortion"].mean()
        return terms

    def regularizer(self, step: int) -> torch.Tensor | None:
        """L1 sparsity on the density volume (lighter once the box has shrunk), plus the optional TV terms."""
        c = self.cfg
        w = c.l1_weight_init if not self.shrunk else c.l1_weight_rest
        terms = [w * self.field.l1_density()] if w > 0 else []
        if c.tv_density > 0:
            terms.append(c.tv_density * self.field.density_vol.total_variation())
        if c.tv_app > 0:
            terms.append(c.tv_app * self.field.app_vol.total_variation())
        return sum(terms) if terms else None

    def structure(self) -> dict:
        return {"res": list(self.field.res), "aabb": self.field.aabb.tolist(), "shrunk": self.shrunk, "has_occupancy": self.occupancy is not None}

    def restructure(self, info: dict) -> None:
        aabb = torch.tensor(info["aabb"], dtype=torch.float32, device=self.field.aabb.device)
        self.field.aabb.copy_(aabb)
        for vol in self.field.volumes():
            vol.crop(torch.zeros(3), torch.ones(3), tuple(info["res"]))
        self.shrunk = info["shrunk"]
        self._update_step_size()

    def extra_state(self) -> dict[str, torch.Tensor]:
        out = {} if self.occupancy is None else {f"occupancy.{k}": v for k, v in self.occupancy.state().items()}
        # Lifted features (dfield distill --method lift) are data, not parameters: saved beside the occupancy grid.
        if self.lifted is not None:
            out.update({f"lifted.{k}": v for k, v in self.lifted.state().items()})
        return out

    def load_extra_state(self, tensors: dict[str, torch.Tensor]) -> None:
        if "occupancy.occupied" in tensors:
            self.occupancy = OccupancyGrid(tensors["occupancy.aabb"], 2, self.contraction)
            self.occupancy.load({"aabb": tensors["occupancy.aabb"], "occupied": tensors["occupancy.occupied"]})
        if "lifted.grid" in tensors:
            self.lifted = LiftedFeatures.from_state({k[len("lifted."):]: v for k, v in tensors.items() if k.startswith("lifted.")})


class GridSceneField:
    """A trained grid model seen as a field (see dfield.core.rendering.Field)."""

    def __init__(self, model: GridModel, decoded: bool = False):
        self.model = model
        self.aabb = model.field.aabb
        self.occupancy = model.occupancy
        self.density = model.field.density
        self.color = model.field.color
        if model.lifted is not None:
            lifted = model.lifted
            self.features = (lambda x: lifted.decode(lifted(x))) if decoded and lifted.basis is not None else lifted
        elif model.field.feature_vol is None:
            self.features = None
        elif decoded:
            self.features = lambda x: model.decoder(model.field.features(x))
        else:
            self.features = model.field.features
