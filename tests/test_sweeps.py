"""The sweep runner and the grid search with a fake trainer: configs, workdir layout,
skip / resume / refusal of other configs, the grid's record, choice, ties and stages."""

import json
import os
import subprocess
import sys

import pytest

from mlae_jax.data import fgvc, vtab
from mlae_jax.files import read_json
from mlae_jax.sweeps import grid_search, layout, runner
from mlae_jax.sweeps.grid_search import GridPoint
from mlae_jax.sweeps.results import collect, summarize

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
VTAB_TABLE_10 = runner.load_config_module('vtab').TABLE_10


class FakeTrainer:
  """Writes config.json when a run starts and results.json when it ends, as
  train_and_evaluate does; `accuracy(config)` gives the run's final-epoch accuracy and
  runs in `fail` (task, seed) or (p, coeff) stop after a checkpoint, like an interruption."""

  def __init__(self, accuracy=lambda config: 0.5, fail=(), num_eval=200):
    self.accuracy, self.fail, self.num_eval = accuracy, set(fail), num_eval
    self.calls = []

  def __call__(self, config, workdir):
    self.calls.append((config, workdir))
    os.makedirs(os.path.join(workdir, 'checkpoints', '1'), exist_ok=True)
    with open(os.path.join(workdir, 'config.json'), 'w') as f:
      f.write(config.to_json_best_effort(indent=2))
    keys = {(config.data.task, config.seed), (config.adapter.mlae.drop_rate, config.adapter.mlae.coeff_init)}
    if keys & self.fail:
      raise KeyboardInterrupt if 'interrupt' in self.fail else RuntimeError('interrupted')
    accuracy = self.accuracy(config)
    results = {'task': config.data.task, 'seed': config.seed, 'epochs': config.epochs,
               'method': 'mlae', 'model': config.model.name, 'num_eval': self.num_eval,
               'final_epoch_accuracy': accuracy, 'best_of_evaluations_accuracy': accuracy,
               'best_of_evaluations_epoch': config.epochs}
    with open(os.path.join(workdir, 'results.json'), 'w') as f:
      json.dump(results, f)
    return results

  def workdirs(self):
    return [workdir for _, workdir in self.calls]


def test_task_lists_match_the_configs_and_the_data_registry():
  assert runner.task_names('vtab', 'all') == vtab.TASK_NAMES == tuple(VTAB_TABLE_10)
  assert runner.task_names('fgvc', 'all') == fgvc.TASK_NAMES == runner.load_config_module(
      'fgvc').DATASETS
  assert runner.task_names('vtab', 'svhn, dtd') == ('svhn', 'dtd')
  with pytest.raises(ValueError, match='once'):
    runner.task_names('vtab', 'svhn,svhn')
  with pytest.raises(ValueError, match='known benchmark'):
    runner.task_names('mine', 'all')


def test_seeds_parse_lists_and_ranges():
  assert runner.parse_seeds('0,1,2') == runner.parse_seeds('0-2') == (0, 1, 2)
  assert runner.parse_seeds([3, 5]) == (3, 5)
  for bad in ('', '1,1', 'a', '-1'):
    with pytest.raises(ValueError):
      runner.parse_seeds(bad)


def test_plan_builds_each_tasks_config_with_the_overrides_and_seed(tmp_path):
  runs = runner.plan('vtab', 'all', '0,1', str(tmp_path),
                     {'epochs': 3, 'warmup_epochs': 0, 'data.data_dir': '/data', 'adapter.mlae.rank': 4})
  assert len(runs) == 38
  assert [(r.task, r.seed) for r in runs[:2]] == [('cifar100', 0), ('caltech101', 0)]
  assert [r.seed for r in runs] == [0] * 19 + [1] * 19  # Seed-major.
  svhn = next(r for r in runs if (r.task, r.seed) == ('svhn', 1))
  assert svhn.workdir == os.path.join(str(tmp_path), 'vtab', 'svhn', 'seed_1')
  assert svhn.config.seed == 1 and svhn.config.epochs == 3 and svhn.config.adapter.mlae.rank == 4
  assert svhn.config.data.data_dir == '/data' and svhn.config.data.task == 'svhn'
  assert (svhn.config.adapter.mlae.drop_rate, svhn.config.adapter.mlae.coeff_init) == (0.5, 4.0)  # Table 10.
  assert (svhn.config.data.train_split, svhn.config.data.eval_split) == ('train800val200', 'test')
  cub = runner.plan('fgvc', 'cub', '0', str(tmp_path))[0]
  assert cub.config.data.source == 'fgvc' and cub.config.epochs == 300
  assert not os.listdir(tmp_path)  # Planning trains and writes nothing.


def test_overrides_must_name_existing_fields_of_the_right_type(tmp_path):
  for overrides, message in [({'epoch': 3}, 'Unknown config field config.epoch'),
                             ({'adapter.mlae.nope': 1}, 'config.adapter.mlae.nope'),
                             ({'nope.rank': 1}, 'config.nope'),
                             ({'seed': 3}, 'config.seed cannot be overridden in a sweep'),
                             ({'baselines': ('lora',)}, 'sweep a baseline under its own root'),
                             ({'data.task': 3}, 'Bad override config.data.task')]:
    with pytest.raises(ValueError, match=message):
      runner.plan('vtab', 'svhn', '0', str(tmp_path), overrides)


def test_missing_config_file_is_named(tmp_path):
  with pytest.raises(ValueError, match='No config file .*nope.py'):
    runner.plan('nope', 'a', '0', str(tmp_path))


def test_sweep_skips_finished_runs_and_resumes_unfinished_ones(tmp_path):
  root = str(tmp_path)
  accuracy = lambda config: {'svhn': 0.9, 'dtd': 0.6}[config.data.task] + 0.01 * config.seed
  first = FakeTrainer(accuracy, fail={('dtd', 1)})
  summary = runner.run_sweep('vtab', 'svhn,dtd', '0,1', root, {'epochs': 3, 'warmup_epochs': 0}, train_fn=first,
                             keep_going=True)
  assert [o for _, o, _ in summary.outcomes] == ['trained', 'trained', 'trained', 'failed']
  assert 'RuntimeError: interrupted' in str(summary)
  dtd_1 = layout.run_workdir(root, 'vtab', 'dtd', 1)
  assert layout.status(dtd_1) == layout.UNFINISHED
  assert runner.describe(runner.plan('vtab', 'dtd', '1', root, {'epochs': 3, 'warmup_epochs': 0})[0]) == (
      'unfinished (checkpoint after epoch 1)')
  finished = {w: os.stat(os.path.join(w, 'results.json')).st_mtime_ns
              for w in first.workdirs()[:3]}

  second = FakeTrainer(accuracy)
  summary = runner.run_sweep('vtab', 'svhn,dtd', '0,1', root, {'epochs': 3, 'warmup_epochs': 0}, train_fn=second)
  assert [o for _, o, _ in summary.outcomes] == ['skipped', 'skipped', 'skipped', 'resumed']
  assert second.workdirs() == [dtd_1]
  for workdir, mtime in finished.items():
    assert os.stat(os.path.join(workdir, 'results.json')).st_mtime_ns == mtime

  third = FakeTrainer(accuracy)
  summary = runner.run_sweep('vtab', 'svhn,dtd', '0,1', root, {'epochs': 3, 'warmup_epochs': 0}, train_fn=third)
  assert not third.calls and len(summary.runs(runner.SKIPPED)) == 4
  table = summarize(collect(root), 'vtab')
  assert table.row('dtd').final.mean == pytest.approx(60.5)
  assert table.row('svhn').final.seeds == (0, 1)


def test_a_failure_stops_the_sweep_unless_told_to_keep_going(tmp_path):
  trainer = FakeTrainer(fail={('svhn', 0)})
  with pytest.raises(RuntimeError, match='interrupted'):
    runner.run_sweep('vtab', 'svhn,dtd', '0', str(tmp_path), train_fn=trainer)
  assert len(trainer.calls) == 1
  interrupt = FakeTrainer(fail={('svhn', 0), 'interrupt'})
  with pytest.raises(KeyboardInterrupt):  # Ctrl-C is never swallowed, even with keep_going.
    runner.run_sweep('vtab', 'svhn,dtd', '0', str(tmp_path), train_fn=interrupt,
                     keep_going=True)


def test_a_trainer_that_writes_no_results_is_a_failure(tmp_path):
  summary = runner.run_sweep('vtab', 'svhn', '0', str(tmp_path), train_fn=lambda c, w: None,
                             keep_going=True)
  assert summary.failed and 'without writing results.json' in summary.failed[0][1]


def test_a_workdir_made_with_another_config_is_refused(tmp_path):
  root = str(tmp_path)
  runner.run_sweep('vtab', 'svhn', '0', root, {'epochs': 3, 'warmup_epochs': 0}, train_fn=FakeTrainer())
  with pytest.raises(runner.WorkdirConflict, match=r'epochs: 3 there, 4 now'):
    runner.run_sweep('vtab', 'svhn', '0', root, {'epochs': 4, 'warmup_epochs': 0}, train_fn=FakeTrainer())
  # Where the data and checkpoints live is not part of the run.
  trainer = FakeTrainer()
  summary = runner.run_sweep('vtab', 'svhn', '0', root,
                             {'epochs': 3, 'warmup_epochs': 0, 'data.data_dir': '/elsewhere', 'progress_bar': False},
                             train_fn=trainer)
  assert not trainer.calls and summary.runs(runner.SKIPPED)


def test_shards_split_the_runs_without_overlap(tmp_path):
  runs = runner.plan('vtab', 'all', '0,1', str(tmp_path))
  shards = [runner.shard(runs, f'{i}/3') for i in range(3)]
  assert sorted(r.workdir for s in shards for r in s) == sorted(r.workdir for r in runs)
  assert runner.shard(runs, '') == runs
  for bad in ('3/3', 'x', '1'):
    with pytest.raises(ValueError):
      runner.shard(runs, bad)


def test_runner_command_line_dry_run(tmp_path):
  FakeTrainer()(runner.task_config('vtab', 'dtd', 1, {'epochs': 7, 'warmup_epochs': 0}),
                os.path.join(tmp_path, 'vtab', 'dtd', 'seed_1'))
  command = [sys.executable, '-m', 'mlae_jax.sweeps.runner', '--tasks=svhn,dtd', '--seeds=0-1',
             f'--root={tmp_path}', '--config.warmup_epochs=0', '--config.epochs=7', '--dry_run']
  result = subprocess.run(command, capture_output=True, text=True, cwd=REPO,
                          env={**os.environ, 'PYTHONPATH': REPO})
  assert result.returncode == 0, result.stderr
  lines = result.stdout.splitlines()
  assert lines[0].startswith('vtab/svhn seed 0: new')
  assert lines[3].startswith('vtab/dtd seed 1: finished')
  conflict = subprocess.run(command[:-2] + ['--config.epochs=8', '--dry_run'],
                            capture_output=True, text=True, cwd=REPO,
                            env={**os.environ, 'PYTHONPATH': REPO})
  assert conflict.returncode == 1 and 'epochs: 7 there, 8 now' in conflict.stderr
  reserved = subprocess.run(command[:-2] + ['--config.seed=3', '--dry_run'],
                            capture_output=True, text=True, cwd=REPO,
                            env={**os.environ, 'PYTHONPATH': REPO})
  assert reserved.returncode == 1 and 'config.seed cannot be overridden' in reserved.stderr


# The grid search.

def val_accuracy(table):
  """A fake trainer's accuracy: `table[(p, coeff)]` on the search split, 0.5 on test."""
  def accuracy(config):
    if config.data.eval_split in ('val200', 'val'):
      return table.get((config.adapter.mlae.drop_rate, config.adapter.mlae.coeff_init), 0.1)
    return 0.5
  return accuracy


def test_grid_search_records_every_point_chooses_the_best_and_retrains_it(tmp_path):
  root = str(tmp_path)
  trainer = FakeTrainer(val_accuracy({(0.3, 2.0): 0.75, (0.9, 0.125): 0.74}))
  record = grid_search.run_grid_search('vtab', 'svhn', root, final_seeds='0,1',
                                       overrides={'epochs': 3, 'warmup_epochs': 0}, train_fn=trainer)
  search, final = trainer.calls[:36], trainer.calls[36:]
  assert len(trainer.calls) == 38
  assert {(c.adapter.mlae.drop_rate, c.adapter.mlae.coeff_init) for c, _ in search} == {
      (p, c) for p in grid_search.P_GRID for c in grid_search.COEFF_GRID}
  for config, workdir in search:
    assert (config.data.train_split, config.data.eval_split) == ('train800', 'val200')
    assert config.epochs == 3 and config.seed == 0
    assert workdir == layout.grid_workdir(root, 'vtab', 'svhn', config.adapter.mlae.drop_rate,
                                          config.adapter.mlae.coeff_init, 0)
  for (config, workdir), seed in zip(final, (0, 1)):
    assert (config.data.train_split, config.data.eval_split) == ('train800val200', 'test')
    assert (config.adapter.mlae.drop_rate, config.adapter.mlae.coeff_init, config.seed) == (0.3, 2.0, seed)
    assert workdir == layout.run_workdir(root, 'vtab', 'svhn', seed)

  saved = read_json(os.path.join(layout.grid_task_dir(root, 'vtab', 'svhn'),
                                        'choice.json'))
  assert saved['complete'] and len(saved['grid']) == 36
  assert saved['choice'] == {'drop_rate': 0.3, 'coeff_init': 2.0,
                             'val_final_epoch_accuracy_mean': 0.75,
                             'val_final_epoch_correct': 150}
  assert saved['tied_with_choice'] == []
  assert saved['paper_choice'] == {'drop_rate': 0.5, 'coeff_init': 4.0}
  assert 'highest final-epoch accuracy on val200' in saved['rule']
  assert saved['search'] == {'train_split': 'train800', 'eval_split': 'val200', 'seeds': [0]}
  assert saved['final'] == {'train_split': 'train800val200', 'eval_split': 'test',
                            'seeds': [0, 1]}
  point = next(p for p in saved['grid'] if (p['drop_rate'], p['coeff_init']) == (0.9, 0.125))
  assert point['val_final_epoch_accuracy'] == [0.74] and point['val_final_epoch_correct'] == 148
  assert record['choice'] == saved['choice']
  grid_md = open(os.path.join(layout.grid_task_dir(root, 'vtab', 'svhn'), 'grid.md')).read()
  assert '| 0.3 | 10.00 | 10.00 | 10.00 | 10.00 | **75.00** | 10.00 |' in grid_md

  # The retrained runs are a sweep: the results tool reads them, not the grid points.
  table = summarize(collect(root), 'vtab')
  assert table.row('svhn').final.mean == 50.0 and table.row('svhn').final.seeds == (0, 1)
  assert table.row('svhn').setting == 'p=0.3 coeff=2'

  again = FakeTrainer(val_accuracy({}))  # Everything finished: nothing is trained.
  assert grid_search.run_grid_search('vtab', 'svhn', root, final_seeds='0,1',
                                     overrides={'epochs': 3, 'warmup_epochs': 0}, train_fn=again)['choice'] == (
                                         saved['choice'])
  assert not again.calls


def test_ties_are_counted_in_examples_and_go_to_the_first_point_in_grid_order(tmp_path):
  # 0.7 and 0.70000001 are both 140 of 200 correct: a tie, which (0.5, 1.0) wins.
  table = {(0.9, 0.25): 0.7, (0.5, 4.0): 0.70000001, (0.5, 1.0): 0.7, (0.7, 0.125): 0.695}
  trainer = FakeTrainer(val_accuracy(table))
  record = grid_search.run_grid_search('vtab', 'dtd', str(tmp_path), train_fn=trainer,
                                       stages=['search'])
  assert (record['choice']['drop_rate'], record['choice']['coeff_init']) == (0.5, 1.0)
  assert record['tied_with_choice'] == [{'drop_rate': 0.5, 'coeff_init': 4.0},
                                        {'drop_rate': 0.9, 'coeff_init': 0.25}]
  assert len(trainer.calls) == 36  # Search stage only.
  assert not os.path.exists(os.path.join(tmp_path, 'vtab'))

  choice = grid_search.choose([  # Without num_eval the accuracies themselves compare.
      {'val_final_epoch_correct': None, 'val_final_epoch_accuracy_mean': a}
      for a in (0.5, 0.7, 0.70000001, 0.70000001)])
  assert choice == (2, [2, 3])


def test_search_over_seeds_sums_their_correct_counts(tmp_path):
  points = grid_search.grid((0.0, 0.5), (1.0,))
  # p=0: 0.80 and 0.60 (280 of 400); p=0.5: 0.71 and 0.70 (282 of 400) wins.
  accuracy = lambda c: {(0.0, 0): 0.8, (0.0, 1): 0.6, (0.5, 0): 0.71, (0.5, 1): 0.7}[
      (c.adapter.mlae.drop_rate, c.seed)]
  record = grid_search.run_grid_search('vtab', 'kitti', str(tmp_path), search_seeds='0,1',
                                       points=points, train_fn=FakeTrainer(accuracy),
                                       stages=['search'])
  assert record['choice']['drop_rate'] == 0.5 and record['choice']['val_final_epoch_correct'] == 282
  assert [p['val_final_epoch_correct'] for p in record['grid']] == [280, 282]


def test_nothing_is_chosen_from_a_partial_grid_and_a_rerun_completes_it(tmp_path):
  root, points = str(tmp_path), grid_search.grid((0.0, 0.5), (1.0, 2.0))
  accuracy = val_accuracy({(0.5, 2.0): 0.9})
  first = FakeTrainer(accuracy, fail={(0.5, 2.0)})
  record = grid_search.run_grid_search('vtab', 'eurosat', root, points=points,
                                       train_fn=first, keep_going=True)
  assert not record['complete'] and record['choice'] is None
  assert [p['finished'] for p in record['grid']] == [True, True, True, False]
  assert len(first.calls) == 4 and not os.path.exists(os.path.join(root, 'vtab'))
  assert 'No choice yet' in open(os.path.join(
      layout.grid_task_dir(root, 'vtab', 'eurosat'), 'grid.md')).read()

  second = FakeTrainer(accuracy)
  record = grid_search.run_grid_search('vtab', 'eurosat', root, points=points,
                                       train_fn=second)
  assert second.workdirs() == [
      layout.grid_workdir(root, 'vtab', 'eurosat', 0.5, 2.0, 0),  # Resumed, then the final.
      layout.run_workdir(root, 'vtab', 'eurosat', 0)]
  assert (record['choice']['drop_rate'], record['choice']['coeff_init']) == (0.5, 2.0)


def test_a_changed_choice_cannot_overwrite_the_final_runs(tmp_path):
  root, points = str(tmp_path), grid_search.grid((0.0, 0.5), (1.0,))
  grid_search.run_grid_search('vtab', 'dmlab', root, points=points,
                              train_fn=FakeTrainer(val_accuracy({(0.5, 1.0): 0.9})))
  with pytest.raises(runner.WorkdirConflict, match='mlae.drop_rate: 0.5 there, 0.0 now'):
    grid_search.run_grid_search('vtab', 'dmlab', root, points=grid_search.grid((0.0,), (1.0,)),
                                train_fn=FakeTrainer())


def test_fgvc_search_selects_on_val_and_retrains_on_train(tmp_path):
  trainer = FakeTrainer(val_accuracy({(0.5, 1.0): 0.8}))
  grid_search.run_grid_search('fgvc', 'cub', str(tmp_path),
                              points=grid_search.grid((0.0, 0.5), (1.0,)), train_fn=trainer)
  splits = [(c.data.train_split, c.data.eval_split, c.adapter.mlae.drop_rate) for c, _ in trainer.calls]
  assert splits == [('train', 'val', 0.0), ('train', 'val', 0.5), ('train', 'test', 0.5)]


def test_grid_search_refuses_overrides_of_what_it_sets(tmp_path):
  for field in ('adapter.mlae.drop_rate', 'adapter.mlae.coeff_init', 'data.train_split', 'data.eval_split',
                'seed'):
    with pytest.raises(ValueError, match=f'config.{field} cannot be overridden'):
      grid_search.run_grid_search('vtab', 'svhn', str(tmp_path), overrides={field: 0.1},
                                  train_fn=FakeTrainer())
  with pytest.raises(ValueError, match='Unknown stages'):
    grid_search.run_grid_search('vtab', 'svhn', str(tmp_path), stages=['serach'])


def test_search_overrides_apply_to_the_search_stage_only(tmp_path):
  trainer = FakeTrainer(val_accuracy({(0.0, 1.0): 0.9}))
  grid_search.run_grid_search('vtab', 'svhn', str(tmp_path), points=[GridPoint(0.0, 1.0)],
                              overrides={'epochs': 5, 'warmup_epochs': 0}, search_overrides={'epochs': 2, 'warmup_epochs': 0},
                              train_fn=trainer)
  assert [c.epochs for c, _ in trainer.calls] == [2, 5]


def test_grid_search_command_line_dry_run(tmp_path):
  result = subprocess.run(
      [sys.executable, '-m', 'mlae_jax.sweeps.grid_search', '--task=svhn', f'--root={tmp_path}',
       '--p_grid=0,0.5', '--coeff_grid=1', '--search_seeds=0,1', '--dry_run'],
      capture_output=True, text=True, cwd=REPO, env={**os.environ, 'PYTHONPATH': REPO})
  assert result.returncode == 0, result.stderr
  assert result.stdout.splitlines() == [
      f'vtab/svhn search p=0 coeff=1 seed 0: new  {tmp_path}/grid/vtab/svhn/p0_coeff1/seed_0',
      f'vtab/svhn search p=0 coeff=1 seed 1: new  {tmp_path}/grid/vtab/svhn/p0_coeff1/seed_1',
      f'vtab/svhn search p=0.5 coeff=1 seed 0: new  {tmp_path}/grid/vtab/svhn/p0.5_coeff1/seed_0',
      f'vtab/svhn search p=0.5 coeff=1 seed 1: new  {tmp_path}/grid/vtab/svhn/p0.5_coeff1/seed_1',
      'vtab/svhn: search incomplete, nothing chosen']
  assert not os.listdir(tmp_path)


@pytest.mark.parametrize('name', ('lily', 'neat', 'dmlora', 'heat', 'pear'))
def test_sweeps_plan_the_seed_systems_with_their_recipes_and_fields(tmp_path, name):
  field = {'lily': 'dim', 'neat': 'rank', 'dmlora': 'branches', 'heat': 'heads_off',
           'pear': 'prune_ratio'}[name]
  value = {'heads_off': 0.5, 'prune_ratio': 0.25}.get(field, 2)
  run, = runner.plan('vtab', 'svhn', '0', str(tmp_path),
                     {'adapter.method': name, f'adapter.{name}.{field}': value})
  assert run.config.adapter.method == name and run.config.adapter[name][field] == value
  assert (run.config.learning_rate, run.config.weight_decay, run.config.epochs) == (
      1e-3, 1e-4, 100)  # Its recipe (the shared one for NEAT and the reconstructions).
  assert run.workdir == os.path.join(str(tmp_path), 'vtab', 'svhn', 'seed_0')
