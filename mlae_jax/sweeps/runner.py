r"""A sweep over a benchmark's tasks and seeds: one `train_and_evaluate` run per
(task, seed) in `<root>/<benchmark>/<task>/seed_<n>`, from the task's config file
(`configs/<benchmark>.py:<task>`) with the same overrides for every run.

  python -m mlae_jax.sweeps.runner --benchmark=vtab --tasks=all --seeds=0,1,2 --root=runs \
      --config.data.data_dir=/data/tfds

Re-running the same command skips finished runs (results.json present) and resumes
unfinished ones from their latest checkpoint, so a sweep can be interrupted at any time.
A workdir whose saved config.json differs from the run's config (other than where data
and checkpoint files live) is refused rather than skipped or resumed, so runs made with
other settings never enter the same table. Runs go seed-major (every task of the first
seed, then the next seed), so a whole table exists early.
"""

from __future__ import annotations

import dataclasses
import functools
import importlib.util
import logging
import os
import sys
import time
import traceback
from typing import Any, Callable, Mapping, Sequence

import ml_collections

from mlae_jax import cli
from mlae_jax.checkpoints.download import CheckpointDownloadError
from mlae_jax.sweeps import layout
from mlae_jax.training import config_checks
from mlae_jax.training import workdir as run_files
from mlae_jax.training.errors import RunError, TrainingDiverged
from mlae_jax.training.workdir import WorkdirConflict

TrainFn = Callable[[ml_collections.ConfigDict, str], Any]
REPO_CONFIGS_DIR = os.path.join(
    os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__)))), 'configs')
SKIPPED, TRAINED, RESUMED, FAILED = 'skipped', 'trained', 'resumed', 'failed'
# Fields a sweep sets itself or cannot honour -> why they cannot be overridden.
RESERVED = {
    'seed': 'the sweep sets it from --seeds',
    'baselines': 'a sweep trains one method per root; sweep a baseline under its own root '
                 '(e.g. --config.adapter.method=lora --root=runs/lora)',
}


@dataclasses.dataclass(frozen=True, eq=False)
class Run:
  benchmark: str
  task: str
  seed: int
  workdir: str
  config: ml_collections.ConfigDict
  name: str = ''  # For messages; defaults to <benchmark>/<task> seed <n>.
  # Config fields this run may change on resume (run_files.RESUMABLE_FIELDS).
  allow_changes: tuple[str, ...] = ()

  def __str__(self) -> str:
    return self.name or f'{self.benchmark}/{self.task} seed {self.seed}'


@dataclasses.dataclass
class SweepSummary:
  """What a sweep did: (run, outcome, detail) per run, in order."""
  outcomes: list[tuple[Run, str, str]] = dataclasses.field(default_factory=list)

  def runs(self, outcome: str) -> list[Run]:
    return [run for run, o, _ in self.outcomes if o == outcome]

  @property
  def failed(self) -> list[tuple[Run, str]]:
    return [(run, detail) for run, o, detail in self.outcomes if o == FAILED]

  def __str__(self) -> str:
    counts = ', '.join(f'{len(self.runs(o))} {o}' for o in (SKIPPED, TRAINED, RESUMED, FAILED))
    lines = [f'{len(self.outcomes)} runs: {counts}.']
    lines += [f'  failed: {run} ({run.workdir}): {detail}' for run, detail in self.failed]
    return '\n'.join(lines)


def load_config_module(benchmark: str, configs_dir: str | None = None) -> Any:
  """`<configs_dir>/<benchmark>.py` (default: the repository's configs/) as a module."""
  path = os.path.join(configs_dir or REPO_CONFIGS_DIR, f'{benchmark}.py')
  if not os.path.isfile(path):
    raise ValueError(f'No config file {path} for benchmark {benchmark!r}; pass --configs_dir '
                     'the folder holding <benchmark>.py (the repository\'s configs/).')
  spec = importlib.util.spec_from_file_location(f'mlae_jax_sweep_configs_{benchmark}', path)
  module = importlib.util.module_from_spec(spec)
  spec.loader.exec_module(module)
  if not hasattr(module, 'get_config'):
    raise ValueError(f'{path} has no get_config(task).')
  return module


def task_names(benchmark: str, tasks: str | Sequence[str]) -> tuple[str, ...]:
  """`tasks` as a tuple; 'all' is every task of a known benchmark, in the paper's order."""
  from mlae_jax.sweeps.benchmarks import BENCHMARKS

  if isinstance(tasks, str):
    if tasks == 'all':
      if benchmark not in BENCHMARKS:
        raise ValueError(f'--tasks=all needs a known benchmark ({", ".join(BENCHMARKS)}); '
                         f'name the tasks of {benchmark!r}.')
      return BENCHMARKS[benchmark].tasks
    tasks = [task.strip() for task in tasks.split(',') if task.strip()]
  if not tasks or len(set(tasks)) != len(tasks):
    raise ValueError(f'Name each task once (or use all), got {list(tasks)}.')
  return tuple(tasks)


def parse_seeds(seeds: str | Sequence[int]) -> tuple[int, ...]:
  """'0,1,2' or '0-2' (or ints) -> (0, 1, 2)."""
  if isinstance(seeds, str):
    values: list[int] = []
    for part in filter(None, (p.strip() for p in seeds.split(','))):
      first, _, last = part.partition('-')
      try:
        values += range(int(first), int(last or first) + 1)
      except ValueError:
        raise ValueError(f'Bad seeds {seeds!r}: use e.g. 0,1,2 or 0-2.') from None
    seeds = values
  seeds = tuple(int(seed) for seed in seeds)
  if not seeds or len(set(seeds)) != len(seeds) or min(seeds) < 0:
    raise ValueError(f'Name each seed (>= 0) once, got {list(seeds)}.')
  return seeds


def apply_overrides(config: ml_collections.ConfigDict, overrides: Mapping[str, Any],
                    reserved: Mapping[str, str] = {}) -> ml_collections.ConfigDict:
  """Sets dotted `overrides` ({'epochs': 100, 'data.data_dir': '/data'}) on `config`;
  each must name an existing field, and none a `reserved` one (field -> why)."""
  for key, value in overrides.items():
    if key in reserved:
      raise ValueError(f'config.{key} cannot be overridden in a sweep: {reserved[key]}.')
    target = config
    *parents, leaf = key.split('.')
    for depth, parent in enumerate(parents):
      if not isinstance(target, ml_collections.ConfigDict) or parent not in target:
        raise ValueError(f'Unknown config field config.{".".join(parents[:depth + 1])} '
                         f'(in override {key}).')
      target = target[parent]
    if not isinstance(target, ml_collections.ConfigDict) or leaf not in target:
      raise ValueError(f'Unknown config field config.{key}.')
    try:
      target[leaf] = value
    except TypeError as error:
      raise ValueError(f'Bad override config.{key} = {value!r}: {error}') from None
  return config


def task_config(benchmark: str, task: str, seed: int, overrides: Mapping[str, Any] = {},
                configs_dir: str | None = None,
                module: Any = None) -> ml_collections.ConfigDict:
  """The run config of (task, seed): the config file's get_config(task), the overrides,
  then the seed, made whole by the method's recipe and checked (`config_checks.resolve`)."""
  module = module or load_config_module(benchmark, configs_dir)
  config = apply_overrides(module.get_config(task), overrides, reserved=RESERVED)
  config.seed = seed
  return config_checks.resolve(config)


def check_workdir(run: Run) -> bool:
  """Raises WorkdirConflict if `run.workdir` holds a run made with another config (one
  check, shared with training: `mlae_jax.training.workdir.check_config`); returns
  whether the run changes allowed fields, so that a finished one trains on."""
  try:
    return bool(run_files.check_config(run.workdir, run.config, run.allow_changes))
  except WorkdirConflict as error:
    raise WorkdirConflict(f'{run}: {error}') from None


def plan(benchmark: str, tasks: str | Sequence[str], seeds: str | Sequence[int], root: str,
         overrides: Mapping[str, Any] = {}, configs_dir: str | None = None,
         allow_changes: Sequence[str] = ()) -> list[Run]:
  """Every (seed, task) run of the sweep, seed-major, with its config, each workdir
  checked against its saved config; nothing is trained."""
  module = load_config_module(benchmark, configs_dir)
  allow_changes = run_files.check_allowed(allow_changes)
  runs = [Run(benchmark, task, seed, layout.run_workdir(root, benchmark, task, seed),
              task_config(benchmark, task, seed, overrides, module=module),
              allow_changes=allow_changes)
          for seed in parse_seeds(seeds) for task in task_names(benchmark, tasks)]
  for run in runs:
    check_workdir(run)
  return runs


def shard(runs: Sequence[Run], spec: str) -> list[Run]:
  """The runs of shard 'i/n' (every n-th run from the i-th), to split a sweep over
  processes or machines that share the root; '' is all of them."""
  if not spec:
    return list(runs)
  try:
    index, count = (int(part) for part in spec.split('/'))
  except ValueError:
    raise ValueError(f'Bad shard {spec!r}: use i/n, e.g. 0/4.') from None
  if not 0 <= index < count:
    raise ValueError(f'Bad shard {spec!r}: need 0 <= i < n.')
  return list(runs[index::count])


def describe(run: Run) -> str:
  """The run's state, e.g. 'finished', 'unfinished (checkpoint after epoch 25)', 'new'."""
  state = layout.status(run.workdir)
  if state == layout.UNFINISHED:
    epoch = run_files.latest_checkpoint_epoch(run.workdir)
    return f'{state} (checkpoint after epoch {epoch})' if epoch else f'{state} (no checkpoint)'
  return state


def default_train_fn() -> TrainFn:
  from mlae_jax.training.train import train_and_evaluate
  return train_and_evaluate


def execute(runs: Sequence[Run], train_fn: TrainFn | None = None,
            keep_going: bool = False) -> SweepSummary:
  """Trains every run that has not finished (resuming unfinished ones) and skips the
  finished ones. A failure stops the sweep, or with `keep_going` is recorded and the
  sweep goes on."""
  summary = SweepSummary()
  for index, run in enumerate(runs, 1):
    where = f'[{index}/{len(runs)}] {run}'
    if _skip_if_finished(run, where, summary):
      continue
    logging.info('%s: %s -> training in %s.', where, describe(run), run.workdir)
    fn = train_fn or functools.partial(default_train_fn(), allow_changes=run.allow_changes)
    _train_group([run], lambda: fn(run.config, run.workdir), where, keep_going, summary)
  return summary


def execute_at_once(runs: Sequence[Run], configs_at_once: int,
                    keep_going: bool = False) -> SweepSummary:
  """As `execute`, but the unfinished runs train `configs_at_once` at a time in one
  compiled step (`train_and_evaluate_at_once`): runs of the same task and seed, which
  may differ only in their MLAE drop rate and coefficient (a grid search's points).
  A group that cannot go on together (runs checkpointed after different epochs, or one
  run that diverges) trains one run at a time instead, each with its own outcome."""
  from mlae_jax.training.train import train_and_evaluate, train_and_evaluate_at_once

  summary = SweepSummary()
  pending: dict[tuple[str, str, int], list[Run]] = {}
  for run in runs:
    if not _skip_if_finished(run, str(run), summary):
      pending.setdefault((run.benchmark, run.task, run.seed), []).append(run)
  groups = [group[i:i + configs_at_once] for group in pending.values()
            for i in range(0, len(group), configs_at_once)]
  for index, group in enumerate(groups, 1):
    where = f'[group {index}/{len(groups)}]'
    allow_changes = group[0].allow_changes
    logging.info('%s training %d runs at once: %s', where, len(group), '; '.join(map(str, group)))
    try:
      _train_group(group, lambda group=group: train_and_evaluate_at_once(
          [r.config for r in group], [r.workdir for r in group], allow_changes), where,
                   keep_going=False, summary=summary)
      continue
    except Exception as error:  # pylint: disable=broad-except  # Sorted out below.
      separable = isinstance(error, TrainingDiverged) or 'different epochs' in str(error)
      if len(group) == 1 or not separable:
        if not keep_going:
          raise
        _record_failure(group, where, error, summary)
        continue
      logging.warning('%s: %s; training the group one run at a time.', where, error)
    for run in group:
      _train_group([run], lambda run=run: train_and_evaluate(run.config, run.workdir,
                                                             allow_changes),
                   f'{where} {run}', keep_going, summary)
  return summary


def _skip_if_finished(run: Run, where: str, summary: SweepSummary) -> bool:
  """Records a finished run as skipped, unless it changes allowed fields (more epochs)."""
  if layout.status(run.workdir) != layout.FINISHED or check_workdir(run):
    return False
  logging.info('%s: finished, skipped.', where)
  summary.outcomes.append((run, SKIPPED, ''))
  return True


def _train_group(group: Sequence[Run], train: Callable[[], Any], where: str, keep_going: bool,
                 summary: SweepSummary) -> None:
  """Runs `train` for the unfinished runs of `group` and records their outcomes; a
  failure (or a run left without results) stops the sweep unless `keep_going`."""
  outcomes = [RESUMED if layout.status(r.workdir) == layout.UNFINISHED else TRAINED
              for r in group]
  started = time.time()
  try:
    train()
    for run in group:
      if layout.status(run.workdir) != layout.FINISHED:
        raise RuntimeError(f'training returned without writing {run_files.RESULTS_FILE}')
  except Exception as error:  # pylint: disable=broad-except
    if not keep_going:
      raise
    _record_failure(group, where, error, summary)
    return
  detail = f'{time.time() - started:.1f} s'
  if len(group) > 1:
    detail += f' for {len(group)} at once'
  summary.outcomes.extend((r, o, detail) for r, o in zip(group, outcomes))


def _record_failure(group: Sequence[Run], where: str, error: BaseException,
                    summary: SweepSummary) -> None:
  logging.error('%s failed:\n%s', where,
                ''.join(traceback.format_exception(type(error), error, error.__traceback__)))
  summary.outcomes.extend((r, FAILED, f'{type(error).__name__}: {error}') for r in group)


def run_sweep(benchmark: str, tasks: str | Sequence[str], seeds: str | Sequence[int],
              root: str, overrides: Mapping[str, Any] = {}, train_fn: TrainFn | None = None,
              configs_dir: str | None = None, keep_going: bool = False,
              shard_spec: str = '', allow_changes: Sequence[str] = ()) -> SweepSummary:
  """plan + execute: the sweep of `tasks` x `seeds` under `root`."""
  runs = plan(benchmark, tasks, seeds, root, overrides, configs_dir, allow_changes)
  return execute(shard(runs, shard_spec), train_fn, keep_going)


def set_compilation_cache(directory: str) -> None:
  """JAX's persistent compilation cache in `directory`: the runs of a sweep share
  compiled steps whenever their shapes agree (the same model, batch and class count)."""
  import jax

  jax.config.update('jax_compilation_cache_dir', os.path.abspath(directory))
  jax.config.update('jax_persistent_cache_min_compile_time_secs', 0)
  jax.config.update('jax_persistent_cache_min_entry_size_bytes', -1)


def main(argv: Sequence[str]) -> None:
  from absl import app, flags
  from absl import logging as absl_logging

  if len(argv) > 1:
    raise app.UsageError(f'Unexpected arguments: {argv[1:]}')
  absl_logging.set_verbosity(absl_logging.INFO)
  values = flags.FLAGS
  overrides = flags.FLAGS['config'].override_values
  try:
    runs = shard(plan(values.benchmark, values.tasks, values.seeds, values.root, overrides,
                      values.configs_dir or None, values.allow_changes), values.shard)
  except ValueError as error:
    cli.exit_with(error)
  if values.dry_run:
    for run in runs:
      print(f'{run}: {describe(run)}  {run.workdir}')
    return
  if values.compilation_cache:
    set_compilation_cache(values.compilation_cache)
  try:
    summary = execute(runs, keep_going=values.keep_going)
  except (ValueError, OSError, RunError, CheckpointDownloadError) as error:
    cli.exit_with(error)  # Bad input or a fault: the message says what to do.
  print(summary)
  if summary.failed:
    sys.exit(1)


if __name__ == '__main__':
  from absl import app, flags
  from ml_collections import config_flags

  from mlae_jax.training.defaults import base_config

  flags.DEFINE_string('benchmark', 'vtab', 'The config file configs/<benchmark>.py to sweep.')
  flags.DEFINE_string('tasks', 'all', 'Comma-separated tasks, or all.')
  flags.DEFINE_string('seeds', '0', 'Comma-separated seeds (or a range, 0-2).')
  flags.DEFINE_string('root', None, 'Runs go to <root>/<benchmark>/<task>/seed_<n>.')
  flags.DEFINE_string('configs_dir', '', 'Folder of <benchmark>.py (default: the repo\'s).')
  flags.DEFINE_string('shard', '', 'i/n: run only every n-th run from the i-th.')
  flags.DEFINE_bool('dry_run', False, 'List the runs and their state; train nothing.')
  flags.DEFINE_bool('keep_going', False, 'Go on after a failed run (exit status 1 at the end).')
  flags.DEFINE_list('allow_changes', [], 'Config fields the runs may change on resume (e.g. '
                    'epochs, to train finished runs longer); recorded in each workdir.')
  flags.DEFINE_string('compilation_cache', '', 'A folder for JAX\'s persistent compilation '
                      'cache, shared by the runs (default: off).')
  cli.config_value(lambda: config_flags.DEFINE_config_dict(  # Parses its overrides now.
      'config', base_config(), 'Overrides applied to every run: --config.<field>=<value>, '
      'as for mlae_jax.main.'), base_config())
  flags.mark_flag_as_required('root')
  app.run(main, flags_parser=cli.flags_parser(base_config()))
