"""Validation of a run config, with messages that name the field and the fix."""

from __future__ import annotations

from typing import Any

import ml_collections

from mlae_jax.adapters.config import AdapterConfig
from mlae_jax.model.variants import get_variant
from mlae_jax.training.optimizer import WEIGHT_DECAY_RULES
from mlae_jax.training.schedules import SCHEDULES

DTYPES = ('auto', 'float32', 'bfloat16')
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


def validate(config: ml_collections.ConfigDict) -> None:
  """Raises ValueError on the first value a run cannot use."""
  def require(condition: bool, field: str, value: Any, expectation: str) -> None:
    if not condition:
      raise ValueError(f'Bad config value config.{field} = {value!r}: {expectation}.')

  get_variant(config.model.name)
  require(config.model.dtype in DTYPES, 'model.dtype', config.model.dtype, f'use one of {DTYPES}')
  for field in ('epochs', 'batch_size', 'eval_batch_size', 'eval_every_epochs',
                'checkpoint_every_epochs', 'keep_checkpoints'):
    value = config[field]
    require(isinstance(value, int) and value >= 1, field, value, 'must be an integer >= 1')
  require(isinstance(config.eval_last_epochs, int) and config.eval_last_epochs >= 0,
          'eval_last_epochs', config.eval_last_epochs, 'must be an integer >= 0')
  rate = config.model.drop_path_rate
  require(isinstance(rate, (int, float)) and 0 <= rate < 1, 'model.drop_path_rate', rate,
          'must lie in [0, 1)')
  require(config.weight_decay_rule in WEIGHT_DECAY_RULES, 'weight_decay_rule',
          config.weight_decay_rule, f'use one of {WEIGHT_DECAY_RULES}')
  for field in ('learning_rate', 'warmup_lr', 'min_lr', 'weight_decay', 'grad_clip_norm'):
    require(config[field] >= 0, field, config[field], 'must be >= 0')
  require(config.learning_rate > 0, 'learning_rate', config.learning_rate, 'must be > 0')
  require(config.schedule in SCHEDULES, 'schedule', config.schedule, f'use one of {SCHEDULES}')
  require(0 <= config.warmup_epochs < config.epochs, 'warmup_epochs', config.warmup_epochs,
          f'must lie in [0, epochs={config.epochs})')
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
