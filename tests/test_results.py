"""The results tool on workdirs written here with known numbers: per-task mean and sample
std over seeds, VTAB-1k's group means, both averages, missing and unfinished runs, the
paper's row, and the Markdown / CSV / PNG report."""

import csv
import json
import os
import subprocess
import sys

import numpy as np
import pytest

from mlae_jax.data import fgvc, vtab
from mlae_jax.sweeps import layout, paper, report
from mlae_jax.sweeps.benchmarks import BENCHMARKS
from mlae_jax.sweeps.results import collect, summarize, tables

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
NATURAL = ('cifar100', 'caltech101', 'dtd', 'oxford_flowers102', 'oxford_iiit_pet', 'svhn',
           'sun397')
SPECIALIZED = ('patch_camelyon', 'eurosat', 'resisc45', 'diabetic_retinopathy')
STRUCTURED = ('clevr_count', 'clevr_dist', 'dmlab', 'kitti', 'dsprites_loc', 'dsprites_ori',
              'smallnorb_azi', 'smallnorb_ele')


def write_run(root, benchmark, task, seed, final, best=None, *, epochs=500, config=None,
              method='mlae'):
  workdir = layout.run_workdir(str(root), benchmark, task, seed)
  os.makedirs(workdir, exist_ok=True)
  with open(os.path.join(workdir, 'results.json'), 'w') as f:
    json.dump({'task': task, 'model': 'ViT-B_16', 'method': method, 'seed': seed,
               'epochs': epochs, 'num_eval': 1000, 'final_epoch_accuracy': final,
               'best_of_evaluations_accuracy': final if best is None else best,
               'best_of_evaluations_epoch': epochs}, f)
  if config is not None:
    with open(os.path.join(workdir, 'config.json'), 'w') as f:
      json.dump(config, f)
  return workdir


def random_accuracies(tasks, seeds, seed=0):
  rng = np.random.default_rng(seed)
  return {task: {s: float(rng.uniform(0.3, 0.99)) for s in seeds} for task in tasks}


def write_all(root, accuracies, benchmark='vtab', best_offset=0.0):
  for task, by_seed in accuracies.items():
    for seed, value in by_seed.items():
      write_run(root, benchmark, task, seed, value, value + best_offset)


def test_groups_and_tasks_are_the_papers():
  assert BENCHMARKS['vtab'].groups == {'Natural': NATURAL, 'Specialized': SPECIALIZED,
                                       'Structured': STRUCTURED}
  assert BENCHMARKS['vtab'].tasks == NATURAL + SPECIALIZED + STRUCTURED == vtab.TASK_NAMES
  assert BENCHMARKS['fgvc'].tasks == fgvc.TASK_NAMES
  for benchmark in BENCHMARKS.values():
    for aggregate in benchmark.aggregates:
      assert sum(aggregate.weights.values()) == pytest.approx(1.0)


def test_paper_row_gives_the_papers_averages(tmp_path):
  """The paper's per-task numbers through our aggregation give the numbers it reports."""
  write_run(tmp_path, 'vtab', 'svhn', 0, 0.5)
  write_run(tmp_path, 'fgvc', 'cub', 0, 0.5)
  collected = collect(str(tmp_path))
  vtab_table, fgvc_table = summarize(collected, 'vtab'), summarize(collected, 'fgvc')
  assert vtab_table.row('svhn').paper == 90.6
  assert vtab_table.row('Natural').paper == pytest.approx(84.04, abs=0.005)
  assert vtab_table.row('Specialized').paper == pytest.approx(87.525)  # Printed 87.53.
  assert vtab_table.row('Structured').paper == pytest.approx(64.76, abs=0.005)
  assert vtab_table.row('mean_of_group_means').paper == pytest.approx(78.78, abs=0.005)
  assert round(vtab_table.row('mean_of_group_means').paper, 1) == paper.REPORTED_MEANS['vtab'][
      'mean_of_group_means']
  assert vtab_table.row('mean_19_tasks').paper == pytest.approx(76.66, abs=0.005)
  assert fgvc_table.row('mean_5_tasks').paper == pytest.approx(90.86, abs=0.005)


# The "Average" column of the paper's Table 1 (mean of the three group means), per row.
PRINTED_TABLE_1_AVERAGES = {
    'full': 68.9, 'linear_probe': 57.6, 'vpt_deep': 72.0, 'adapter': 73.9, 'adaptformer': 74.7,
    'lora': 74.5, 'fact_tk': 75.6, 'ssf': 75.7, 'repadapter': 76.1, 'mlae': 78.8,
    'NOAH': 75.5, 'SPT-Adapter': 76.4, 'SPT-LoRA': 76.4, 'GLoRA 0.29M': 77.3,
    'GLoRA 0.86M': 78.0}


def test_every_table_1_row_gives_the_average_the_paper_prints():
  """A check of the transcription: each row's 19 numbers, averaged as our tables average
  them, give the row's printed average. Within 0.11, not 0.05: the printed averages come
  from earlier papers' rounded group means (LoRA's three group means give 74.60, printed
  74.5; GLoRA 0.86M 77.92, printed 78.0), as the NOAH and SPT tables print them."""
  rows = {**paper.VTAB_TABLE_1, **paper.OTHER_VTAB_ROWS}
  assert rows.keys() == PRINTED_TABLE_1_AVERAGES.keys()
  for name, row in rows.items():
    headline = paper.paper_average(BENCHMARKS['vtab'], row, 'mean_of_group_means')
    assert abs(headline - PRINTED_TABLE_1_AVERAGES[name]) <= 0.11, (name, headline)


def test_the_comparison_row_is_the_paper_row_of_the_runs_method(tmp_path):
  write_run(tmp_path, 'vtab', 'svhn', 0, 0.5, method='lora')
  table = summarize(collect(str(tmp_path)), 'vtab')
  assert table.paper_label == 'LoRA (paper)' and table.row('svhn').paper == 85.3
  assert table.row('mean_of_group_means').paper == pytest.approx(74.60, abs=0.005)
  write_run(tmp_path, 'vtab', 'dtd', 0, 0.5, method='mlae')
  mixed = summarize(collect(str(tmp_path)), 'vtab')  # Two methods: no one paper row.
  assert mixed.paper_label == '' and mixed.row('svhn').paper is None
  assert any('The runs differ in method' in note for note in mixed.notes)


def test_paper_numbers_as_ours_reproduce_the_table(tmp_path):
  """Seeds at paper - 1, paper, paper + 1 (%): the means are the paper's and every std
  is the sample std of (-1, 0, 1), i.e. 1.0 (the population std would be 0.816)."""
  for task, value in paper.VTAB_TABLE_1['mlae'].accuracy.items():
    for seed, offset in zip((0, 1, 2), (-1.0, 0.0, 1.0)):
      write_run(tmp_path, 'vtab', task, seed, (value + offset) / 100, (value + offset + 2) / 100)
  table = summarize(collect(str(tmp_path)), 'vtab')
  for row in table.rows:
    assert row.complete and row.final.seeds == (0, 1, 2)
    assert row.final.mean == pytest.approx(row.paper, abs=1e-9)
    assert row.best.mean == pytest.approx(row.paper + 2, abs=1e-9)
    assert row.final.std == pytest.approx(1.0) and row.best.std == pytest.approx(1.0)
  assert table.row('mean_of_group_means').final.mean == pytest.approx(78.777, abs=1e-3)
  assert table.row('mean_19_tasks').final.mean == pytest.approx(76.658, abs=1e-3)


def test_averages_match_an_independent_computation(tmp_path):
  seeds = (0, 1, 2)
  accuracies = random_accuracies(vtab.TASK_NAMES, seeds)
  write_all(tmp_path, accuracies, best_offset=0.01)
  table = summarize(collect(str(tmp_path)), 'vtab')

  per_seed = {s: {t: 100 * accuracies[t][s] for t in vtab.TASK_NAMES} for s in seeds}
  groups = {'Natural': NATURAL, 'Specialized': SPECIALIZED, 'Structured': STRUCTURED}
  group_per_seed = {g: [np.mean([per_seed[s][t] for t in tasks]) for s in seeds]
                    for g, tasks in groups.items()}
  for group in groups:
    row = table.row(group)
    assert row.final.mean == pytest.approx(np.mean(group_per_seed[group]))
    assert row.final.std == pytest.approx(np.std(group_per_seed[group], ddof=1))
    assert row.best.mean == pytest.approx(np.mean(group_per_seed[group]) + 1)
  mean_of_groups = [np.mean([group_per_seed[g][i] for g in groups]) for i in range(3)]
  plain = [np.mean(list(per_seed[s].values())) for s in seeds]
  assert table.row('mean_of_group_means').final.mean == pytest.approx(np.mean(mean_of_groups))
  assert table.row('mean_of_group_means').final.std == pytest.approx(
      np.std(mean_of_groups, ddof=1))
  assert table.row('mean_19_tasks').final.mean == pytest.approx(np.mean(plain))
  assert table.row('mean_19_tasks').final.std == pytest.approx(np.std(plain, ddof=1))
  # The two conventions differ (Structured has 8 of the 19 tasks).
  assert abs(np.mean(mean_of_groups) - np.mean(plain)) > 1e-6
  task = table.row('kitti')
  assert task.final.mean == pytest.approx(np.mean([per_seed[s]['kitti'] for s in seeds]))
  assert task.final.std == pytest.approx(np.std([per_seed[s]['kitti'] for s in seeds], ddof=1))
  assert task.group == 'Structured'


def test_a_missing_task_leaves_its_group_and_the_means_incomplete(tmp_path):
  accuracies = random_accuracies([t for t in vtab.TASK_NAMES if t != 'dtd'], (0, 1))
  write_all(tmp_path, accuracies)
  table = summarize(collect(str(tmp_path)), 'vtab')
  assert table.row('dtd').final is None and table.row('dtd').best is None
  for name in ('Natural', 'mean_of_group_means', 'mean_19_tasks'):
    row = table.row(name)
    assert row.final is None and row.best is None and row.missing == ('dtd',), name
  assert table.row('Specialized').complete and table.row('Structured').complete

  text = report.benchmark_markdown(table)
  dtd_line = next(line for line in text.splitlines() if line.startswith('| dtd |'))
  assert report.MISSING in dtd_line
  natural_line = next(line for line in text.splitlines() if 'Natural (7 tasks)' in line)
  assert 'incomplete' in natural_line
  assert 'Natural (7 tasks): not computed, no finished run of dtd.' in text
  records = {r['row']: r for r in report.summary_records(table)}
  assert records['Natural']['status'] == 'incomplete: missing dtd'
  assert records['Natural']['final_epoch_accuracy_mean_pct'] == ''
  assert records['dtd']['status'] == 'missing'
  assert records['Structured']['status'] == 'ok'


def test_unfinished_runs_are_reported_not_counted(tmp_path):
  write_run(tmp_path, 'fgvc', 'cub', 0, 0.80)
  write_run(tmp_path, 'fgvc', 'cub', 1, 0.90)
  os.makedirs(os.path.join(layout.run_workdir(str(tmp_path), 'fgvc', 'cub', 2),
                           'checkpoints', '150'))
  os.makedirs(layout.run_workdir(str(tmp_path), 'fgvc', 'nabirds', 0))
  table = summarize(collect(str(tmp_path)), 'fgvc')
  cub = table.row('cub')
  assert cub.final.seeds == (0, 1) and cub.final.mean == pytest.approx(85.0)
  assert cub.final.std == pytest.approx(np.std([80, 90], ddof=1))
  assert cub.unfinished_seeds == (2,)
  assert table.row('nabirds').final is None and table.row('nabirds').unfinished_seeds == (0,)
  assert any('cub seed 2 (checkpoint after epoch 150' in note for note in table.notes)
  assert table.row('mean_5_tasks').missing == ('nabirds', 'oxford_flowers', 'stanford_dogs',
                                               'stanford_cars')
  assert '0, 1 (2 unfinished)' in report.benchmark_markdown(table)


def test_std_needs_two_seeds_and_the_same_seeds_in_every_task(tmp_path):
  for index, task in enumerate(fgvc.TASK_NAMES):
    write_run(tmp_path, 'fgvc', task, 0, 0.5 + 0.1 * index)
  table = summarize(collect(str(tmp_path)), 'fgvc')
  assert table.row('cub').final.std is None
  mean = table.row('mean_5_tasks')
  assert mean.final.mean == pytest.approx(70.0) and mean.final.std is None
  assert mean.std_note == 'no std: one seed'

  write_run(tmp_path, 'fgvc', 'cub', 1, 0.7)  # cub now has seeds 0 and 1, the others 0.
  table = summarize(collect(str(tmp_path)), 'fgvc')
  mean = table.row('mean_5_tasks')
  assert mean.final.mean == pytest.approx((60 + 60 + 70 + 80 + 90) / 5)  # Task means.
  assert mean.final.std is None and mean.std_note == 'no std: the tasks have different seeds'
  assert table.row('cub').final.std == pytest.approx(np.std([50, 70], ddof=1))


def test_unreadable_or_misplaced_results_are_problems_not_numbers(tmp_path):
  write_run(tmp_path, 'fgvc', 'cub', 0, 0.8)
  bad = layout.run_workdir(str(tmp_path), 'fgvc', 'cub', 1)
  os.makedirs(bad)
  with open(os.path.join(bad, 'results.json'), 'w') as f:
    f.write('{"final_epoch_accuracy": 0.')
  moved = write_run(tmp_path, 'fgvc', 'cub', 2, 0.1)
  os.rename(moved, moved.replace('seed_2', 'seed_3'))
  collected = collect(str(tmp_path))
  assert [(run.task, run.seed) for run in collected.runs] == [('cub', 0)]
  assert len(collected.problems) == 2
  assert any('records seed 2 but lies in seed_3' in p for p in collected.problems)
  assert 'could not be read' in report.markdown([summarize(collected, 'fgvc')],
                                                collected.problems)


def test_other_tasks_and_other_folders_stay_out_of_the_averages(tmp_path):
  for index, task in enumerate(fgvc.TASK_NAMES):
    write_run(tmp_path, 'fgvc', task, 0, 0.5)
  write_run(tmp_path, 'fgvc', 'synthetic', 0, 1.0)
  os.makedirs(os.path.join(tmp_path, 'grid', 'fgvc', 'cub', 'p0.5_coeff1', 'seed_0'))
  write_run(tmp_path / 'grid', 'fgvc', 'cub', 0, 0.0)  # A sweep-shaped folder under grid/.
  found, collected = tables(str(tmp_path))
  assert [table.benchmark.name for table in found] == ['fgvc']
  table = found[0]
  assert table.row('synthetic').group == 'not in the benchmark'
  assert table.row('mean_5_tasks').final.mean == pytest.approx(50.0)
  assert any('synthetic' in note for note in table.notes)


def test_runs_that_differ_in_epochs_are_flagged(tmp_path):
  write_run(tmp_path, 'fgvc', 'cub', 0, 0.5, epochs=300)
  write_run(tmp_path, 'fgvc', 'nabirds', 0, 0.5, epochs=10)
  table = summarize(collect(str(tmp_path)), 'fgvc')
  assert any('differ in epochs (10: 1 run, 300: 1 run)' in note for note in table.notes)


def test_report_files_label_both_metrics(tmp_path):
  accuracies = random_accuracies([t for t in vtab.TASK_NAMES if t != 'eurosat'], (0, 1, 2))
  write_all(tmp_path, accuracies, best_offset=0.02)
  write_run(tmp_path, 'vtab', 'eurosat', 0, 0.9,
            config={'adapter': {'mlae': {'drop_rate': 0.5, 'coeff_init': 4.0}}})
  for index, task in enumerate(fgvc.TASK_NAMES):
    write_run(tmp_path, 'fgvc', task, 0, 0.8)
  found, collected = tables(str(tmp_path))
  out = str(tmp_path / 'report')
  paths = report.write_report(found, out)
  assert sorted(os.listdir(out)) == ['fgvc.png', 'report.md', 'runs.csv', 'summary.csv',
                                     'vtab.png']
  for name in ('vtab.png', 'fgvc.png'):
    with open(os.path.join(out, name), 'rb') as f:
      assert f.read(8) == b'\x89PNG\r\n\x1a\n'

  with open(os.path.join(out, 'summary.csv')) as f:
    rows = list(csv.DictReader(f))
  for column in ('final_epoch_accuracy_mean_pct', 'best_of_evaluations_accuracy_mean_pct'):
    assert column in rows[0]
  by_name = {(r['benchmark'], r['row']): r for r in rows}
  kitti = by_name[('vtab', 'kitti')]
  expected = np.mean([100 * v for v in accuracies['kitti'].values()])
  assert float(kitti['final_epoch_accuracy_mean_pct']) == pytest.approx(expected)
  assert float(kitti['best_of_evaluations_accuracy_mean_pct']) == pytest.approx(expected + 2)
  assert float(kitti['paper_pct']) == 82.6
  assert by_name[('vtab', 'eurosat')]['setting'] == 'p=0.5 coeff=4'
  assert by_name[('vtab', 'eurosat')]['final_epoch_accuracy_std_pct'] == ''
  assert float(by_name[('fgvc', 'mean_5_tasks')]['final_epoch_accuracy_mean_pct']) == (
      pytest.approx(80.0))
  with open(os.path.join(out, 'runs.csv')) as f:
    assert len(list(csv.DictReader(f))) == 18 * 3 + 1 + 5

  text = open(os.path.join(out, 'report.md')).read()
  assert '| ours, final epoch |' in text and '| ours, best of evaluations |' in text
  assert '| MLAE (paper) | 77.80 |' in text  # The paper's row, cifar100 first.
  assert '| 84.04 | 87.53 | 64.76 | 78.78 | 76.66 |' in text  # Its averages, half up.
  assert 'final epoch | best of evaluations | MLAE (paper)' in text
  assert '**Mean of group means (the paper\'s convention)**' in text
  assert '**Mean over the 19 tasks**' in text
  assert 'sample std over seeds (ddof=1)' in text
  assert paper.PROTOCOL_NOTE in text
  assert "the paper's Table 1, mean of group means: Full (85.8M) 69.0" in text
  assert "own papers (mean of group means, no per-task rows): Heart-LoRA" in text
  assert 'Heart-LoRA (per-layer ranking) 76.8 (arXiv 2404.08894v2' in text
  assert "the paper's FGVC means (its table 2): Full 88.5, Adapter 85.7" in text
  assert len(paths) == 5


def test_results_command_line(tmp_path):
  for index, task in enumerate(fgvc.TASK_NAMES):
    write_run(tmp_path, 'fgvc', task, 0, 0.6 + 0.05 * index)
  result = subprocess.run(
      [sys.executable, '-m', 'mlae_jax.sweeps.results', f'--root={tmp_path}',
       f'--out={tmp_path / "out"}', '--noplot'],
      capture_output=True, text=True, cwd=REPO, env={**os.environ, 'PYTHONPATH': REPO})
  assert result.returncode == 0, result.stderr
  assert '## FGVC' in result.stdout
  assert '| **Mean over the 5 tasks** |  | 0 |  | 70.00 | 70.00 | 90.86 | -20.86 |' in result.stdout
  assert sorted(os.listdir(tmp_path / 'out')) == ['report.md', 'runs.csv', 'summary.csv']

  empty = subprocess.run([sys.executable, '-m', 'mlae_jax.sweeps.results',
                          f'--root={tmp_path / "nothing"}'], capture_output=True, text=True,
                         cwd=REPO, env={**os.environ, 'PYTHONPATH': REPO})
  assert empty.returncode != 0 and 'no <benchmark>/<task>/seed_<n> workdirs' in empty.stderr
