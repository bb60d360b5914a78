"""The sweep command with the real train_and_evaluate: a tiny ViT on the synthetic task
under two VTAB task names and two seeds; an interrupted run resumes from its
checkpoint to the same result, finished runs are never touched, and the results tool
tabulates the workdirs."""

import csv
import json
import os
import shutil
import subprocess
import sys
import time

import pytest

from mlae_jax.sweeps import layout
from training_setup import tiny_config_flags

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
TASKS, SEEDS = ('svhn', 'dtd'), (0, 1)


def sweep(root, cache):
  """The runner's command line; the runs share a compilation cache, so only the first
  one compiles."""
  command = [sys.executable, '-m', 'mlae_jax.sweeps.runner', '--benchmark=vtab',
             f'--tasks={",".join(TASKS)}', f'--seeds={",".join(map(str, SEEDS))}',
             f'--root={root}', f'--compilation_cache={cache}', '--config.export_merged=false',
             *tiny_config_flags(epochs=2)]
  started = time.time()
  result = subprocess.run(command, capture_output=True, text=True, cwd=REPO,
                          env={**os.environ, 'PYTHONPATH': REPO})
  assert result.returncode == 0, result.stderr[-3000:]
  return result, time.time() - started


def read(path):
  with open(path) as f:
    return f.read()


def test_real_sweep_skips_finished_runs_and_resumes_an_interrupted_one(tmp_path):
  root, cache = str(tmp_path / 'runs'), str(tmp_path / 'cache')
  result, _ = sweep(root, cache)
  assert '4 runs: 0 skipped, 4 trained, 0 resumed, 0 failed.' in result.stdout
  workdirs = {(t, s): layout.run_workdir(root, 'vtab', t, s) for t in TASKS for s in SEEDS}
  before = {key: read(os.path.join(w, 'results.json')) for key, w in workdirs.items()}
  for (task, seed), text in before.items():
    results = json.loads(text)
    assert results['seed'] == seed and results['epochs'] == 2
    config = json.loads(read(os.path.join(workdirs[task, seed], 'config.json')))
    assert config['data']['task'] == task and config['data']['source'] == 'synthetic'
  # Different seeds train differently.
  assert read(os.path.join(workdirs['svhn', 0], 'metrics.jsonl')) != read(
      os.path.join(workdirs['svhn', 1], 'metrics.jsonl'))

  # Interrupt svhn seed 1 after epoch 1: its results and epoch-2 checkpoint are gone.
  interrupted = workdirs['svhn', 1]
  metrics_before = read(os.path.join(interrupted, 'metrics.jsonl')).splitlines()
  os.remove(os.path.join(interrupted, 'results.json'))
  shutil.rmtree(os.path.join(interrupted, 'checkpoints', '2'))
  untouched = {key: os.stat(os.path.join(w, 'results.json')).st_mtime_ns
               for key, w in workdirs.items() if key != ('svhn', 1)}

  result, _ = sweep(root, cache)
  assert '4 runs: 3 skipped, 0 trained, 1 resumed, 0 failed.' in result.stdout
  assert 'vtab/svhn seed 1: unfinished (checkpoint after epoch 1)' in result.stderr
  assert 'Resuming from the checkpoint after epoch 1.' in result.stderr
  resumed = json.loads(read(os.path.join(interrupted, 'results.json')))
  original = json.loads(before['svhn', 1])
  for field in ('final_epoch_accuracy', 'best_of_evaluations_accuracy',
                'best_of_evaluations_epoch', 'evaluated_epochs'):
    assert resumed[field] == original[field], field
  metrics_after = read(os.path.join(interrupted, 'metrics.jsonl')).splitlines()
  assert metrics_after[0] == metrics_before[0]  # Epoch 1 restored with its timing: not rerun.
  assert json.loads(metrics_after[1])['loss'] == json.loads(metrics_before[1])['loss']
  for key, mtime in untouched.items():
    assert os.stat(os.path.join(workdirs[key], 'results.json')).st_mtime_ns == mtime

  result, seconds = sweep(root, cache)
  assert '4 runs: 4 skipped, 0 trained, 0 resumed, 0 failed.' in result.stdout
  assert 'training in' not in result.stderr and seconds < 30
  for key, workdir in workdirs.items():
    if key != ('svhn', 1):
      assert read(os.path.join(workdir, 'results.json')) == before[key]

  report = subprocess.run([sys.executable, '-m', 'mlae_jax.sweeps.results', f'--root={root}',
                           '--noplot'], capture_output=True, text=True, cwd=REPO,
                          env={**os.environ, 'PYTHONPATH': REPO})
  assert report.returncode == 0, report.stderr
  accuracy = 100 * (json.loads(before['dtd', 0])['final_epoch_accuracy'] +
                    json.loads(before['dtd', 1])['final_epoch_accuracy']) / 2
  dtd_line = next(line for line in report.stdout.splitlines() if line.startswith('| dtd |'))
  assert '| Natural | 0, 1 | p=0.5 coeff=0.25 |' in dtd_line  # Table 10's coeff, our p.
  assert 'incomplete (17 missing)' in report.stdout
  with open(os.path.join(root, 'report', 'summary.csv')) as f:
    dtd = next(row for row in csv.DictReader(f) if row['row'] == 'dtd')
  assert float(dtd['final_epoch_accuracy_mean_pct']) == pytest.approx(accuracy)
