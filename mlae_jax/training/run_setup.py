"""What training K configurations of one task needs before its first step, built once
from the configs and the task's data: the models, the pre-trained backbone split into
frozen and trained parts, the optimizer, the initial states and the compiled steps over
the device mesh. The training loop runs it; `estimate` times it."""

from __future__ import annotations

import dataclasses
import functools
import logging
from typing import Any, Callable, Sequence

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import optax
from flax.traverse_util import flatten_dict, unflatten_dict

from mlae_jax.adapters.experts import drop_rate_variables
from mlae_jax.adapters.low_rank import Mlae
from mlae_jax.checkpoints.download import resolve_checkpoint
from mlae_jax.checkpoints.pretrained import init_params, load_pretrained
from mlae_jax.data.augment import train_augmentation
from mlae_jax.data.task_data import TaskData
from mlae_jax.model.vit import VisionTransformer, create_model
from mlae_jax.partition import split_trainable
from mlae_jax.training import config_checks, parallel
from mlae_jax.training.optimizer import optimizer_from_config
from mlae_jax.training.precision import ComputeDtype, choose_compute_dtype
from mlae_jax.training.steps import (StepConfig, TrainState, create_train_state, epoch_order,
                                    jit_eval_step, jit_train_step, stack_configs)


def create_model_from_config(config: ml_collections.ConfigDict,
                             num_classes: int) -> VisionTransformer:
  overrides = {field: config.model[field] for field in
               ('patch_size', 'hidden_size', 'mlp_dim', 'num_heads', 'num_layers')
               if config.model[field] is not None}
  return create_model(config.model.name, num_classes,
                      adapter=config_checks.method_of(config),
                      gelu_approximate=config.model.gelu_approximate,
                      drop_path_rate=float(config.model.drop_path_rate),
                      dtype=choose_compute_dtype(config.model.dtype).dtype, **overrides)


def initial_params(config: ml_collections.ConfigDict, model: VisionTransformer,
                   key: jax.Array, image_size: int) -> dict:
  """The pre-trained backbone with fresh adapters and head (or all random)."""
  if not config.pretrained:
    return init_params(model, key, image_size)
  path = resolve_checkpoint(config.pretrained, cache_dir=config.cache_dir or None,
                            download=config.download)
  return load_pretrained(path, model, rng=key, image_size=image_size)


@dataclasses.dataclass
class RunSetup:
  """Everything fixed for a run: `states` are the K initial states (the template a
  checkpoint restores into); `on_devices` puts K states and the frozen backbone on the
  mesh (the training loop then drops `frozen` and `states`, keeping the devices' copies)."""
  configs: Sequence[ml_collections.ConfigDict]
  mesh: jax.sharding.Mesh
  precision: ComputeDtype
  models: list[VisionTransformer]
  tuned: tuple[str, ...]  # Patterns of the backbone leaves trained in place.
  frozen: Any
  states: list[TrainState]
  schedule: optax.Schedule
  drop_rates: Any  # Stacked per-config MLAE drop rates (empty trees for other methods).
  num_train: int
  steps_per_epoch: int
  image_size: int
  train_key: jax.Array
  order_key: jax.Array
  step_fn: Callable
  eval_fn: Callable
  order_fn: Callable
  finite_fn: Callable

  @property
  def count(self) -> int:
    return len(self.configs)

  def on_devices(self, states: Sequence[TrainState], data: TaskData) -> tuple[Any, ...]:
    """(state, frozen, images, labels, drop_rates) replicated over the mesh: the K states
    stacked on a leading axis, the training set held on the devices."""
    replicated = parallel.replicated(self.mesh)
    state, frozen, drop_rates = jax.device_put(
        (stack_configs(states), self.frozen, self.drop_rates), replicated)
    images, labels = jax.device_put((data.train_images, data.train_labels), replicated)
    return state, frozen, images, labels, drop_rates


def build_run(configs: Sequence[ml_collections.ConfigDict], data: TaskData) -> RunSetup:
  """The RunSetup of `configs` (of one task, differing at most in PER_CONFIG_FIELDS) on
  `data`, over every device of the job."""
  config, count = configs[0], len(configs)
  mesh = parallel.make_mesh()
  devices = mesh.devices.size
  for field in ('batch_size', 'eval_batch_size'):
    if config[field] % devices:
      raise ValueError(f'Bad config value config.{field} = {config[field]}: must be a multiple '
                       f'of the {devices} devices the batch is split over.')
  num_train = len(data.train_labels)
  steps_per_epoch = -(-num_train // config.batch_size)
  image_size = data.train_crop or data.train_images.shape[1]
  precision = choose_compute_dtype(config.model.dtype)
  logging.info('Compute dtype %s (%s).', precision.name, precision.reason)
  models = [create_model_from_config(c, data.num_classes) for c in configs]
  init_key, train_key, order_key = jax.random.split(jax.random.key(config.seed), 3)
  tuned = models[0].adapter.trained_patterns(models[0].num_layers)
  trainable, frozen = split_trainable(initial_params(config, models[0], init_key, image_size),
                                      tuned)
  # Same key, so the same A and head as separate runs; only the coefficients differ.
  trainables = [_with_coefficients(trainable, c.adapter.mlae.coeff_init) for c in configs]
  tx, schedule = optimizer_from_config(config, trainable, steps_per_epoch)
  drop_rates = stack_configs([_drop_rates(m, trainable) for m in models])
  replicated = parallel.replicated(mesh)
  cfg = StepConfig(models[0], tx, config.batch_size, tuple(data.mean), tuple(data.std),
                   train_augmentation(data) if data.train_crop else None,
                   parallel.batch_sharding(mesh))
  return RunSetup(
      configs=configs, mesh=mesh, precision=precision, models=models, tuned=tuned,
      frozen=frozen, states=[create_train_state(t, tx) for t in trainables], schedule=schedule,
      drop_rates=drop_rates, num_train=num_train, steps_per_epoch=steps_per_epoch,
      image_size=image_size, train_key=train_key, order_key=order_key,
      step_fn=jit_train_step(cfg, replicated, count),
      eval_fn=jit_eval_step(cfg, replicated, count),
      order_fn=jax.jit(functools.partial(epoch_order, num_examples=num_train,
                                         batch_size=config.batch_size),
                       out_shardings=replicated),
      finite_fn=jax.jit(functools.partial(_finite_configs, count=count)))


def _drop_rates(model: VisionTransformer, trainable: dict) -> dict:
  """The traced expert drop rates of an MLAE model (through which K configurations with
  different rates share one compiled step); {} for other methods."""
  if not isinstance(model.adapter, Mlae):
    return {}
  return drop_rate_variables(model.adapter.layer_experts(model.num_layers), trainable)


def _finite_configs(trainable: Any, count: int) -> jax.Array:
  """(K,) bools: whether every trained parameter of each configuration is finite."""
  return jnp.stack([jnp.isfinite(leaf).reshape(count, -1).all(1)
                    for leaf in jax.tree.leaves(trainable)]).all(0)


def _with_coefficients(trainable: dict, coeff_init: float) -> dict:
  """`trainable` with every MLAE coefficient vector reset to `coeff_init`."""
  flat = flatten_dict(trainable, sep='/')
  return unflatten_dict({path: jnp.full_like(leaf, coeff_init) if path.endswith('/coeff')
                         else leaf for path, leaf in flat.items()}, sep='/')


def global_eval_batch(batch: Any, mesh: jax.sharding.Mesh) -> tuple[jax.Array, ...]:
  """(images, labels, mask) of a host evaluation batch as arrays split over the mesh."""
  return tuple(parallel.global_batch(np.asarray(a), mesh)
               for a in (batch.images, batch.labels, batch.mask))
