"""benchmarks/gpu_check.py --small runs end to end on the CPU and prints one JSON line with
every field, of the right type, positive where measured, and the VTAB-1k estimate pinned to
500 epochs x 16 steps x the measured step time. No speed is asserted (machine-dependent)."""

import importlib.util
import json
import math
import os
import subprocess
import sys

import pytest

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
MEASURED = ('train_images_per_s', 'train_step_s', 'train_first_call_s', 'eval_images_per_s',
            'eval_step_s', 'eval_first_call_s', 'peak_memory_mib')
CONFIGS = ('jax_train_configs_images_per_s', 'jax_train_configs_step_s',
           'jax_train_configs_first_call_s', 'configs_at_once_speedup',
           'jax_configs_peak_memory_mib', 'vtab_task_configs_train_minutes')


HAS_TORCH = all(importlib.util.find_spec(m) for m in ('torch', 'timm'))
# The CPU path wherever the tests run: JAX and PyTorch both kept off any GPU.
CPU_ONLY = dict(os.environ, PYTHONPATH=REPO, JAX_PLATFORMS='cpu', CUDA_VISIBLE_DEVICES='')


def run_check(*flags):
  result = subprocess.run(
      [sys.executable, os.path.join(REPO, 'benchmarks', 'gpu_check.py'), '--small', *flags],
      cwd=REPO, env=CPU_ONLY, capture_output=True, text=True, timeout=300)
  assert result.returncode == 0, result.stderr[-3000:]
  lines = result.stdout.strip().splitlines()
  assert len(lines) == 1, result.stdout
  return json.loads(lines[0])


@pytest.fixture(scope='module')
def record():
  return run_check()


def positive(value):
  return isinstance(value, (int, float)) and not isinstance(value, bool) and value > 0


def test_says_what_ran_it(record):
  assert record['small_mode'] is True and 'SMALL' in record['setup']
  assert (record['model'], record['layers'], record['image_size'], record['batch']) == (
      'ViT-Ti_16', 2, 32, 8)
  assert record['jax_backend'] == 'cpu' and record['device_kind'] == 'cpu'
  assert isinstance(record['jax_version'], str) and record['device_count'] >= 1
  # 'auto' on the CPU: float32, with precision.choose_compute_dtype's reason.
  assert record['compute_dtype'] == 'float32'
  assert 'no native bf16 on CPU' in record['compute_dtype_reason']
  assert any('no accelerator' in w for w in record['warnings'])


@pytest.mark.skipif(not HAS_TORCH, reason='needs torch and timm')
def test_measures_ours_pytorch_and_k_configs(record):
  for side in ('jax', 'torch'):
    for field in MEASURED:
      assert positive(record[f'{side}_{field}']), f'{side}_{field}'
    assert record[f'{side}_peak_memory_kind'] == 'process_rss_increase'
  assert record['torch_skipped_reason'] is None and record['torch_device'] == 'cpu'
  assert record['configs_at_once'] == 2 and record['configs_at_once_error'] is None
  for field in CONFIGS + ('train_speed_ratio_ours_over_torch',
                          'eval_speed_ratio_ours_over_torch'):
    assert positive(record[field]), field
  # Images/s counts the images of every configuration: K x batch / step time.
  assert record['jax_train_configs_images_per_s'] == pytest.approx(
      2 * 8 / record['jax_train_configs_step_s'], rel=1e-3)
  assert record['jax_train_images_per_s'] == pytest.approx(
      8 / record['jax_train_step_s'], rel=1e-3)


def test_vtab_estimate_is_epochs_x_steps_x_step_time(record):
  assert (record['vtab_task_epochs'], record['vtab_task_steps_per_epoch']) == (500, 16)
  # SPT's schedule: e % 10 == 0 (0..480: 49) or e >= 490 (10).
  assert record['vtab_task_evaluations'] == 59
  assert record['vtab_task_test_images_assumed'] == 10_000
  # Rounding: step time to 1e-6 s, minutes to 1e-3.
  assert math.isclose(record['vtab_task_train_minutes'],
                      500 * 16 * record['jax_train_step_s'] / 60, abs_tol=1e-3)
  assert math.isclose(record['vtab_task_configs_train_minutes'],
                      500 * 16 * record['jax_train_configs_step_s'] / 60, abs_tol=1e-3)
  assert math.isclose(record['vtab_task_eval_minutes'],
                      59 * 10_000 / record['jax_eval_images_per_s'] / 60, abs_tol=1e-3)
  assert math.isclose(record['vtab_task_total_minutes'],
                      record['vtab_task_train_minutes'] + record['vtab_task_eval_minutes'],
                      abs_tol=2e-3)
  assert '10000 test images' in record['vtab_task_estimate_assumptions']


def test_skip_torch_gives_null_torch_fields_with_a_reason():
  record = run_check('--skip_torch', '--test_images=20000')
  torch_fields = [k for k in record if k.startswith('torch_') and k != 'torch_skipped_reason']
  assert len(torch_fields) >= 10
  assert all(record[k] is None for k in torch_fields)
  assert record['train_speed_ratio_ours_over_torch'] is None
  assert record['torch_skipped_reason'] == 'skipped by --skip_torch'
  assert positive(record['jax_train_step_s'])
  assert math.isclose(record['vtab_task_eval_minutes'],
                      59 * 20_000 / record['jax_eval_images_per_s'] / 60, abs_tol=1e-3)


def test_out_of_memory_is_told_apart(monkeypatch):
  monkeypatch.syspath_prepend(os.path.join(REPO, 'benchmarks'))
  import gpu_check
  assert gpu_check.out_of_memory(RuntimeError('RESOURCE_EXHAUSTED: Out of memory while trying '
                                              'to allocate 41.2GiB'))
  assert gpu_check.out_of_memory(RuntimeError('CUDA out of memory. Tried to allocate 2.00 GiB'))
  assert not gpu_check.out_of_memory(ValueError('Incompatible shapes for broadcasting'))


def test_rejects_bad_arguments():
  result = subprocess.run(
      [sys.executable, os.path.join(REPO, 'benchmarks', 'gpu_check.py'), '--configs=1'],
      cwd=REPO, env=CPU_ONLY, capture_output=True, text=True, timeout=60)
  assert result.returncode == 2 and '--configs must be >= 2' in result.stderr
