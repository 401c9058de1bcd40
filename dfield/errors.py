"""Errors a user can fix: bad input data, a bad run folder, a teacher that cannot run, a query or edit that
cannot be answered, training that diverged. Each message names the file or value and the problem; the command
line prints it as one line (exit code 2), never a traceback.

Every layer raises these; this module imports nothing from dfield, so any module may import it.
"""

from __future__ import annotations


class DfieldError(ValueError):
    """Base of every error a user can fix by changing their input."""


class DataError(DfieldError):
    """Bad input data. The message names the file and the problem."""


class RunError(DfieldError):
    """A run folder that is missing, incomplete or unreadable."""


class TeacherError(DfieldError):
    """A teacher cannot be built or run (missing package, weights or files). The message says what to do."""


class QueryError(DfieldError):
    """A query that cannot be answered: empty, out of range, or on a run without features."""


class EditError(DfieldError):
    """An edit that cannot be applied: bad spec, empty selection, incompatible scenes."""


class TrainingDiverged(DfieldError):
    """The loss became NaN or infinite; the last good checkpoint is kept."""
