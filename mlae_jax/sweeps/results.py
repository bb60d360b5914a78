"""Sweep workdirs -> the paper's table: per-task accuracy over seeds, VTAB-1k's group
means, the mean of group means and the plain task mean, for the final-epoch and the
best-of-evaluations accuracy, beside the paper's numbers.

  python -m mlae_jax.sweeps.results --root=runs --out=runs/report

Conventions:
- Accuracies are in percent; a task's value is the mean over its finished seeds, with
  the sample standard deviation (ddof=1, the usual reporting choice) when it has two or
  more seeds.
- An average is computed only when every task it covers has a finished run; otherwise it
  is reported as incomplete with the missing tasks named, never over the rest.
- An average's value is the weighted mean of the task means. Its std is that of the
  per-seed averages (the average of each seed's runs), given only when every task it
  covers has the same two or more seeds.
"""

from __future__ import annotations

import collections
import os
from typing import Sequence

import numpy as np

from mlae_jax.files import read_json
from mlae_jax.sweeps import layout, paper
from mlae_jax.sweeps.benchmarks import Benchmark, get_benchmark, group_of
from mlae_jax.sweeps.table import (METRICS, STD_NOTE, Collected, Row, RunRecord, Stat,
                                   Table)
from mlae_jax.training.workdir import CONFIG_FILE, RESULTS_FILE, latest_checkpoint_epoch

def read_run(benchmark: str, task: str, seed: int, workdir: str) -> RunRecord:
  """The RunRecord of a finished workdir; ValueError names a file that cannot be used."""
  path = os.path.join(workdir, RESULTS_FILE)
  try:
    results = read_json(path)
    final = float(results['final_epoch_accuracy'])
    best = float(results['best_of_evaluations_accuracy'])
  except (OSError, ValueError, KeyError, TypeError) as error:
    raise ValueError(f'{path}: unreadable results ({type(error).__name__}: {error}).') from None
  if 'seed' in results and results['seed'] != seed:
    raise ValueError(f'{path}: records seed {results["seed"]} but lies in seed_{seed}/.')
  drop_rate = coeff_init = None
  config_path = os.path.join(workdir, CONFIG_FILE)
  if os.path.isfile(config_path):
    try:
      mlae = read_json(config_path).get('adapter', {}).get('mlae', {})
      drop_rate, coeff_init = mlae.get('drop_rate'), mlae.get('coeff_init')
    except (OSError, ValueError, AttributeError):
      pass  # The settings column is informative only.
  return RunRecord(benchmark, task, seed, workdir, final, best,
                   results.get('best_of_evaluations_epoch'), results.get('epochs'),
                   results.get('method'), results.get('model'), results.get('num_eval'),
                   drop_rate, coeff_init)


def collect(root: str) -> Collected:
  """Every `<root>/<benchmark>/<task>/seed_<n>` workdir: finished runs, unfinished ones,
  and files that could not be used (reported, not averaged)."""
  runs, unfinished, problems = [], [], []
  found = layout.sweep_layout(root)
  for benchmark, tasks in found.items():
    for task, seeds in tasks.items():
      for seed, workdir in seeds.items():
        if not os.path.isfile(os.path.join(workdir, RESULTS_FILE)):
          unfinished.append((benchmark, task, seed, workdir))
          continue  # A results.json that is there but broken is a problem, reported.
        try:
          runs.append(read_run(benchmark, task, seed, workdir))
        except ValueError as error:
          problems.append(str(error))
  return Collected(tuple(runs), tuple(unfinished), tuple(problems), tuple(found))


def _stat(values: Sequence[float], seeds: Sequence[int]) -> Stat:
  values = 100 * np.asarray(values, np.float64)
  std = float(np.std(values, ddof=1)) if len(values) > 1 else None
  return Stat(float(np.mean(values)), std, tuple(seeds))


def _setting(runs: Sequence[RunRecord]) -> str:
  settings = {(run.drop_rate, run.coeff_init) for run in runs}
  if len(settings) > 1:
    return 'mixed'
  (drop_rate, coeff_init), = settings or {(None, None)}
  if drop_rate is None or coeff_init is None:
    return ''
  return f'p={drop_rate:g} coeff={coeff_init:g}'


def summarize(collected: Collected, benchmark_name: str) -> Table:
  """The table of one benchmark: a row per task, then the benchmark's averages."""
  runs = tuple(run for run in collected.runs if run.benchmark == benchmark_name)
  unfinished = [u for u in collected.unfinished if u[0] == benchmark_name]
  by_task: dict[str, dict[int, RunRecord]] = collections.defaultdict(dict)
  for run in runs:
    by_task[run.task][run.seed] = run
  found_tasks = tuple(set(by_task) | {u[1] for u in unfinished})
  benchmark = get_benchmark(benchmark_name, found_tasks)
  methods = {run.method for run in runs}
  paper_row = paper.paper_row(benchmark.name, methods.pop()) if len(methods) == 1 else None
  paper_accuracy = paper_row.accuracy if paper_row else {}
  extra_tasks = sorted(set(found_tasks) - set(benchmark.tasks))

  rows = []
  for task in benchmark.tasks + tuple(extra_tasks):
    seeds = sorted(by_task.get(task, {}))
    task_runs = [by_task[task][seed] for seed in seeds]
    stats = {key: _stat([getattr(run, field) for run in task_runs], seeds) if task_runs else None
             for key, field in METRICS.items()}
    rows.append(Row(task, task, task, 'task', group_of(benchmark, task), stats['final'],
                    stats['best'], paper_accuracy.get(task),
                    unfinished_seeds=tuple(sorted(u[2] for u in unfinished if u[1] == task)),
                    setting=_setting(task_runs)))

  for aggregate in benchmark.aggregates:
    missing = tuple(task for task in aggregate.tasks if task not in by_task)
    paper_value = (sum(w * paper_accuracy[t] for t, w in aggregate.weights.items())
                   if all(t in paper_accuracy for t in aggregate.tasks) else None)
    stats, std_note = {'final': None, 'best': None}, ''
    if not missing:
      seed_sets = {tuple(sorted(by_task[task])) for task in aggregate.tasks}
      common = next(iter(seed_sets)) if len(seed_sets) == 1 else ()
      if len(seed_sets) > 1:
        std_note = 'no std: the tasks have different seeds'
      elif len(common) < 2:
        std_note = 'no std: one seed'
      for key, field in METRICS.items():
        task_means = {task: np.mean([getattr(run, field) for run in by_task[task].values()])
                      for task in aggregate.tasks}
        mean = 100 * sum(w * task_means[t] for t, w in aggregate.weights.items())
        std = None
        if not std_note:
          per_seed = [100 * sum(w * getattr(by_task[t][seed], field)
                                for t, w in aggregate.weights.items()) for seed in common]
          std = float(np.std(per_seed, ddof=1))
        stats[key] = Stat(float(mean), std, tuple(common))
    rows.append(Row(aggregate.name, aggregate.label, aggregate.short, 'aggregate', '',
                    stats['final'],
                    stats['best'], paper_value, missing=missing, std_note=std_note))
  return Table(benchmark, tuple(rows),
               _notes(benchmark, runs, unfinished, extra_tasks, paper_row is not None), runs,
               paper_row.column if paper_row else '')


def _notes(benchmark: Benchmark, runs: Sequence[RunRecord], unfinished: Sequence[tuple],
           extra_tasks: Sequence[str], with_paper: bool) -> tuple[str, ...]:
  notes = [STD_NOTE]
  if with_paper:
    notes.append(paper.PROTOCOL_NOTE)
  for field in ('epochs', 'method', 'model'):
    counts = collections.Counter(getattr(run, field) for run in runs)
    if len(counts) > 1:
      spread = ', '.join(f'{value}: {count} run{"s" * (count != 1)}' for value, count in sorted(
          counts.items(), key=lambda item: str(item[0])))
      notes.append(f'The runs differ in {field} ({spread}); check that they belong together.')
  if extra_tasks:
    notes.append(f'Not {benchmark.title} tasks, listed but in no average: '
                 f'{", ".join(extra_tasks)}.')
  for _, task, seed, workdir in unfinished:
    epoch = latest_checkpoint_epoch(workdir)
    progress = f'checkpoint after epoch {epoch}' if epoch else 'no checkpoint yet'
    notes.append(f'Unfinished, not counted: {task} seed {seed} ({progress}; {workdir}).')
  return tuple(notes)


def tables(root: str, benchmarks: Sequence[str] = ()) -> tuple[list[Table], Collected]:
  """The tables of `benchmarks` (default: every benchmark found under `root`)."""
  collected = collect(root)
  names = list(benchmarks) or list(collected.benchmarks)
  return [summarize(collected, name) for name in names], collected


def main(argv: Sequence[str]) -> None:
  from absl import app, flags

  from mlae_jax.sweeps import report

  if len(argv) > 1:
    raise app.UsageError(f'Unexpected arguments: {argv[1:]}')
  values = flags.FLAGS
  benchmarks = [b for b in values.benchmarks.split(',') if b] if values.benchmarks else []
  found, collected = tables(values.root, benchmarks)
  if not found:
    raise SystemExit(f'mlae_jax: no <benchmark>/<task>/seed_<n> workdirs under {values.root}.')
  paths = report.write_report(found, values.out or os.path.join(values.root, 'report'),
                              problems=collected.problems, plot_figures=values.plot)
  print(report.markdown(found, collected.problems))
  print('Wrote ' + ', '.join(paths))


if __name__ == '__main__':
  from absl import app, flags

  flags.DEFINE_string('root', None, 'The sweep root: <root>/<benchmark>/<task>/seed_<n>.')
  flags.DEFINE_string('out', '', 'Where the report goes (default <root>/report).')
  flags.DEFINE_string('benchmarks', '', 'Comma-separated benchmarks (default: all found).')
  flags.DEFINE_bool('plot', True, 'Write a bar plot per benchmark (needs matplotlib).')
  flags.mark_flag_as_required('root')
  app.run(main)
