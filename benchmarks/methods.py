"""A throughput row per method: train and eval img/s, peak memory, merged eval where the
method merges, each method measured by benchmarks/throughput.py in a process of its own
(so one method's memory is not counted in the next one's). Prints a markdown table and
one JSON line per method.

  python benchmarks/methods.py --model=ViT-B_16 --batch=8
  python benchmarks/methods.py --methods=mlae,lora,vpt_deep --model=ViT-Ti_16 \\
      --image_size=32 --layers=2 --repeats=2

Every method runs at its default fields (those of its reference code); MLAE at rank 8,
p = 0.5 on the fused qkv. Extra arguments go to throughput.py for every method.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys

HERE = os.path.dirname(os.path.abspath(__file__))
COLUMNS = (('method', 'method', '{}'), ('trainable_params_without_head', 'params', '{:,}'),
           ('jax_train_img_s', 'train img/s', '{:.2f}'),
           ('jax_eval_img_s', 'eval img/s', '{:.2f}'),
           ('jax_merged_eval_img_s', 'merged eval img/s', '{:.2f}'),
           ('jax_peak_mem_mb', 'peak MB', '{:.0f}'))


def measure(method: str, extra: list[str]) -> dict:
  """throughput.py's record of `method` (our side only), from a process of its own."""
  command = [sys.executable, os.path.join(HERE, 'throughput.py'), f'--method={method}',
             '--skip-torch', *extra]
  result = subprocess.run(command, capture_output=True, text=True)
  if result.returncode:
    raise SystemExit(f'methods: {method} failed:\n{result.stderr[-2000:]}')
  return json.loads(result.stdout.strip().splitlines()[-1])


def table(records: list[dict]) -> str:
  lines = ['| ' + ' | '.join(label for _, label, _ in COLUMNS) + ' |',
           '|' + '---|' * len(COLUMNS)]
  for record in records:
    cells = [form.format(record[key]) if record.get(key) is not None else '—'
             for key, _, form in COLUMNS]
    lines.append('| ' + ' | '.join(cells) + ' |')
  return '\n'.join(lines)


def main(argv: list[str] | None = None) -> list[dict]:
  parser = argparse.ArgumentParser(description=__doc__.split('\n\n')[0])
  parser.add_argument('--methods', default='all',
                      help="Comma-separated method names, or 'all' (every registered one).")
  args, extra = parser.parse_known_args(argv)
  sys.path.insert(0, os.path.dirname(HERE))
  from mlae_jax.adapters import METHODS

  names = list(METHODS) if args.methods == 'all' else args.methods.split(',')
  unknown = [name for name in names if name not in METHODS]
  if unknown:
    parser.error(f'unknown methods {unknown}; choose from {list(METHODS)}.')
  records = []
  for name in names:
    record = measure(name, extra)
    print(json.dumps(record), flush=True)
    records.append(record)
  first = records[0]
  print(f'\n{first["model"]}, batch {first["batch"]}, {first["image_size"]}px, '
        f'{first["dtype"]}, on {first["device"]} ({first["host"]}); peak memory: '
        f'{first["jax_mem_kind"]}.\n')
  print(table(records))
  return records


if __name__ == '__main__':
  main()
