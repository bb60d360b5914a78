"""A run config made whole and checked once, at the entry: the method's recipe fills
the fields left unset, and every value is validated with a message that names the field
and the fix."""

from __future__ import annotations

import math
from typing import Any

import ml_collections

from mlae_jax.adapters.method import Method, is_number
from mlae_jax.adapters.registry import METHODS, from_config_group
from mlae_jax.checkpoints.variants import get_variant
from mlae_jax.training.optimizer import WEIGHT_DECAY_RULES
from mlae_jax.training.precision import DTYPE_NAMES
from mlae_jax.training.schedules import SCHEDULES

# Fields a method's paper recipe sets when a run config leaves them None.
RECIPE_FIELDS = ('learning_rate', 'weight_decay', 'epochs')


def method_of(config: ml_collections.ConfigDict) -> Method:
  """The Method that `config.adapter` selects."""
  return from_config_group(config.adapter)


def resolve(config: ml_collections.ConfigDict) -> ml_collections.ConfigDict:
  """A copy of `config` with its method's recipe in the fields it leaves None, checked
  by `validate`: what a run trains with and records."""
  if not isinstance(config, ml_collections.ConfigDict):
    raise TypeError(f'A run config must be an ml_collections.ConfigDict (e.g. from '
                    f'mlae_jax.training.defaults.base_config()), got {type(config).__name__}.')
  resolved = ml_collections.ConfigDict(config.to_dict())
  recipe = method_of(config).recipe(config.data.source)
  for field in RECIPE_FIELDS:
    if resolved.get(field) is None:
      resolved[field] = recipe[field]
  validate(resolved)
  return resolved


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
  method_of(config)
  for name in config.get('baselines', ()):
    require(name in METHODS, 'baselines', tuple(config.baselines),
            f'each must be a method, one of {tuple(METHODS)}')


def baseline_config(config: ml_collections.ConfigDict, name: str) -> ml_collections.ConfigDict:
  """`config` with method `name` (at its config.adapter.<name> settings) in place of its
  own, and no baselines of its own."""
  baseline = ml_collections.ConfigDict(config.to_dict())
  baseline.adapter.method = name
  baseline.baselines = ()
  return baseline
