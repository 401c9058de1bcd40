"""Errors a user can fix (bad data, bad run folder, divergence) are printed as one clear line, no traceback."""

from __future__ import annotations

import sys

from dfield.data.dataset import DataError
from dfield.io.run import RunError
from dfield.training.trainer import TrainingDiverged

USER_ERRORS = (DataError, RunError, TrainingDiverged, ValueError, FileNotFoundError)


def report(e: BaseException) -> None:
    kind = {DataError: "bad data", RunError: "bad run", TrainingDiverged: "training diverged"}.get(type(e), "error")
    print(f"dfield: {kind}: {e}", file=sys.stderr)
