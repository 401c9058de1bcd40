"""Progress bars for the library's progress callbacks: one rich display, one bar per label, made on first use.

Every long-running library function takes `progress(label, done, total, stats)`; a `ProgressBars` is such a
callable. Training-like bars show loss, PSNR and rays/s from `stats`; teacher bars vanish when they finish.
"""

from __future__ import annotations

from rich.console import Console
from rich.progress import (
    BarColumn,
    MofNCompleteColumn,
    Progress,
    TaskID,
    TextColumn,
    TimeElapsedColumn,
    TimeRemainingColumn,
)


def format_stats(stats: dict) -> str:
    """'loss 0.0123  psnr 28.10  9.1k rays/s' from whichever of loss, psnr and rays_per_s are present."""
    text = f"loss {stats['loss']:.4f}" if "loss" in stats else ""
    if "psnr" in stats:
        text += f"  psnr {stats['psnr']:.2f}"
    if "rays_per_s" in stats:
        text += f"  {stats['rays_per_s'] / 1000:.1f}k rays/s"
    return text.strip()


class ProgressBars:
    """`with ProgressBars() as bars: train(..., progress=bars)`: a bar per label, shown while the block runs.

    Labels starting with one of `transient` ("teacher" by default) are removed when their bar completes.
    With `enabled=False` nothing is drawn (the callbacks still work, so callers need not branch).
    """

    def __init__(self, enabled: bool = True, console: Console | None = None, transient: tuple[str, ...] = ("teacher",)):
        self.progress = Progress(TextColumn("[bold]{task.description}"), BarColumn(), MofNCompleteColumn(),
                                 TextColumn("{task.fields[stats]}"), TimeElapsedColumn(), TimeRemainingColumn(),
                                 disable=not enabled, console=console)
        self.transient = transient
        self.tasks: dict[str, TaskID] = {}

    def __enter__(self) -> "ProgressBars":
        self.progress.start()
        return self

    def __exit__(self, *exc) -> None:
        self.progress.stop()

    def __call__(self, label: str, done: int, total: int, stats: dict | None = None) -> None:
        task = self.tasks.get(label)
        if task is None:
            task = self.tasks[label] = self.progress.add_task(label, total=total, stats="")
        fields = {"stats": format_stats(stats)} if stats else {}
        self.progress.update(task, completed=done, total=total, **fields)
        if done >= total and label.startswith(self.transient):
            self.progress.remove_task(task)
            del self.tasks[label]
