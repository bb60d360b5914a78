"""Train and eval throughput of mlae_jax beside the PyTorch reference, in one process.

Times, on the same machine and inputs of the same shape: (a) our jitted train step
(MLAE on the chosen targets, AdamW on adapters + head), (b) our eval step, (c) the
eval step of the merged model (and of the plain ViT it is shaped as), and (d)(e)
timm's ViT with a PyTorch MLAE layer on the fused qkv, AdamW on adapters + head:
train step and eval; with --configs K also our step training K configurations at
once. Each side is set up and warmed up (compilation included) under a memory
meter; then every step is timed in interleaved rounds and the median of
`--repeats` rounds is reported. Prints one JSON line.

  python benchmarks/throughput.py --model=ViT-B_16 --batch=8
  python benchmarks/throughput.py --model=ViT-Ti_16 --image_size=32 --layers=2 --skip-torch
  python benchmarks/throughput.py --method=vpt_deep --field=num_tokens=50 --skip-torch

Another method than MLAE (--method, its fields by --field) is timed on our side only
(the PyTorch side is the MLAE reference); benchmarks/methods.py makes a row per method.
"""

from __future__ import annotations

import argparse
import ast
import json
import os
import platform
import statistics
import sys
import threading
import time
from typing import Callable


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
  p = argparse.ArgumentParser(description=__doc__.split('\n\n')[0])
  p.add_argument('--model', default='ViT-B_16', help="ViT size, e.g. 'ViT-B_16'.")
  p.add_argument('--batch', type=int, default=8, help='Images per step (train and eval).')
  p.add_argument('--image_size', type=int, default=224)
  p.add_argument('--layers', type=int, default=None, help='Override the number of blocks.')
  p.add_argument('--num_classes', type=int, default=100)
  p.add_argument('--rank', type=int, default=8, help='Experts per adapted layer.')
  p.add_argument('--drop_rate', type=float, default=0.5, help='Expert dropout p.')
  p.add_argument('--targets', default='qkv', help='Comma-separated adapter targets (ours).')
  p.add_argument('--method', default='mlae', help='The method (mlae_jax.adapters.METHODS); '
                 '--rank, --drop_rate and --targets apply to MLAE.')
  p.add_argument('--field', action='append', default=[], metavar='NAME=VALUE',
                 help='A field of the method (a Python literal), e.g. num_tokens=50.')
  p.add_argument('--dtype', default='auto', help="Compute dtype: 'auto' (bf16 on GPU), "
                 "'float32' or 'bfloat16'; the PyTorch side uses autocast for bf16.")
  p.add_argument('--configs', type=int, default=1,
                 help='K > 1 also times K configurations trained at once (vmapped).')
  p.add_argument('--configs_per_pass', type=int, default=None,
                 help='Of the K configurations, how many are computed side by side '
                 '(default: all on GPU, one on CPU; see mlae_jax.training.steps).')
  p.add_argument('--repeats', type=int, default=5, help='Timed calls per figure (median).')
  p.add_argument('--warmup', type=int, default=2, help='Untimed calls of each step first.')
  p.add_argument('--skip-torch', dest='skip_torch', action='store_true',
                 help='Time our side only (machines without PyTorch).')
  args = p.parse_args(argv)
  args.fields = {}
  for item in args.field:
    name, _, value = item.partition('=')
    try:
      args.fields[name] = ast.literal_eval(value)
    except (ValueError, SyntaxError):
      p.error(f'--field {item!r}: give NAME=VALUE with a Python literal value.')
  if args.method != 'mlae' and not args.skip_torch:
    p.error(f'The PyTorch side is the MLAE reference; time --method={args.method} with '
            '--skip-torch.')
  for field in ('batch', 'image_size', 'rank', 'repeats', 'configs'):
    if getattr(args, field) < 1:
      p.error(f'--{field} must be >= 1, got {getattr(args, field)}.')
  return args


class PeakMemory:
  """Peak memory of a phase: `device_peak()` (the accelerator allocator's peak,
  which each side resets or starts fresh) where it gives one, else the peak process
  RSS above the phase's start, sampled every 5 ms (CPU)."""

  def __init__(self, device_peak: Callable[[], int | None]):
    self._device_peak = device_peak
    self.kind = 'device_allocator' if device_peak() is not None else 'process_rss_increase'

  def __enter__(self) -> 'PeakMemory':
    self._start = _rss_bytes()
    self._peak = self._start
    self._done = threading.Event()
    self._thread = threading.Thread(target=self._sample, daemon=True)
    self._thread.start()
    return self

  def _sample(self):
    while not self._done.wait(0.005):
      self._peak = max(self._peak, _rss_bytes())

  def __exit__(self, *exc):
    self._done.set()
    self._thread.join()
    self._peak = max(self._peak, _rss_bytes())

  @property
  def megabytes(self) -> float:
    if self.kind == 'device_allocator':
      return round(self._device_peak() / 2**20, 1)
    return round((self._peak - self._start) / 2**20, 1)


def _rss_bytes() -> int:
  with open('/proc/self/statm') as f:
    return int(f.read().split()[1]) * os.sysconf('SC_PAGE_SIZE')


def median_seconds(calls: dict[str, Callable[[], object]], *, warmup: int,
                   repeats: int) -> dict[str, float]:
  """Median wall time of each call (each must block until its result is ready).

  The calls are timed in interleaved rounds (one of each per round), so a drift
  in the machine's speed affects every figure alike instead of favouring one side.
  """
  for _ in range(warmup):
    for call in calls.values():
      call()
  times: dict[str, list[float]] = {name: [] for name in calls}
  for _ in range(repeats):
    for name, call in calls.items():
      start = time.perf_counter()
      call()
      times[name].append(time.perf_counter() - start)
  return {name: statistics.median(t) for name, t in times.items()}


def main(argv: list[str] | None = None) -> dict:
  args = parse_args(argv)
  if not args.skip_torch:
    # PyTorch first: imported after jaxlib has run, its triton import can crash.
    try:
      import torch_side
    except ImportError as error:
      sys.exit(f'throughput: the PyTorch side needs torch and timm ({error}); install them '
               "(pip install -e '.[test]') or pass --skip-torch.")
  import jax_side
  from mlae_jax.training.steps import configs_per_pass

  record = {'model': args.model, 'image_size': args.image_size, 'layers': args.layers,
            'batch': args.batch, 'rank': args.rank, 'drop_rate': args.drop_rate,
            'targets': args.targets, 'fields': args.fields, 'host': f'{platform.machine()} {os.cpu_count()} cores',
            'malloc': preloaded_malloc(), 'repeats': args.repeats}
  sides = [jax_side] + ([] if args.skip_torch else [torch_side])
  calls: dict[str, Callable[[], object]] = {}
  for side in sides:
    # Setup and warm-up (compilation included) of each side, under its memory meter.
    with PeakMemory(side.device_peak) as memory:
      side_calls, info = side.prepare(args, record)
      for _ in range(max(args.warmup, 1)):
        for call in side_calls.values():
          call()
    record.update(info)
    record[f'{side.NAME}_peak_mem_mb'] = memory.megabytes
    record[f'{side.NAME}_mem_kind'] = memory.kind
    calls.update(side_calls)
  seconds = median_seconds(calls, warmup=0, repeats=args.repeats)
  images_per_second = {name: round(args.batch * side_batches(name, args) / s, 3)
                       for name, s in seconds.items()}
  record.update({f'{name}_img_s': value for name, value in images_per_second.items()})
  # Speed ratios (> 1: the first named is faster).
  if 'jax_merged_eval' in seconds:
    merged = seconds['jax_merged_eval']
    record['merged_vs_unmerged_eval_ratio'] = round(seconds['jax_eval'] / merged, 3)
    record['merged_vs_plain_eval_ratio'] = round(seconds['jax_plain_eval'] / merged, 3)
  if args.configs > 1:
    # K sequential runs take K single steps per batch; K at once take one vmapped step.
    record['configs_at_once'] = args.configs
    record['configs_per_pass'] = args.configs_per_pass or configs_per_pass(args.configs)
    record['configs_at_once_speedup'] = round(
        args.configs * seconds['jax_train'] / seconds['jax_train_configs'], 3)
  if not args.skip_torch:
    record['train_ratio'] = round(seconds['torch_train'] / seconds['jax_train'], 3)
    record['eval_ratio'] = round(seconds['torch_eval'] / seconds['jax_eval'], 3)
  print(json.dumps(record), flush=True)
  return record


def preloaded_malloc() -> str:
  """The allocator preloaded into the process (LD_PRELOAD), else the C library's.

  It matters on CPU: with glibc, XLA's per-step temporary buffer is unmapped and
  faulted in again every step (see README, Performance)."""
  preloaded = [os.path.basename(p) for p in os.environ.get('LD_PRELOAD', '').split(':') if p]
  return ','.join(preloaded) or 'libc'


def side_batches(name: str, args: argparse.Namespace) -> int:
  """Batches of images one call processes (K for the K-configs step)."""
  return args.configs if name == 'jax_train_configs' else 1


if __name__ == '__main__':
  main()
