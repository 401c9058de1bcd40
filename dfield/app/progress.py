"""A rich progress bar for training that shows loss, PSNR and rays/s, and stays quiet when disabled."""

from __future__ import annotations

from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn, TimeRemainingColumn


class TrainProgress:
    def __init__(self, total: int, start: int = 0, enabled: bool = True, label: str = "train"):
        self.enabled = enabled
        self.progress = Progress(
            TextColumn(f"[bold]{label}"), BarColumn(), MofNCompleteColumn(), TextColumn("{task.fields[stats]}"),
            TimeElapsedColumn(), TimeRemainingColumn(), disable=not enabled,
        )
        self.task = self.progress.add_task("train", total=total, completed=start, stats="")

    def __enter__(self):
        self.progress.__enter__()
        return self

    def __exit__(self, *exc):
        return self.progress.__exit__(*exc)

    def update(self, step: int, stats: dict | None) -> None:
        if stats is None:
            self.progress.update(self.task, completed=step)
            return
        text = f"loss {stats['loss']:.4f}"  # feature distillation has no PSNR or ray rate to show
        if "psnr" in stats:
            text += f"  psnr {stats['psnr']:.2f}"
        if "rays_per_s" in stats:
            text += f"  {stats['rays_per_s'] / 1000:.1f}k rays/s"
        self.progress.update(self.task, completed=step, stats=text)
