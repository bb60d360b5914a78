"""Prints what an adapter configuration trains: experts and parameters per block.

  python -m mlae_jax.summary --model=ViT-B_16 --num_classes=100 --rank=8 --drop_rate=0.5

Needs no checkpoint: shapes come from the model definition alone.
"""

from __future__ import annotations

from absl import app, flags
import jax
import jax.numpy as jnp

from mlae_jax.adapters import AdapterConfig
from mlae_jax.adapters.placement import tuned_paths
from mlae_jax.model import create_model
from mlae_jax.partition import count_params

_MODEL = flags.DEFINE_string('model', 'ViT-B_16', 'Model size, e.g. ViT-B_16 or B/16.')
_CLASSES = flags.DEFINE_integer('num_classes', 100, 'Classes of the task head.')
_IMAGE = flags.DEFINE_integer('image_size', 224, 'Input resolution.')
_METHOD = flags.DEFINE_enum('method', 'mlae', ['mlae', 'lora', 'none'], 'Adapter method.')
_TARGETS = flags.DEFINE_list('targets', ['qkv'], 'Adapted linear maps of every block.')
_RANK = flags.DEFINE_integer('rank', 8, 'Experts (LoRA rank) per block.')
_DROP = flags.DEFINE_float('drop_rate', 0.0, 'Expert-level dropout probability.')
_MASK = flags.DEFINE_string('mask', 'stochastic', 'stochastic, fixed or mixed.')
_PATTERN = flags.DEFINE_string('pattern', 'uniform', 'Per-layer pattern (appendix A.5).')
_TRAIN_BIAS = flags.DEFINE_bool('train_bias', False, 'Also train the adapted layers\' biases.')


def describe(model, image_size: int) -> str:
  """A table of per-block adapter settings and the parameter counts by role."""
  shapes = jax.eval_shape(model.init, jax.random.key(0),
                          jnp.zeros((1, image_size, image_size, 3)))['params']
  counts = count_params(shapes, tuned_paths(model.adapter, model.num_layers))
  lines = []
  if model.adapter is not None:
    lines.append(f'{model.adapter.method} on {", ".join(model.adapter.targets)}')
    lines.append('block  experts  drop_rate  coeff_init  adaptive')
    for index, s in enumerate(model.layer_experts()):
      lines.append(f'{index:5d}  {s.experts:7d}  {s.drop_rate:9.2f}  {s.coeff_init:10.3f}  '
                   f'{s.adaptive_coeff}')
  roles = ('adapter', 'head') + (('tuned',) if counts['tuned'] else ()) + (
      'trainable', 'backbone', 'total')
  lines.append(', '.join(f'{role} {counts[role]:,}' for role in roles) + ' parameters')
  return '\n'.join(lines)


def main(argv):
  del argv
  adapter = None
  try:
    if _METHOD.value != 'none':
      adapter = AdapterConfig(method=_METHOD.value, targets=tuple(_TARGETS.value),
                              rank=_RANK.value, drop_rate=_DROP.value, mask=_MASK.value,
                              pattern=_PATTERN.value, train_bias=_TRAIN_BIAS.value)
    model = create_model(_MODEL.value, _CLASSES.value, adapter=adapter)
  except ValueError as error:
    raise app.UsageError(str(error)) from None
  print(f'{_MODEL.value}, {_CLASSES.value} classes, {_IMAGE.value}px')
  print(describe(model, _IMAGE.value))


if __name__ == '__main__':
  app.run(main)
