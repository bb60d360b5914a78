"""Errors that end a run with a message saying what happened and what to do.

The CLI prints them as one line; nothing of a broken state is saved when they are
raised, so the same command, re-run once the cause is fixed, resumes from what is intact.
"""


class RunError(RuntimeError):
  """A run cannot go on."""


class WorkdirLocked(RunError):
  """Another process is training in the workdir."""


class CheckpointsDamaged(RunError):
  """No checkpoint of a workdir can be restored."""


class OutputWriteError(RunError):
  """A checkpoint, export or results file could not be written (disk full, I/O error)."""


class TrainingDiverged(RunError):
  """The loss or a trained parameter stopped being finite."""
