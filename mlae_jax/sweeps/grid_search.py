r"""The paper's per-task hyper-parameter search (appendix A.2): every (dropout p,
coefficient init) of the grid is trained on train800 and evaluated on val200; the best
setting is retrained on train800val200 and evaluated on test.

  python -m mlae_jax.sweeps.grid_search --tasks=svhn --root=runs/search \
      --final_seeds=0,1,2 --config.data.data_dir=/data/tfds

Layout under the root: grid points in `grid/<benchmark>/<task>/p<p>_coeff<c>/seed_<n>`,
the record of the search (every point's result, the choice and the rule) in
`grid/<benchmark>/<task>/choice.json` and `grid.md`, and the retrained runs in
`<benchmark>/<task>/seed_<n>`, the sweep layout, so `mlae_jax.sweeps.results
--root=<root>` tabulates them. Like the sweep, a re-run skips finished runs and resumes
unfinished ones; a setting is chosen only once every grid point has finished.

FGVC has no train800/val200: its search trains on train and evaluates on val, and the
chosen setting trains on train again and is evaluated on test (VPT's protocol).
"""

from __future__ import annotations

import dataclasses
import os
import sys
from typing import Any, Mapping, Sequence

from mlae_jax import cli
from mlae_jax.checkpoints.download import CheckpointDownloadError
from mlae_jax.files import read_json, write_json
from mlae_jax.sweeps import layout, runner
from mlae_jax.sweeps.runner import Run, TrainFn
from mlae_jax.training import config_checks
from mlae_jax.training.errors import RunError
from mlae_jax.training.workdir import RESULTS_FILE

P_GRID = (0.0, 0.1, 0.3, 0.5, 0.7, 0.9)
COEFF_GRID = (0.125, 0.25, 0.5, 1.0, 2.0, 4.0)
# benchmark -> stage -> (train split, evaluation split).
STAGE_SPLITS = {
    'vtab': {'search': ('train800', 'val200'), 'final': ('train800val200', 'test')},
    'fgvc': {'search': ('train', 'val'), 'final': ('train', 'test')},
}
STAGES = ('search', 'final')
RESERVED = {**runner.RESERVED, 'adapter.mlae.drop_rate': 'the search sets it',
            'adapter.mlae.coeff_init': 'the search sets it',
            'data.train_split': 'each stage sets it', 'data.eval_split': 'each stage sets it'}
RULE = ('the highest final-epoch accuracy on {split}, counted in correctly classified '
        'examples summed over the search seeds (the accuracy itself when a run does not '
        'record num_eval); ties go to the first tied point in grid order: the smaller p, then '
        'the smaller coefficient init.')


@dataclasses.dataclass(frozen=True)
class GridPoint:
  drop_rate: float
  coeff_init: float

  def __str__(self) -> str:
    return f'p={self.drop_rate:g} coeff={self.coeff_init:g}'


def grid(p_grid: Sequence[float] = P_GRID,
         coeff_grid: Sequence[float] = COEFF_GRID) -> tuple[GridPoint, ...]:
  """The points in grid order (p-major, both ascending as given)."""
  return tuple(GridPoint(float(p), float(c)) for p in p_grid for c in coeff_grid)


def _splits(benchmark: str, stage: str) -> tuple[str, str]:
  if benchmark not in STAGE_SPLITS:
    raise ValueError(f'No search protocol for benchmark {benchmark!r}; known: '
                     f'{", ".join(STAGE_SPLITS)}.')
  return STAGE_SPLITS[benchmark][stage]


def _stage_config(benchmark: str, stage: str, task: str, seed: int, point: GridPoint,
                  overrides: Sequence[Mapping[str, Any]], module: Any):
  config = module.get_config(task)
  for layer in overrides:
    runner.apply_overrides(config, layer, reserved=RESERVED)
  config.seed = seed
  config.adapter.mlae.drop_rate, config.adapter.mlae.coeff_init = (point.drop_rate,
                                                                 point.coeff_init)
  config.data.train_split, config.data.eval_split = _splits(benchmark, stage)
  return config_checks.resolve(config)


def search_runs(benchmark: str, task: str, root: str, seeds: Sequence[int],
                points: Sequence[GridPoint], overrides: Mapping[str, Any] = {},
                search_overrides: Mapping[str, Any] = {}, module: Any = None) -> list[Run]:
  """A run per (grid point, search seed), point-major, workdirs checked."""
  module = module or runner.load_config_module(benchmark)
  runs = [Run(benchmark, task, seed,
              layout.grid_workdir(root, benchmark, task, point.drop_rate, point.coeff_init, seed),
              _stage_config(benchmark, 'search', task, seed, point,
                            (overrides, search_overrides), module),
              name=f'{benchmark}/{task} search {point} seed {seed}')
          for point in points for seed in seeds]
  for run in runs:
    runner.check_workdir(run)
  return runs


def final_runs(benchmark: str, task: str, root: str, seeds: Sequence[int], point: GridPoint,
               overrides: Mapping[str, Any] = {}, module: Any = None) -> list[Run]:
  """The chosen point retrained per final seed, in the sweep's workdirs."""
  module = module or runner.load_config_module(benchmark)
  runs = [Run(benchmark, task, seed, layout.run_workdir(root, benchmark, task, seed),
              _stage_config(benchmark, 'final', task, seed, point, (overrides,), module),
              name=f'{benchmark}/{task} final {point} seed {seed}')
          for seed in seeds]
  for run in runs:
    runner.check_workdir(run)
  return runs


def _point_record(point: GridPoint, runs: Sequence[Run]) -> dict[str, Any]:
  """One grid point's validation results over the search seeds."""
  record: dict[str, Any] = {
      'drop_rate': point.drop_rate, 'coeff_init': point.coeff_init,
      'seeds': [run.seed for run in runs], 'workdirs': [run.workdir for run in runs],
      'status': [layout.status(run.workdir) for run in runs]}
  if any(state != layout.FINISHED for state in record['status']):
    record['finished'] = False
    return record
  results = [read_json(os.path.join(run.workdir, RESULTS_FILE)) for run in runs]
  final = [float(r['final_epoch_accuracy']) for r in results]
  best = [float(r['best_of_evaluations_accuracy']) for r in results]
  num_eval = [r.get('num_eval') for r in results]
  record.update(
      finished=True, val_final_epoch_accuracy=final,
      val_final_epoch_accuracy_mean=sum(final) / len(final),
      val_best_of_evaluations_accuracy=best,
      val_best_of_evaluations_accuracy_mean=sum(best) / len(best), num_eval=num_eval,
      val_final_epoch_correct=(sum(round(a * n) for a, n in zip(final, num_eval))
                               if all(isinstance(n, int) for n in num_eval) else None))
  return record


def choose(records: Sequence[Mapping[str, Any]]) -> tuple[int, list[int]]:
  """(index of the chosen record, indices of all records tied with it) under RULE;
  `records` are finished points in grid order."""
  counted = all(record['val_final_epoch_correct'] is not None for record in records)
  scores = [record['val_final_epoch_correct'] if counted else
            record['val_final_epoch_accuracy_mean'] for record in records]
  best = max(scores)
  tied = [index for index, score in enumerate(scores) if score == best]
  return tied[0], tied


def search_record(benchmark: str, task: str, points: Sequence[GridPoint],
                  runs: Sequence[Run], final_seeds: Sequence[int],
                  paper_choice: tuple[float, float] | None = None) -> dict[str, Any]:
  """The search's record: the protocol, every point's results, and the choice (None
  until every point has finished)."""
  per_point = {point: [run for run in runs if
                       (run.config.adapter.mlae.drop_rate, run.config.adapter.mlae.coeff_init) ==
                       (point.drop_rate, point.coeff_init)] for point in points}
  records = [_point_record(point, per_point[point]) for point in points]
  search_split, final_split = _splits(benchmark, 'search'), _splits(benchmark, 'final')
  record: dict[str, Any] = {
      'benchmark': benchmark, 'task': task,
      'rule': RULE.format(split=search_split[1]),
      'search': {'train_split': search_split[0], 'eval_split': search_split[1],
                 'seeds': sorted({run.seed for run in runs})},
      'final': {'train_split': final_split[0], 'eval_split': final_split[1],
                'seeds': list(final_seeds)},
      'grid': records,
      'complete': all(r['finished'] for r in records),
      'choice': None, 'tied_with_choice': [],
      'paper_choice': (None if paper_choice is None else
                       {'drop_rate': paper_choice[0], 'coeff_init': paper_choice[1]}),
  }
  if record['complete']:
    chosen, tied = choose(records)
    record['choice'] = {key: records[chosen][key] for key in (
        'drop_rate', 'coeff_init', 'val_final_epoch_accuracy_mean', 'val_final_epoch_correct')}
    record['tied_with_choice'] = [{'drop_rate': records[i]['drop_rate'],
                                   'coeff_init': records[i]['coeff_init']}
                                  for i in tied if i != chosen]
  return record


def grid_markdown(record: Mapping[str, Any]) -> str:
  """The grid as a p x coefficient table of mean final-epoch validation accuracy (%),
  the choice in bold."""
  p_values = sorted({r['drop_rate'] for r in record['grid']})
  c_values = sorted({r['coeff_init'] for r in record['grid']})
  cells = {(r['drop_rate'], r['coeff_init']): r for r in record['grid']}
  choice = record['choice']
  lines = [f'# {record["benchmark"]}/{record["task"]}: search on '
           f'{record["search"]["train_split"]} -> {record["search"]["eval_split"]}', '',
           f'Final-epoch {record["search"]["eval_split"]} accuracy (%), mean over search seeds '
           f'{record["search"]["seeds"]}; rows p, columns coefficient init.', '',
           '| p \\ coeff | ' + ' | '.join(f'{c:g}' for c in c_values) + ' |',
           '|---|' + '---|' * len(c_values)]
  for p in p_values:
    row = []
    for c in c_values:
      cell = cells.get((p, c))
      if cell is None:
        row.append('')
      elif not cell['finished']:
        row.append('unfinished')
      else:
        text = f'{100 * cell["val_final_epoch_accuracy_mean"]:.2f}'
        chosen = choice and (choice['drop_rate'], choice['coeff_init']) == (p, c)
        row.append(f'**{text}**' if chosen else text)
    lines.append(f'| {p:g} | ' + ' | '.join(row) + ' |')
  lines.append('')
  if choice:
    lines.append(f'Chosen: p = {choice["drop_rate"]:g}, coefficient init = '
                 f'{choice["coeff_init"]:g}. Rule: {record["rule"]}')
    if record['tied_with_choice']:
      tied = ', '.join(f'p={t["drop_rate"]:g} coeff={t["coeff_init"]:g}'
                       for t in record['tied_with_choice'])
      lines.append(f'Tied with the choice: {tied}.')
  else:
    lines.append('No choice yet: not every grid point has finished.')
  if record.get('paper_choice'):
    paper_choice = record['paper_choice']
    lines.append(f'The paper\'s choice (Table 10): p = {paper_choice["drop_rate"]:g}, '
                 f'coefficient init = {paper_choice["coeff_init"]:g}.')
  return '\n'.join(lines) + '\n'


def write_record(root: str, record: Mapping[str, Any]) -> str:
  directory = layout.grid_task_dir(root, record['benchmark'], record['task'])
  write_json(os.path.join(directory, layout.CHOICE_FILE), record)
  with open(os.path.join(directory, 'grid.md'), 'w') as f:
    f.write(grid_markdown(record))
  return os.path.join(directory, layout.CHOICE_FILE)


def run_grid_search(benchmark: str, task: str, root: str, search_seeds: Sequence[int] = (0,),
                    final_seeds: Sequence[int] = (0,), overrides: Mapping[str, Any] = {},
                    search_overrides: Mapping[str, Any] = {},
                    points: Sequence[GridPoint] | None = None,
                    train_fn: TrainFn | None = None, configs_dir: str | None = None,
                    stages: Sequence[str] = STAGES, keep_going: bool = False,
                    dry_run: bool = False, configs_at_once: int = 1) -> dict[str, Any]:
  """Search (the grid on the search splits), record and choose, then retrain the choice
  on the final splits; finished runs are skipped, unfinished ones resumed. Returns the
  search record (also written to choice.json), with the final runs' summary under
  'final_summary' when that stage ran. With `configs_at_once` = K > 1, the search
  trains K grid points of a seed at once in one vmapped step."""
  unknown = set(stages) - set(STAGES)
  if unknown:
    raise ValueError(f'Unknown stages {sorted(unknown)}; use {", ".join(STAGES)}.')
  module = runner.load_config_module(benchmark, configs_dir)
  points = tuple(points or grid())
  paper_choice = getattr(module, 'TABLE_10', {}).get(task)
  runs = search_runs(benchmark, task, root, runner.parse_seeds(search_seeds), points,
                     overrides, search_overrides, module)
  final_seeds = runner.parse_seeds(final_seeds)
  if dry_run:
    for run in runs:
      print(f'{run}: {runner.describe(run)}  {run.workdir}')
  elif 'search' in stages:
    if configs_at_once > 1 and train_fn is None:
      runner.execute_at_once(runs, configs_at_once, keep_going)
    else:
      runner.execute(runs, train_fn, keep_going)
  record = search_record(benchmark, task, points, runs, final_seeds, paper_choice)
  if not dry_run:
    write_record(root, record)
  if 'final' in stages and record['choice']:
    point = GridPoint(record['choice']['drop_rate'], record['choice']['coeff_init'])
    finals = final_runs(benchmark, task, root, final_seeds, point, overrides, module)
    if dry_run:
      for run in finals:
        print(f'{run}: {runner.describe(run)}  {run.workdir}')
    else:
      record['final_summary'] = runner.execute(finals, train_fn, keep_going)
  return record


def _floats(text: str) -> tuple[float, ...]:
  try:
    values = tuple(float(v) for v in text.split(',') if v.strip())
  except ValueError:
    raise ValueError(f'Bad grid {text!r}: use comma-separated numbers.') from None
  if not values or len(set(values)) != len(values):
    raise ValueError(f'Bad grid {text!r}: name each value once.')
  return values


def main(argv: Sequence[str]) -> None:
  from absl import app, flags
  from absl import logging as absl_logging

  if len(argv) > 1:
    raise app.UsageError(f'Unexpected arguments: {argv[1:]}')
  absl_logging.set_verbosity(absl_logging.INFO)
  values = flags.FLAGS
  stages = [stage for stage in values.stages.split(',') if stage]
  failed = False
  try:
    tasks = runner.task_names(values.benchmark, values.tasks)
    points = grid(_floats(values.p_grid), _floats(values.coeff_grid))
    if values.compilation_cache and not values.dry_run:
      runner.set_compilation_cache(values.compilation_cache)
    for task in tasks:
      record = run_grid_search(
          values.benchmark, task, values.root, values.search_seeds, values.final_seeds,
          flags.FLAGS['config'].override_values, flags.FLAGS['search_config'].override_values,
          points, configs_dir=values.configs_dir or None,
          stages=stages, keep_going=values.keep_going,
          dry_run=values.dry_run, configs_at_once=values.configs_at_once)
      choice = record['choice']
      print(f'{values.benchmark}/{task}: ' + (
          f'chose p={choice["drop_rate"]:g} coeff={choice["coeff_init"]:g} '
          f'(val final-epoch accuracy {100 * choice["val_final_epoch_accuracy_mean"]:.2f}%)'
          if choice else 'search incomplete, nothing chosen'))
      summary = record.get('final_summary')
      if summary is not None:
        print(summary)
        failed |= bool(summary.failed)
      failed |= not record['complete'] and not values.dry_run and 'search' in stages
  except (ValueError, OSError, RunError, CheckpointDownloadError) as error:
    cli.exit_with(error)  # Bad input or a fault: the message says what to do.
  if failed:
    sys.exit(1)


if __name__ == '__main__':
  from absl import app, flags
  from ml_collections import config_flags

  from mlae_jax.training.defaults import base_config

  flags.DEFINE_string('benchmark', 'vtab', 'vtab or fgvc (configs/<benchmark>.py).')
  flags.DEFINE_string('tasks', None, 'Comma-separated tasks, or all.')
  flags.DEFINE_alias('task', 'tasks')
  flags.DEFINE_string('root', None, 'The search root (layout in the module docstring).')
  flags.DEFINE_string('search_seeds', '0', 'Seeds of every grid point; the rule sums them.')
  flags.DEFINE_string('final_seeds', '0', 'Seeds of the chosen setting\'s retraining.')
  flags.DEFINE_string('p_grid', ','.join(f'{p:g}' for p in P_GRID), 'Dropout p values.')
  flags.DEFINE_string('coeff_grid', ','.join(f'{c:g}' for c in COEFF_GRID),
                      'Coefficient init values.')
  flags.DEFINE_string('stages', ','.join(STAGES), 'search, final or both.')
  flags.DEFINE_string('configs_dir', '', 'Folder of <benchmark>.py (default: the repo\'s).')
  flags.DEFINE_bool('dry_run', False, 'List the runs and their state; train nothing.')
  flags.DEFINE_integer('configs_at_once', 1, 'Grid points of a seed trained at once in one '
                       'vmapped step (e.g. 6: a row of the grid).', lower_bound=1)
  flags.DEFINE_bool('keep_going', False, 'Go on after a failed run (exit status 1 at the end).')
  flags.DEFINE_string('compilation_cache', '', 'A folder for JAX\'s persistent compilation '
                      'cache, shared by the runs (default: off).')
  for name, help_text in (('config', 'Overrides for both stages: --config.<field>=<value>.'),
                          ('search_config', 'Overrides for the search stage only (e.g. fewer '
                           'epochs).')):
    cli.config_value(  # DEFINE_config_dict parses its overrides now.
        lambda: config_flags.DEFINE_config_dict(name, base_config(), help_text), base_config(),
        ('config', 'search_config'))
  flags.mark_flags_as_required(['tasks', 'root'])
  app.run(main, flags_parser=cli.flags_parser(base_config(), ('config', 'search_config')))
