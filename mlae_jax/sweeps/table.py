"""The records of the results table: one finished run, the runs collected from a sweep
root, and the table's rows of per-task and aggregate accuracies (what `results`
computes and `report` writes out)."""

from __future__ import annotations

import dataclasses

from mlae_jax.sweeps.benchmarks import Benchmark

STD_NOTE = 'std: sample standard deviation over seeds (ddof=1).'
METRICS = {'final': 'final_epoch_accuracy', 'best': 'best_of_evaluations_accuracy'}
METRIC_LABELS = {'final': 'final epoch', 'best': 'best of evaluations'}


@dataclasses.dataclass(frozen=True)
class RunRecord:
  """One finished run's results.json (accuracies as fractions, as written there) and
  the searched settings from its config.json when present."""
  benchmark: str
  task: str
  seed: int
  workdir: str
  final_epoch_accuracy: float
  best_of_evaluations_accuracy: float
  best_of_evaluations_epoch: int | None = None
  epochs: int | None = None
  method: str | None = None
  model: str | None = None
  num_eval: int | None = None
  drop_rate: float | None = None
  coeff_init: float | None = None


@dataclasses.dataclass(frozen=True)
class Collected:
  runs: tuple[RunRecord, ...]
  unfinished: tuple[tuple[str, str, int, str], ...]  # (benchmark, task, seed, workdir)
  problems: tuple[str, ...]
  benchmarks: tuple[str, ...]


@dataclasses.dataclass(frozen=True)
class Stat:
  """Percent accuracy over seeds."""
  mean: float
  std: float | None  # Sample std (ddof=1); None with one seed or mismatched seed sets.
  seeds: tuple[int, ...]


@dataclasses.dataclass(frozen=True)
class Row:
  name: str
  label: str  # Long, for the detail table.
  short: str  # For column headers and plots.
  kind: str  # 'task' or 'aggregate'.
  group: str
  final: Stat | None  # None: missing (task) or incomplete (aggregate).
  best: Stat | None
  paper: float | None
  missing: tuple[str, ...] = ()  # Aggregate: its tasks with no finished run.
  unfinished_seeds: tuple[int, ...] = ()  # Task: seeds whose runs have not finished.
  std_note: str = ''  # Why an aggregate has no std.
  setting: str = ''  # Task: 'p=<p> coeff=<c>' from the runs' configs ('mixed' if they differ).

  @property
  def complete(self) -> bool:
    return self.final is not None


@dataclasses.dataclass(frozen=True)
class Table:
  benchmark: Benchmark
  rows: tuple[Row, ...]
  notes: tuple[str, ...]
  runs: tuple[RunRecord, ...]
  paper_label: str = ''  # The column of the paper's row of the runs' method ('' if none).

  def row(self, name: str) -> Row:
    for row in self.rows:
      if row.name == name:
        return row
    raise KeyError(name)
