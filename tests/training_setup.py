"""Tiny run configs for the training tests: a 2-block ViT on the synthetic task."""

import ml_collections

from mlae_jax.training.defaults import base_config

TINY_MODEL = dict(patch_size=8, hidden_size=32, mlp_dim=64, num_heads=4, num_layers=2)


def tiny_config(**overrides) -> ml_collections.ConfigDict:
  config = base_config()
  config.model.name = 'ViT-Ti_16'
  for field, value in TINY_MODEL.items():
    config.model[field] = value
  config.pretrained = ''
  config.data.source = 'synthetic'
  config.data.image_size = 32
  config.data.num_classes = 4
  config.data.num_train = 40  # Not a multiple of the batch: the last batch is partial.
  config.data.num_eval = 37
  config.epochs = 4
  config.batch_size = 16
  config.eval_batch_size = 16
  config.learning_rate = 3e-3
  config.warmup_epochs = 0  # SPT stepping: a warm-up holds the first two epochs at warmup_lr.
  config.eval_every_epochs = 2  # SPT's rule: after 0-based epochs 0 and 2, and the last.
  config.eval_last_epochs = 0
  config.checkpoint_every_epochs = 1
  config.adapter.mlae.rank = 4
  config.adapter.mlae.drop_rate = 0.5
  config.progress_bar = False
  for key, value in overrides.items():
    target = config
    *parents, leaf = key.split('.')
    for parent in parents:
      target = target[parent]
    target[leaf] = value
  return config


def tiny_config_flags(**overrides) -> list[str]:
  """The same config as command-line overrides of configs/vtab.py:svhn."""
  config = tiny_config(**overrides)
  flags = [f'--config.model.{k}={v}' for k, v in TINY_MODEL.items()]
  flags += ['--config.model.name=ViT-Ti_16', '--config.pretrained=']
  for key in ('source', 'image_size', 'num_classes', 'num_train', 'num_eval'):
    flags.append(f'--config.data.{key}={config.data[key]}')
  for key in ('epochs', 'batch_size', 'eval_batch_size', 'learning_rate', 'warmup_epochs',
              'eval_every_epochs', 'eval_last_epochs', 'checkpoint_every_epochs',
              'progress_bar'):
    flags.append(f'--config.{key}={config[key]}')
  flags += [f'--config.adapter.mlae.rank={config.adapter.mlae.rank}',
            f'--config.adapter.mlae.drop_rate={config.adapter.mlae.drop_rate}']
  return flags
