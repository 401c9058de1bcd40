"""The viewer during training (`dfield train --view`): a trainer hook hands the viewer a snapshot of the model
every few seconds, only while a browser is watching, so an unwatched run trains at full speed.

The snapshot is a copy made between steps: the trainer changes its parameters (and, at grid upsampling, their
shapes) in place, and a frame rendered from the live model could see half an update.
"""

from __future__ import annotations

import copy
import time

from dfield.io.run import Run
from dfield.view.server import Viewer
from dfield.view.session import ViewerSession


def live_session(trainer) -> ViewerSession:
    """A ViewerSession over a snapshot of a trainer's model (no checkpoint needed yet)."""
    run = Run(trainer.run_dir, trainer.cfg, trainer.scene, _snapshot(trainer), trainer.step, {})
    return ViewerSession(run, device=trainer.cfg.device)


def _snapshot(trainer):
    model = copy.deepcopy(trainer.model)
    model.eval()
    for p in model.parameters():
        p.requires_grad_(False)
    return model


class LiveView:
    """Trainer hook: while some browser is connected, give the viewer's session a fresh snapshot and re-render,
    every `every` seconds of wall time or, when frames are slow, seldom enough that re-rendering takes at most
    `share` of the time (the frames share the training's cores: on 2 cores a 256x256 frame every 5 s slowed
    training by 24-26 %). Call it as `trainer.train(hooks=[LiveView(viewer)])`."""

    def __init__(self, viewer: Viewer, every: float = 5.0, share: float = 0.1):
        self.viewer, self.every, self.share = viewer, every, share
        self.last = time.monotonic()
        self.snapshots = 0

    def interval(self) -> float:
        """Seconds between snapshots now: `every`, or longer so that the last refresh's rendering (every level of
        every browser tab) is at most `share` of it."""
        cost = sum(sum(getattr(getattr(state, "renderer", None), "last_seconds", {}).values())
                   for state in list(self.viewer.clients.values()))
        return max(self.every, cost / self.share)

    def __call__(self, trainer) -> None:
        now = time.monotonic()
        if not self.viewer.clients or now - self.last < self.interval():
            return
        self.viewer.session.set_model(_snapshot(trainer), trainer.step)
        self.viewer.refresh(rerender=True)
        self.last = time.monotonic()
        self.snapshots += 1
