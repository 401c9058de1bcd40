"""Training-time schedules of a model's own structure, as objects the trainer calls once per step.

The grid model's schedule is what makes a CPU budget work: start with a coarse grid (cheap steps, fast
convergence of the overall shape), mark empty space and shrink the box to the object early, then refine the
grid. Like gsplat's densification strategies, the schedule changes the model and tells the trainer what it
did (`ScheduleStep`), so the trainer knows when to rebuild its optimiser without knowing why.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Protocol


@dataclass
class ScheduleStep:
    """What a schedule did to the model before a step."""

    reshaped: bool = False
    """Parameters were replaced (resampled, resized): an optimiser over the old ones is stale."""
    shrunk: bool = False
    """The scene box shrank to the content: rays that miss it now can only ever see background."""


class Schedule:
    """No structural changes (a model whose shape is fixed, such as the NeRF baseline)."""

    def before_step(self, model, step: int) -> ScheduleStep:
        """Called before training step `step` (0-based); changes `model` in place and says what changed."""
        return ScheduleStep()

    def settled_step(self) -> int:
        """The step after which the model's structure no longer changes (steps then cost about the same)."""
        return 0


class Restructurable(Protocol):
    """What the grid schedule changes: a model with an occupancy grid, a box that can shrink, a resizable grid."""

    shrunk: bool

    def update_occupancy(self, shrink: bool = False, threshold: float | None = None) -> float:
        """Re-mark empty space from the current density, cells at least `threshold` opaque per step (and, with
        `shrink`, shrink the box to what is occupied, setting `shrunk`); return the occupied fraction of the grid."""
        ...

    def resize_grid(self, n_voxels: int) -> None:
        """Resample the grid at about `n_voxels` cells over the current box."""
        ...


class GridSchedule(Schedule):
    """Occupancy updates, one box shrink and coarse-to-fine upsampling of a grid model (settings in
    GridModelConfig): at `occupancy_start` and then every `occupancy_every` steps (every
    `occupancy_every_late` after `occupancy_slow_after`) empty space is re-marked (at `occupancy_threshold`, and at
    `occupancy_threshold_late` from `occupancy_late_step`, by default the shrink); at `shrink_step` the box
    shrinks to the occupied cells; at each of `upsample_steps` the grid grows log-linearly from `voxels_init`
    to `voxels_final` cells.

    Example:
        >>> from dfield.models.grid import GridModelConfig
        >>> s = GridSchedule(GridModelConfig(upsample_steps=(10, 20), voxels_init=8**3, voxels_final=32**3))
        >>> s.voxels_after(1), s.voxels_after(2)
        (4096, 32768)
    """

    def __init__(self, cfg):
        """`cfg`: a GridModelConfig (its schedule fields are read at every step, so edits to it take effect)."""
        self.cfg = cfg

    def voxels_after(self, n_upsamples: int) -> int:
        """The voxel budget after `n_upsamples` refinements."""
        c = self.cfg
        k = len(c.upsample_steps)
        a, b = math.log(c.voxels_init), math.log(c.voxels_final)
        return int(round(math.exp(a + (b - a) * n_upsamples / k))) if k else c.voxels_init

    def settled_step(self) -> int:
        """The last upsample or the box shrink, whichever comes later (occupancy updates go on, at a steady rate)."""
        return max((*self.cfg.upsample_steps, self.cfg.shrink_step))

    def occupancy_due(self, step: int) -> bool:
        """Whether empty space is re-marked before `step`: from `occupancy_start` on, every `occupancy_every` steps
        (every `occupancy_every_late` from `occupancy_slow_after`), and always at `shrink_step`."""
        c = self.cfg
        every = c.occupancy_every if step < c.occupancy_slow_after else c.occupancy_every_late
        return step >= c.occupancy_start and (step - c.occupancy_start) % every == 0 or step == c.shrink_step

    def before_step(self, model: Restructurable, step: int) -> ScheduleStep:
        c = self.cfg
        change = ScheduleStep()
        if self.occupancy_due(step):
            shrink = step >= c.shrink_step and not model.shrunk
            late = step >= (c.shrink_step if c.occupancy_late_step < 0 else c.occupancy_late_step)
            model.update_occupancy(shrink=shrink, threshold=c.occupancy_threshold_late if late else c.occupancy_threshold)
            change.reshaped = change.shrunk = shrink  # a shrink resamples the volumes: new parameters
        if step in c.upsample_steps:
            model.resize_grid(self.voxels_after(c.upsample_steps.index(step) + 1))
            change.reshaped = True
        return change
