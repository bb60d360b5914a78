"""Prints what a method trains: its parameters by role (and MLAE's experts per block).

  python -m mlae_jax.summary --model=ViT-B_16 --num_classes=100 --method=mlae \
      --field=rank=8 --field=drop_rate=0.5

Needs no checkpoint: shapes come from the model definition alone.
"""

from __future__ import annotations

import ast

from absl import app, flags
import jax
import jax.numpy as jnp

from mlae_jax.adapters.low_rank import LowRank
from mlae_jax.adapters.registry import METHODS, create
from mlae_jax.model import create_model
from mlae_jax.partition import count_params

_MODEL = flags.DEFINE_string('model', 'ViT-B_16', 'Model size, e.g. ViT-B_16 or B/16.')
_CLASSES = flags.DEFINE_integer('num_classes', 100, 'Classes of the task head.')
_IMAGE = flags.DEFINE_integer('image_size', 224, 'Input resolution.')
_METHOD = flags.DEFINE_enum('method', 'mlae', list(METHODS), 'The method.')
_FIELDS = flags.DEFINE_multi_string('field', [], 'A field of the method, name=value '
                                    '(a Python literal), e.g. rank=8 or targets="(\'qkv\',)".')

def describe(model, image_size: int) -> str:
  """A table of per-block adapter settings and the parameter counts by role."""
  shapes = jax.eval_shape(model.init, jax.random.key(0),
                          jnp.zeros((1, image_size, image_size, 3)))['params']
  counts = count_params(shapes, model.adapter.trained_patterns(model.num_layers))
  lines = [f'{model.adapter.NAME} on {", ".join(model.adapter.targets) or "no sites"}']
  if isinstance(model.adapter, LowRank):
    lines.append('block  experts  drop_rate  coeff_init  adaptive')
    for index, s in enumerate(model.adapter.layer_experts(model.num_layers)):
      lines.append(f'{index:5d}  {s.experts:7d}  {s.drop_rate:9.2f}  {s.coeff_init:10.3f}  '
                   f'{s.adaptive_coeff}')
  roles = ('adapter', 'head') + (('tuned',) if counts['tuned'] else ()) + (
      'trainable',) + (('state',) if counts['state'] else ()) + ('backbone', 'total')
  lines.append(', '.join(f'{role} {counts[role]:,}' for role in roles) + ' parameters')
  return '\n'.join(lines)


def main(argv):
  del argv
  try:
    fields = {}
    for item in _FIELDS.value:
      name, _, value = item.partition('=')
      fields[name] = ast.literal_eval(value)
    model = create_model(_MODEL.value, _CLASSES.value, adapter=create(_METHOD.value, fields))
  except (ValueError, SyntaxError) as error:
    raise app.UsageError(str(error)) from None
  print(f'{_MODEL.value}, {_CLASSES.value} classes, {_IMAGE.value}px')
  print(describe(model, _IMAGE.value))


if __name__ == '__main__':
  app.run(main)
