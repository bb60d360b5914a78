"""Our side of the throughput benchmark: the library's own jitted steps.

Both sides time the same step: no stochastic depth, AdamW decaying every trained leaf
(timm + torch.optim.AdamW on the other side). The training recipe's drop path (0.1)
and decay groups change the cost by a per-example multiply and a masked decay.
"""

from __future__ import annotations

import argparse
from typing import Callable

import jax
import jax.numpy as jnp
import numpy as np
import optax

from mlae_jax.adapters import Method, Mlae, create
from mlae_jax.adapters.experts import drop_rate_variables
from mlae_jax.adapters.merge import merge_adapters
from mlae_jax.checkpoints.pretrained import init_params
from mlae_jax.model.vit import VisionTransformer, create_model
from mlae_jax.partition import combine, count_params, split_trainable
from mlae_jax.training import parallel
from mlae_jax.training.optimizer import make_optimizer
from mlae_jax.training.precision import choose_compute_dtype
from mlae_jax.training.steps import (StepConfig, create_train_state, jit_eval_step,
                                    jit_train_step, stack_configs)

NAME = 'jax'
MEAN = STD = (0.5, 0.5, 0.5)


def device_peak() -> int | None:
  stats = jax.devices()[0].memory_stats()
  return stats.get('peak_bytes_in_use') if stats else None


def method_of(args: argparse.Namespace) -> Method:
  """The benchmarked method: MLAE from --targets, --rank and --drop_rate, or --method
  with its --field values."""
  if args.method == 'mlae':
    return Mlae(targets=tuple(args.targets.split(',')), rank=args.rank, drop_rate=args.drop_rate,
                **args.fields)
  return create(args.method, args.fields)


def prepare(args: argparse.Namespace, record: dict,
            merged: bool = True) -> tuple[dict[str, Callable], dict]:
  """Calls of our train step, eval step, merged and plain eval steps (those two only
  with `merged`, the merged one for mergeable methods) and the K-configurations train
  step for --configs K (MLAE), each blocking on its result."""
  dtype = choose_compute_dtype(args.dtype).dtype
  adapter = method_of(args)
  overrides = {'num_layers': args.layers} if args.layers else {}
  model = create_model(args.model, args.num_classes, adapter=adapter, dtype=dtype, **overrides)
  params = init_params(model, jax.random.key(0), args.image_size)
  tuned = adapter.trained_patterns(model.num_layers)
  trainable, frozen = split_trainable(params, tuned)
  tx = make_optimizer(optax.constant_schedule(1e-3), weight_decay=1e-4, grad_clip_norm=None)

  mesh = parallel.make_mesh()
  replicated = parallel.replicated(mesh)
  rng = np.random.default_rng(0)
  # Two batches of training data resident on the device, as in real training.
  train_images = rng.integers(0, 256, (2 * args.batch, args.image_size, args.image_size, 3),
                              np.uint8)
  train_labels = rng.integers(0, args.num_classes, 2 * args.batch).astype(np.int32)
  frozen, train_images, train_labels = jax.device_put(
      (frozen, train_images, train_labels), replicated)
  order = jax.device_put(np.arange(2 * args.batch, dtype=np.int32), replicated)
  eval_batch = [parallel.global_batch(np.asarray(a), mesh) for a in (
      train_images[:args.batch], train_labels[:args.batch], np.ones(args.batch, bool))]
  cfg = StepConfig(model, tx, args.batch, MEAN, STD,
                   batch_sharding=parallel.batch_sharding(mesh))
  key = jax.random.key(1)

  def train_call(step_fn, state, *extra):
    calls = 0

    def call():
      nonlocal state, calls
      state, metrics = step_fn(state, frozen, train_images, train_labels, order,
                               np.int32(calls % 2), key, *extra)
      calls += 1
      jax.block_until_ready(metrics)
    return call

  # The train steps donate their state: they get copies of the trainable leaves. K = 1:
  # the states and drop rates carry a leading axis of 1, as in training.
  state = stack_configs([create_train_state(jax.tree.map(jnp.copy, trainable), tx)])
  drop_rates = stack_configs([drop_rate_variables(adapter.layer_experts(model.num_layers),
                                                  trainable) if isinstance(adapter, Mlae) else {}])
  eval_fn = jit_eval_step(cfg, replicated)
  stacked_trainable = stack_configs([trainable])
  calls = {
      'jax_train': train_call(jit_train_step(cfg, replicated),
                              *jax.device_put((state, drop_rates), replicated)),
      'jax_eval': lambda: jax.block_until_ready(
          eval_fn(stacked_trainable, frozen, *eval_batch)),
  }
  if args.configs > 1:
    rates = np.linspace(0.0, 0.9, args.configs)
    models = [model.clone(adapter=Mlae(
        targets=adapter.targets, rank=args.rank, drop_rate=float(p))) for p in rates]
    stacked = stack_configs([create_train_state(trainable, tx)] * args.configs)
    drop_rates = stack_configs([drop_rate_variables(m.adapter.layer_experts(m.num_layers), trainable)
                                for m in models])
    calls['jax_train_configs'] = train_call(
        jit_train_step(cfg, replicated, args.configs, args.configs_per_pass),
        *jax.device_put((stacked, drop_rates), replicated))

  if merged and adapter.MERGEABLE:
    merged_model, merged_params = merge_adapters(model, jax.device_get(combine(frozen, trainable)))
    calls['jax_merged_eval'] = _eval_call(merged_model, merged_params, eval_batch, replicated)
  if merged:
    plain_model = create_model(args.model, args.num_classes, dtype=dtype, **overrides)
    calls['jax_plain_eval'] = _eval_call(
        plain_model, init_params(plain_model, jax.random.key(0), args.image_size), eval_batch,
        replicated)
  counts = count_params(params, tuned)
  info = {'device': f'{jax.devices()[0].device_kind} x{len(jax.devices())} '
                    f'({jax.default_backend()})',
          'dtype': jnp.dtype(dtype).name, 'jax_version': jax.__version__,
          'method': adapter.NAME, 'mergeable': adapter.MERGEABLE,
          'trainable_params_without_head': counts['adapter'] + counts['tuned']}
  return calls, info


def _eval_call(model: VisionTransformer, params: dict, batch: list, replicated) -> Callable:
  trainable, frozen = split_trainable(params)
  trainable, frozen = jax.device_put((stack_configs([trainable]), frozen), replicated)
  eval_fn = jit_eval_step(StepConfig(model, None, batch[0].shape[0], MEAN, STD), replicated)
  return lambda: jax.block_until_ready(eval_fn(trainable, frozen, *batch))
