"""Where sweep runs live and how far each has got.

A sweep run's workdir is `<root>/<benchmark>/<task>/seed_<n>`, and the grid search's
points are `<root>/grid/<benchmark>/<task>/p<p>_coeff<c>/seed_<n>`. A run is finished
when its workdir holds the `results.json` that `train_and_evaluate` writes last, parsed
and complete, and unfinished otherwise when the workdir exists (training resumes from
its checkpoints; `mlae_jax.training.workdir` owns a workdir's layout, and says how far
one got: `latest_checkpoint_epoch`).
"""

from __future__ import annotations

import os
import re

from mlae_jax.training.workdir import results_complete

GRID_DIR = 'grid'
CHOICE_FILE = 'choice.json'
_SEED_DIR = re.compile(r'^seed_(\d+)$')

FINISHED, UNFINISHED, NEW = 'finished', 'unfinished', 'new'


def run_workdir(root: str, benchmark: str, task: str, seed: int) -> str:
  return os.path.join(root, benchmark, task, f'seed_{seed}')


def grid_point_name(drop_rate: float, coeff_init: float) -> str:
  return f'p{drop_rate:g}_coeff{coeff_init:g}'


def grid_task_dir(root: str, benchmark: str, task: str) -> str:
  return os.path.join(root, GRID_DIR, benchmark, task)


def grid_workdir(root: str, benchmark: str, task: str, drop_rate: float, coeff_init: float,
                 seed: int) -> str:
  return os.path.join(grid_task_dir(root, benchmark, task),
                      grid_point_name(drop_rate, coeff_init), f'seed_{seed}')


def status(workdir: str) -> str:
  """FINISHED (results.json parses and is complete), UNFINISHED (a workdir without
  one: it resumes) or NEW."""
  if results_complete(workdir):
    return FINISHED
  return UNFINISHED if os.path.isdir(workdir) else NEW


def seed_dirs(task_dir: str) -> dict[int, str]:
  """seed -> workdir for the `seed_<n>` folders in `task_dir`."""
  if not os.path.isdir(task_dir):
    return {}
  found = {}
  for name in sorted(os.listdir(task_dir)):
    match = _SEED_DIR.match(name)
    if match and os.path.isdir(os.path.join(task_dir, name)):
      found[int(match.group(1))] = os.path.join(task_dir, name)
  return found


def sweep_layout(root: str) -> dict[str, dict[str, dict[int, str]]]:
  """benchmark -> task -> seed -> workdir for every `<root>/<benchmark>/<task>/seed_<n>`
  folder; folders without that shape (the grid search's `grid/`, reports) are ignored."""
  layout: dict[str, dict[str, dict[int, str]]] = {}
  if not os.path.isdir(root):
    return layout
  for benchmark in sorted(os.listdir(root)):
    benchmark_dir = os.path.join(root, benchmark)
    if benchmark == GRID_DIR or not os.path.isdir(benchmark_dir):
      continue
    tasks = {task: seeds for task in sorted(os.listdir(benchmark_dir))
             if (seeds := seed_dirs(os.path.join(benchmark_dir, task)))}
    if tasks:
      layout[benchmark] = tasks
  return layout
