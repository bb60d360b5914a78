"""The benchmarks a sweep covers: their tasks, VTAB-1k's three groups, and the averages
the tables report (each a fixed weighting of the per-task accuracies).

VTAB-1k's headline number in the paper (and its peers) is the mean of the three group
means (Natural, Specialized, Structured); the plain mean over the 19 tasks weights the
8 Structured tasks more. Both are reported, each labelled.
"""

from __future__ import annotations

import dataclasses

from mlae_jax.data import fgvc, vtab


@dataclasses.dataclass(frozen=True)
class Aggregate:
  """A weighted mean of per-task accuracies; `weights` sum to 1."""
  name: str  # An identifier, for CSV.
  label: str  # What it is, for the Markdown tables.
  short: str  # For column headers and plots.
  weights: dict[str, float]

  @property
  def tasks(self) -> tuple[str, ...]:
    return tuple(self.weights)


@dataclasses.dataclass(frozen=True)
class Benchmark:
  name: str  # The sweep's folder name under the root: <root>/<name>/<task>/seed_<n>.
  title: str
  tasks: tuple[str, ...]
  groups: dict[str, tuple[str, ...]]  # Group name -> tasks (empty: no groups).

  @property
  def aggregates(self) -> tuple[Aggregate, ...]:
    """Group means, then (with groups) the mean of group means, then the task mean."""
    rows = [Aggregate(group, f'{group} ({len(tasks)} tasks)', group, _uniform(tasks))
            for group, tasks in self.groups.items()]
    if self.groups:
      weights = {task: 1 / (len(self.groups) * len(tasks))
                 for tasks in self.groups.values() for task in tasks}
      rows.append(Aggregate('mean_of_group_means',
                            'Mean of group means (the paper\'s convention)',
                            'Mean of group means', weights))
    rows.append(Aggregate(f'mean_{len(self.tasks)}_tasks',
                          f'Mean over the {len(self.tasks)} tasks',
                          f'Mean of {len(self.tasks)} tasks', _uniform(self.tasks)))
    return tuple(rows)


def _uniform(tasks: tuple[str, ...]) -> dict[str, float]:
  return {task: 1 / len(tasks) for task in tasks}


VTAB = Benchmark('vtab', 'VTAB-1k', vtab.TASK_NAMES,
                 {'Natural': vtab.NATURAL, 'Specialized': vtab.SPECIALIZED,
                  'Structured': vtab.STRUCTURED})
FGVC = Benchmark('fgvc', 'FGVC', fgvc.TASK_NAMES, {})
BENCHMARKS = {benchmark.name: benchmark for benchmark in (VTAB, FGVC)}


def get_benchmark(name: str, found_tasks: tuple[str, ...] = ()) -> Benchmark:
  """The benchmark called `name`; another name (a custom config file's sweep) becomes a
  benchmark of the tasks found for it, without groups."""
  if name in BENCHMARKS:
    return BENCHMARKS[name]
  return Benchmark(name, name, tuple(sorted(found_tasks)), {})


def group_of(benchmark: Benchmark, task: str) -> str:
  for group, tasks in benchmark.groups.items():
    if task in tasks:
      return group
  return '' if task in benchmark.tasks else 'not in the benchmark'
