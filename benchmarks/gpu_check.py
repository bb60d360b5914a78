"""One-command check of an accelerator install: is it right, and how long will a sweep take?

On whatever device JAX finds, it trains and evaluates the paper's setup (ViT-B/16 at 224 px,
100 classes, MLAE rank 8 on every fused qkv, p = 0.5; benchmarks/throughput.py's default) at
batch 64 and prints ONE JSON line: JAX's version, backend and devices; the compute dtype and
why; our train and eval images/s with the first call's time (compilation included) and peak
memory; the same for the PyTorch reference (timm ViT + a PyTorch MLAE layer, CUDA and bf16
autocast where ours runs bf16) where PyTorch can run beside it; K configurations trained at
once in one step; and the minutes one VTAB-1k task takes (training and evaluation apart).

  python benchmarks/gpu_check.py                   # a few minutes on a GPU
  python benchmarks/gpu_check.py --dtype=float32 --skip_torch
  python benchmarks/gpu_check.py --configs=3       # if K = 6 at once runs out of memory
  python benchmarks/gpu_check.py --small           # tiny model, for CI: under a minute on a CPU

Each side is set up, called once (timed: compilation plus one step) and warmed up under a
memory meter, then its steps are timed in interleaved rounds and the median is reported
(throughput.py's PeakMemory and median_seconds). PyTorch's side runs first and hands its
memory back, and JAX allocates on demand here (XLA_PYTHON_CLIENT_PREALLOCATE=false unless
set), so that each side has the whole device.
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import platform
import time
from types import ModuleType
from typing import Callable

import throughput

# throughput.py's flags for the two settings (the rest of its defaults: 100 classes,
# MLAE rank 8 on the fused qkv, p = 0.5).
FULL = ['--batch=64', '--configs=6', '--repeats=5', '--warmup=2']
SMALL = ['--model=ViT-Ti_16', '--image_size=32', '--layers=2', '--batch=8', '--configs=2',
         '--repeats=3', '--warmup=1']
VTAB_1K_TRAIN_IMAGES = 1000  # train800val200, what the final runs train on.
TORCH_FIELDS = ('torch_version', 'timm_version', 'torch_device', 'torch_threads',
                'torch_train_images_per_s', 'torch_train_step_s', 'torch_train_first_call_s',
                'torch_eval_images_per_s', 'torch_eval_step_s', 'torch_eval_first_call_s',
                'torch_peak_memory_mib', 'torch_peak_memory_kind',
                'train_speed_ratio_ours_over_torch', 'eval_speed_ratio_ours_over_torch')
CONFIGS_FIELDS = ('jax_train_configs_images_per_s', 'jax_train_configs_step_s',
                  'jax_train_configs_first_call_s', 'configs_at_once_speedup',
                  'jax_configs_peak_memory_mib')


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
  p = argparse.ArgumentParser(description=__doc__.split('\n\n')[0])
  p.add_argument('--small', action='store_true',
                 help='A 2-block ViT-Ti/16 at 32 px, batch 8, K = 2: the same code paths in under '
                 'a minute on a CPU (for CI); its figures are not ViT-B/16\'s.')
  p.add_argument('--dtype', default='auto', choices=('auto', 'float32', 'bfloat16'),
                 help="Compute dtype; 'auto' is what training picks (bf16 where native).")
  p.add_argument('--skip_torch', '--skip-torch', dest='skip_torch', action='store_true',
                 help='Time our side only.')
  p.add_argument('--configs', type=int, default=None,
                 help='K configurations trained at once (default 6; 2 with --small).')
  p.add_argument('--configs_per_pass', type=int, default=None,
                 help='Of the K, how many side by side (default: all on GPU, one on CPU).')
  p.add_argument('--repeats', type=int, default=None,
                 help='Timed rounds, median reported (default 5; 3 with --small).')
  p.add_argument('--warmup', type=int, default=None,
                 help='Untimed rounds after the first call (default 2; 1 with --small).')
  p.add_argument('--test_images', type=int, default=10_000,
                 help="Test-set size assumed for the evaluation estimate (CIFAR-100's test "
                 'split; the VTAB-1k test sets vary in size).')
  args = p.parse_args(argv)
  for field, least in (('configs', 2), ('configs_per_pass', 1), ('repeats', 1), ('warmup', 0),
                       ('test_images', 1)):
    value = getattr(args, field)
    if value is not None and value < least:
      p.error(f'--{field} must be >= {least}, got {value}.')
  return args


def setup_args(args: argparse.Namespace, dtype: str) -> argparse.Namespace:
  """throughput.py's arguments for the chosen setting, as both sides' `prepare` take them."""
  flags = list(SMALL if args.small else FULL)
  for field in ('configs', 'configs_per_pass', 'repeats', 'warmup'):
    if getattr(args, field) is not None:
      flags.append(f'--{field}={getattr(args, field)}')
  return throughput.parse_args(flags + [f'--dtype={dtype}'])


def first_calls(calls: dict[str, Callable[[], object]], warmup: int) -> dict[str, float]:
  """Seconds of each call's first call (compilation plus one step); then `warmup` untimed
  rounds."""
  seconds = {}
  for name, call in calls.items():
    start = time.perf_counter()
    call()
    seconds[name] = time.perf_counter() - start
  for _ in range(warmup):
    for call in calls.values():
      call()
  return seconds


def out_of_memory(error: BaseException) -> bool:
  """Whether `error` is a device running out of memory (XLA's or PyTorch's)."""
  text = str(error)
  return 'RESOURCE_EXHAUSTED' in text or 'out of memory' in text.lower()


def import_torch(skip: bool) -> tuple[ModuleType | None, str | None]:
  """The PyTorch side's module, or None and why not. Must run before JAX is imported."""
  if skip:
    return None, 'skipped by --skip_torch'
  try:
    import torch_side
  except ImportError as error:
    return None, f'PyTorch side unavailable ({error}); pip install -e ".[test]"'
  return torch_side, None


def torch_mismatch(torch_side: ModuleType, backend: str) -> str | None:
  """Why PyTorch's figures would not compare with ours on `backend`, if they would not."""
  on_cuda = torch_side.reference_device().type == 'cuda'
  if backend != 'cpu' and not on_cuda:
    return (f'PyTorch {torch_side.torch.__version__} has no CUDA device while JAX runs on '
            f'{backend}: its CPU figures would compare nothing')
  if backend == 'cpu' and on_cuda:
    return 'PyTorch runs on CUDA while JAX runs on the CPU: the figures would compare nothing'
  return None


def step_fields(name: str, images: int, first_s: float, step_s: float) -> dict:
  """Images/s, median seconds per step and first-call seconds of the step `name`."""
  return {f'{name}_images_per_s': round(images / step_s, 3), f'{name}_step_s': round(step_s, 6),
          f'{name}_first_call_s': round(first_s, 3)}


def time_torch(torch_side: ModuleType, setup: argparse.Namespace) -> dict:
  """The PyTorch reference's fields."""
  with throughput.PeakMemory(torch_side.device_peak) as memory:
    calls, info = torch_side.prepare(setup, {'dtype': setup.dtype})
    first = first_calls(calls, setup.warmup)
  seconds = throughput.median_seconds(calls, warmup=0, repeats=setup.repeats)
  device = torch_side.reference_device()
  record = {'torch_version': info['torch_version'], 'timm_version': info['timm_version'],
            'torch_device': (f'cuda ({torch_side.torch.cuda.get_device_name(device)})'
                             if device.type == 'cuda' else 'cpu'),
            'torch_threads': info['torch_threads']}
  for name in calls:
    record.update(step_fields(name, setup.batch, first[name], seconds[name]))
  record.update(torch_peak_memory_mib=memory.megabytes, torch_peak_memory_kind=memory.kind)
  return record


def time_jax(jax_side: ModuleType, setup: argparse.Namespace) -> dict:
  """Our fields: train and eval step, then K configurations at once (null, with the
  error, where the device runs out of memory for them)."""
  with throughput.PeakMemory(jax_side.device_peak) as overall:
    with throughput.PeakMemory(jax_side.device_peak) as single:
      calls, _ = jax_side.prepare(setup, {}, merged=False)
      configs_call = calls.pop('jax_train_configs')
      first = first_calls(calls, setup.warmup)
    single_mib, configs_error = single.megabytes, None
    try:
      first.update(first_calls({'jax_train_configs': configs_call}, setup.warmup))
      calls['jax_train_configs'] = configs_call
    except Exception as error:  # The K-fold activations may not fit where one config does.
      if not out_of_memory(error):
        raise
      configs_error = f'{type(error).__name__}: {str(error)[:300]}'
    del configs_call
  seconds = throughput.median_seconds(calls, warmup=0, repeats=setup.repeats)
  record = {}
  for name in ('jax_train', 'jax_eval'):
    record.update(step_fields(name, setup.batch, first[name], seconds[name]))
  record.update(jax_peak_memory_mib=single_mib, jax_peak_memory_kind=single.kind)
  record.update(dict.fromkeys(CONFIGS_FIELDS), configs_at_once_error=configs_error)
  if configs_error is None:
    record.update(step_fields('jax_train_configs', setup.batch * setup.configs,
                              first['jax_train_configs'], seconds['jax_train_configs']))
    record['configs_at_once_speedup'] = round(
        setup.configs * seconds['jax_train'] / seconds['jax_train_configs'], 3)
    record['jax_configs_peak_memory_mib'] = overall.megabytes
  return record


def vtab_estimate(record: dict, test_images: int) -> dict:
  """Minutes of one VTAB-1k task under the training recipe, from the measured steps."""
  from mlae_jax.training import config_checks
  from mlae_jax.training.defaults import base_config
  from mlae_jax.training.schedules import evaluation_count

  config = config_checks.resolve(base_config())  # MLAE's VTAB-1k recipe.
  steps = -(-VTAB_1K_TRAIN_IMAGES // config.batch_size)
  evaluations = evaluation_count(epochs=config.epochs, every=config.eval_every_epochs,
                                 last=config.eval_last_epochs)
  train = config.epochs * steps * record['jax_train_step_s'] / 60
  evaluation = evaluations * test_images / record['jax_eval_images_per_s'] / 60
  estimate = {
      'vtab_task_epochs': config.epochs, 'vtab_task_steps_per_epoch': steps,
      'vtab_task_train_images': VTAB_1K_TRAIN_IMAGES, 'vtab_task_evaluations': evaluations,
      'vtab_task_test_images_assumed': test_images,
      'vtab_task_train_minutes': round(train, 3),
      'vtab_task_eval_minutes': round(evaluation, 3),
      'vtab_task_total_minutes': round(train + evaluation, 3),
      'vtab_task_configs_train_minutes': None,
      'vtab_task_estimate_assumptions': (
          f'train: {config.epochs} epochs x {steps} steps of batch {config.batch_size} '
          f'({VTAB_1K_TRAIN_IMAGES} images, train800val200) x the measured jax_train_step_s '
          f'(at this check\'s batch {record["batch"]}); no data loading (the training set '
          f'stays on the device, as in training). eval: {evaluations} evaluations (after '
          f'0-based epoch e with e % {config.eval_every_epochs} == 0 or '
          f'e >= {config.epochs - config.eval_last_epochs}, and the last) of '
          f'{test_images} test images at the measured jax_eval_images_per_s (training '
          f'evaluates in batches of {config.eval_batch_size}). configs: the same training '
          f'for K configurations at once from jax_train_configs_step_s.'),
  }
  if record.get('jax_train_configs_step_s'):
    estimate['vtab_task_configs_train_minutes'] = round(
        config.epochs * steps * record['jax_train_configs_step_s'] / 60, 3)
  return estimate


def main(argv: list[str] | None = None) -> dict:
  args = parse_args(argv)
  torch_side, torch_reason = import_torch(args.skip_torch)  # PyTorch before JAX.
  os.environ.setdefault('XLA_PYTHON_CLIENT_PREALLOCATE', 'false')
  import jax
  import jax.extend

  import jax_side
  from mlae_jax.training.precision import choose_compute_dtype
  from mlae_jax.training.steps import configs_per_pass

  dtype = choose_compute_dtype(args.dtype)
  setup = setup_args(args, dtype.name)
  backend, devices = jax.default_backend(), jax.devices()
  record = {
      'small_mode': args.small,
      'setup': ('SMALL: a 2-block ViT-Ti/16 at 32 px to exercise the code paths; the figures '
                'are not ViT-B/16\'s' if args.small else
                'ViT-B/16 at 224 px, as the paper trains it'),
      'date_utc': datetime.datetime.now(datetime.timezone.utc).isoformat(timespec='seconds'),
      'host': f'{platform.machine()} {os.cpu_count()} cores',
      'malloc': throughput.preloaded_malloc(),
      'jax_version': jax.__version__, 'jax_backend': backend,
      'jax_platform_version': jax.extend.backend.get_backend().platform_version,
      'device_kind': devices[0].device_kind, 'device_count': len(devices),
      'jax_preallocate': os.environ['XLA_PYTHON_CLIENT_PREALLOCATE'],
      'compute_dtype': dtype.name,
      'compute_dtype_reason': dtype.reason if args.dtype == 'auto' else 'set by --dtype',
      'model': setup.model, 'layers': setup.layers, 'image_size': setup.image_size,
      'num_classes': setup.num_classes, 'rank': setup.rank, 'drop_rate': setup.drop_rate,
      'targets': setup.targets, 'batch': setup.batch, 'configs_at_once': setup.configs,
      'configs_per_pass': setup.configs_per_pass or configs_per_pass(setup.configs),
      'repeats': setup.repeats, 'warmup': setup.warmup, 'warnings': [],
  }
  if backend == 'cpu':
    record['warnings'].append(
        'JAX found no accelerator: these are CPU figures. On a GPU machine this means JAX was '
        "installed without GPU support: pip install 'jax[cuda13]' (or 'jax[cuda12]').")
  if torch_side is not None:
    torch_reason = torch_mismatch(torch_side, backend)
  torch_record = dict.fromkeys(TORCH_FIELDS)
  if torch_reason is None:  # PyTorch first, its memory handed back before our side runs.
    try:
      torch_record.update(time_torch(torch_side, setup))
    except Exception as error:
      if not out_of_memory(error):
        raise
      torch_reason = f'{type(error).__name__}: {str(error)[:300]}'
    torch_side.release()
  record.update(time_jax(jax_side, setup))
  record.update(torch_record, torch_skipped_reason=torch_reason)
  if torch_reason is None:
    for step in ('train', 'eval'):
      record[f'{step}_speed_ratio_ours_over_torch'] = round(
          record[f'torch_{step}_step_s'] / record[f'jax_{step}_step_s'], 3)
  record.update(vtab_estimate(record, args.test_images))
  print(json.dumps(record), flush=True)
  return record


if __name__ == '__main__':
  main()
