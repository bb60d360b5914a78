"""The throughput benchmark runs end to end (tiny model, our side only); no timing
is asserted: the figures depend on the machine."""

import json
import os
import subprocess
import sys

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def run_benchmark(*flags):
  return subprocess.run(
      [sys.executable, os.path.join(REPO, 'benchmarks', 'throughput.py'), *flags],
      cwd=REPO, env=dict(os.environ, PYTHONPATH=REPO), capture_output=True, text=True,
      timeout=600)


def test_benchmark_prints_one_json_line_of_figures():
  result = run_benchmark('--model=ViT-Ti_16', '--image_size=32', '--layers=2', '--batch=4',
                         '--configs=2', '--repeats=2', '--warmup=1', '--skip-torch')
  assert result.returncode == 0, result.stderr[-3000:]
  lines = result.stdout.strip().splitlines()
  assert len(lines) == 1
  record = json.loads(lines[0])
  assert record['model'] == 'ViT-Ti_16' and record['batch'] == 4
  assert record['dtype'] == 'float32' and 'cpu' in record['device']
  for name in ('jax_train', 'jax_eval', 'jax_merged_eval', 'jax_plain_eval', 'jax_train_configs'):
    assert record[f'{name}_img_s'] > 0, name
  for name in ('merged_vs_unmerged_eval_ratio', 'merged_vs_plain_eval_ratio',
               'configs_at_once_speedup', 'jax_peak_mem_mb'):
    assert record[name] > 0, name
  assert 'torch_train_img_s' not in record and 'train_ratio' not in record
  assert record['malloc']  # The allocator the figures were measured with.


def test_benchmark_names_the_preloaded_allocator(monkeypatch):
  monkeypatch.syspath_prepend(os.path.join(REPO, 'benchmarks'))
  import throughput
  monkeypatch.delenv('LD_PRELOAD', raising=False)
  assert throughput.preloaded_malloc() == 'libc'
  monkeypatch.setenv('LD_PRELOAD', '/usr/lib/x86_64-linux-gnu/libtcmalloc_minimal.so.4')
  assert throughput.preloaded_malloc() == 'libtcmalloc_minimal.so.4'


def test_benchmark_rejects_bad_arguments():
  result = run_benchmark('--batch=0', '--skip-torch')
  assert result.returncode == 2 and '--batch must be >= 1' in result.stderr


def test_methods_benchmark_gives_a_row_per_method():
  result = subprocess.run(
      [sys.executable, os.path.join(REPO, 'benchmarks', 'methods.py'),
       '--methods=lora,vpt_deep', '--model=ViT-Ti_16', '--image_size=32', '--layers=2',
       '--batch=4', '--repeats=1', '--warmup=1'],
      cwd=REPO, env=dict(os.environ, PYTHONPATH=REPO), capture_output=True, text=True,
      timeout=600)
  assert result.returncode == 0, result.stderr[-3000:]
  records = [json.loads(line) for line in result.stdout.splitlines() if line.startswith('{')]
  assert [r['method'] for r in records] == ['lora', 'vpt_deep']
  lora, vpt = records
  assert lora['mergeable'] and lora['jax_merged_eval_img_s'] > 0
  assert not vpt['mergeable'] and 'jax_merged_eval_img_s' not in vpt
  assert lora['trainable_params_without_head'] == 2 * 8 * (192 + 576)
  assert vpt['trainable_params_without_head'] == 2 * 5 * 192
  assert '| lora | 12,288 |' in result.stdout and '| vpt_deep | 1,920 |' in result.stdout


def test_other_methods_are_timed_on_our_side_only():
  result = run_benchmark('--method=vpt_deep')
  assert result.returncode == 2 and 'time --method=vpt_deep with --skip-torch' in result.stderr
