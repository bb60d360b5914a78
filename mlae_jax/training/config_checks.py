"""Validation of a run config, with messages that name the field and the fix."""

from __future__ import annotations

import math
from typing import Any

import ml_collections

from mlae_jax.adapters.config import AdapterConfig, is_number
from mlae_jax.model.variants import get_variant
from mlae_jax.training.optimizer import WEIGHT_DECAY_RULES
from mlae_jax.training.precision import DTYPE_NAMES
from mlae_jax.training.schedules import SCHEDULES

# Baselines a run can be compared with: their changes to `config.mlae`.
BASELINES = {
    'linear_probe': {'method': 'none'},
    'lora': {'method': 'lora', 'drop_rate': 0.0, 'coeff_init': 1.0, 'adaptive_coeff': True,
             'mask': 'stochastic', 'pattern': 'uniform'},
}


def adapter_config(config: ml_collections.ConfigDict) -> AdapterConfig | None:
  """The AdapterConfig of `config.mlae` (None when method is 'none')."""
  fields = config.mlae.to_dict()
  if fields.get('method') == 'none':
    return None
  try:
    return AdapterConfig(**fields)
  except TypeError as error:
    raise ValueError(f'Bad config: config.mlae has an unknown field ({error}).') from None


_MODEL_SIZES = ('patch_size', 'hidden_size', 'mlp_dim', 'num_heads', 'num_layers')


def validate(config: ml_collections.ConfigDict) -> None:
  """Raises ValueError on the first value a run cannot use (a wrong type, a non-finite
  or senseless number, a model shape that cannot work), before anything is built."""
  def require(condition: bool, field: str, value: Any, expectation: str) -> None:
    if not condition:
      raise ValueError(f'Bad config value config.{field} = {value!r}: {expectation}.')

  def integer(field: str, value: Any, low: int) -> None:
    require(isinstance(value, int) and not isinstance(value, bool) and value >= low, field,
            value, f'must be an integer >= {low}')

  def number(field: str, value: Any, expectation: str, check) -> None:
    require(is_number(value) and math.isfinite(value) and check(value), field, value,
            f'must be a finite number {expectation}')

  def flag(field: str, value: Any) -> None:
    require(isinstance(value, bool), field, value, 'must be True or False')

  if not isinstance(config.model.name, str):
    raise ValueError(f'Bad config value config.model.name = {config.model.name!r}: must be a '
                     'name such as ViT-B_16.')
  variant = get_variant(config.model.name)
  require(config.model.dtype in DTYPE_NAMES, 'model.dtype', config.model.dtype,
          f'use one of {DTYPE_NAMES}')
  sizes = {}
  for field in _MODEL_SIZES:
    value = config.model[field]
    if value is not None:
      integer(f'model.{field}', value, 1)
    sizes[field] = getattr(variant, field) if value is None else value
  require(sizes['hidden_size'] % sizes['num_heads'] == 0, 'model.num_heads', sizes['num_heads'],
          f'must divide the hidden size {sizes["hidden_size"]} (heads of equal width)')
  flag('model.gelu_approximate', config.model.gelu_approximate)
  number('model.drop_path_rate', config.model.drop_path_rate, 'in [0, 1)', lambda v: 0 <= v < 1)

  integer('data.image_size', config.data.image_size, 1)
  require(config.data.image_size % sizes['patch_size'] == 0, 'data.image_size',
          config.data.image_size, f'must be a multiple of the patch size {sizes["patch_size"]}')
  if config.data.source == 'synthetic':
    integer('data.num_classes', config.data.num_classes, 2)

  for field in ('epochs', 'batch_size', 'eval_batch_size', 'eval_every_epochs',
                'checkpoint_every_epochs', 'keep_checkpoints'):
    integer(field, config[field], 1)
  integer('eval_last_epochs', config.eval_last_epochs, 0)
  integer('seed', config.seed, 0)
  for field in ('progress_bar', 'export_merged', 'download'):
    flag(field, config[field])
  require(config.weight_decay_rule in WEIGHT_DECAY_RULES, 'weight_decay_rule',
          config.weight_decay_rule, f'use one of {WEIGHT_DECAY_RULES}')
  number('learning_rate', config.learning_rate, '> 0', lambda v: v > 0)
  for field in ('weight_decay', 'grad_clip_norm'):
    number(field, config[field], '>= 0', lambda v: v >= 0)
  for field in ('warmup_lr', 'min_lr'):  # Start and floor of the schedule, below its peak.
    number(field, config[field], f'in [0, learning_rate={config.learning_rate:g}]',
           lambda v: 0 <= v <= config.learning_rate)
  require(config.schedule in SCHEDULES, 'schedule', config.schedule, f'use one of {SCHEDULES}')
  number('warmup_epochs', config.warmup_epochs, f'in [0, epochs={config.epochs})',
         lambda v: 0 <= v < config.epochs)
  adapter_config(config)
  for name in config.get('baselines', ()):
    require(name in BASELINES, 'baselines', tuple(config.baselines),
            f'each must be one of {tuple(BASELINES)}')


def baseline_config(config: ml_collections.ConfigDict, name: str) -> ml_collections.ConfigDict:
  """`config` with its adapter replaced by baseline `name` (and no baselines of its own)."""
  baseline = ml_collections.ConfigDict(config.to_dict())
  baseline.mlae.update(BASELINES[name])
  baseline.baselines = ()
  return baseline
