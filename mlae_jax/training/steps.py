"""The jitted training and evaluation steps, as pure functions."""

from __future__ import annotations

import dataclasses
import functools
from typing import Any, Sequence

import flax
import jax
import jax.numpy as jnp
import optax

from mlae_jax.adapters.experts import DROP_RATES, MASK_RNG
from mlae_jax.data.augment import Augment
from mlae_jax.data.task_data import normalize
from mlae_jax.model.drop_path import DROP_PATH_RNG
from mlae_jax.model.vit import VisionTransformer
from mlae_jax.partition import combine


@flax.struct.dataclass
class TrainState:
  """What changes during training. The frozen backbone is kept apart: it gets no
  gradient, no optimizer state and no update."""
  step: jax.Array
  trainable: Any
  opt_state: optax.OptState


def create_train_state(trainable: Any, tx: optax.GradientTransformation) -> TrainState:
  """Step 0: the trainable subtree and a fresh optimizer state for it."""
  return TrainState(jnp.zeros((), jnp.int32), trainable, tx.init(trainable))


@dataclasses.dataclass(frozen=True)
class StepConfig:
  """The static parts of a step (hashable, so jit can close over them)."""
  model: VisionTransformer
  tx: optax.GradientTransformation
  batch_size: int
  mean: tuple[float, float, float]
  std: tuple[float, float, float]
  augment: Augment | None = None  # (key, uint8 images) -> uint8 training inputs.
  # Where the gathered training batch lives: split over the mesh's data axis, so
  # each device computes its own rows (None: wherever XLA puts it).
  batch_sharding: jax.sharding.Sharding | None = None


def epoch_order(key: jax.Array, num_examples: int, batch_size: int) -> jax.Array:
  """A permutation of the training set, padded to whole batches (padding = -1)."""
  steps = -(-num_examples // batch_size)
  order = jax.random.permutation(key, num_examples)
  return jnp.concatenate([order, jnp.full(steps * batch_size - num_examples, -1, order.dtype)])


# The augmentation's key (crops and flips); the other streams are the model's.
AUGMENT_RNG = 'augment'


def step_rngs(key: jax.Array, step: jax.Array | int) -> dict[str, jax.Array]:
  """The PRNG keys of global training step `step` of a run whose training key is
  `key`: one stream each for the expert masks, input dropout, stochastic depth and
  augmentation. They depend on the seed and the step alone, so a resumed run
  draws exactly what an uninterrupted one draws (and a cross-check can redraw
  them)."""
  names = (MASK_RNG, 'dropout', DROP_PATH_RNG, AUGMENT_RNG)
  return dict(zip(names, jax.random.split(jax.random.fold_in(key, step), len(names))))


def train_step(state: TrainState, frozen: Any, images: jax.Array, labels: jax.Array,
               order: jax.Array, index: jax.Array, key: jax.Array, drop_rates: Any = None, *,
               cfg: StepConfig) -> tuple[TrainState, dict[str, jax.Array]]:
  """One AdamW step on batch `index` of the epoch `order`.

  The batch is gathered from the training set held on the device; padding rows of
  a last, partial batch get zero weight, so the loss is the mean over real examples
  (as PyTorch's last smaller batch). Masks, keep patterns and crops are drawn from
  `step_rngs(key, step)`, so a resumed run repeats them exactly. `drop_rates` (the
  DROP_RATES collection) overrides the model's expert drop rates.
  """
  rows = jax.lax.dynamic_slice_in_dim(order, index * cfg.batch_size, cfg.batch_size)
  weights = (rows >= 0).astype(jnp.float32)
  rows = jnp.maximum(rows, 0)
  batch_images = jnp.take(images, rows, axis=0)
  batch_labels = jnp.take(labels, rows, axis=0)
  if cfg.batch_sharding is not None:
    batch_images, batch_labels, weights = jax.lax.with_sharding_constraint(
        (batch_images, batch_labels, weights), cfg.batch_sharding)
  rngs = step_rngs(key, state.step)
  augment_key = rngs.pop(AUGMENT_RNG)
  if cfg.augment is not None:
    batch_images = cfg.augment(augment_key, batch_images)
  inputs = normalize(batch_images, cfg.mean, cfg.std)

  def loss_fn(trainable):
    variables = {'params': combine(trainable, frozen)}
    if drop_rates is not None:
      variables[DROP_RATES] = drop_rates
    logits = cfg.model.apply(variables, inputs, train=True, rngs=rngs, example_weights=weights)
    losses = optax.softmax_cross_entropy_with_integer_labels(logits, batch_labels)
    loss = jnp.sum(losses * weights) / jnp.sum(weights)
    return loss, logits

  # Gradients of the trainable subtree only: none are computed for the backbone.
  (loss, logits), grads = jax.value_and_grad(loss_fn, has_aux=True)(state.trainable)
  updates, opt_state = cfg.tx.update(grads, state.opt_state, state.trainable)
  trainable = optax.apply_updates(state.trainable, updates)
  correct = jnp.sum((jnp.argmax(logits, -1) == batch_labels) * weights)
  metrics = {'loss_sum': loss * jnp.sum(weights), 'correct': correct, 'count': jnp.sum(weights)}
  return TrainState(state.step + 1, trainable, opt_state), metrics


def eval_step(trainable: Any, frozen: Any, images: jax.Array, labels: jax.Array,
              mask: jax.Array, cfg: StepConfig) -> dict[str, jax.Array]:
  """Sums of correct predictions, loss and examples over the unmasked rows."""
  inputs = normalize(images, cfg.mean, cfg.std)
  weights = mask.astype(jnp.float32)
  logits = cfg.model.apply({'params': combine(trainable, frozen)}, inputs, train=False,
                           example_weights=weights)
  losses = optax.softmax_cross_entropy_with_integer_labels(logits, labels)
  return {'correct': jnp.sum((jnp.argmax(logits, -1) == labels) * weights),
          'loss_sum': jnp.sum(losses * weights), 'count': jnp.sum(weights)}


def stack_configs(trees: Sequence[Any]) -> Any:
  """K per-configuration trees as one tree with a leading axis of K (the K-configs
  step's states and drop rates)."""
  return jax.tree.map(lambda *leaves: jnp.stack(leaves), *trees)


def unstack_configs(tree: Any, count: int) -> list[Any]:
  """The K trees of a stacked one."""
  return [jax.tree.map(lambda leaf: leaf[k], tree) for k in range(count)]


def configs_per_pass(configs: int) -> int:
  """How many of K configurations a step computes side by side (vmapped); the rest
  go one group after another within the same compiled step. On accelerators all K
  (bigger matrix products); on CPU one at a time, where a ViT step is already
  compute-bound and K-fold activations only add memory traffic (measured: 6 side by
  side ran 0.86x the speed of 6 sequential steps)."""
  return configs if jax.default_backend() in ('gpu', 'tpu') else 1


def _over_configs(step, configs: int, per_pass: int | None, shared: tuple[int, ...]):
  """`step` mapped over a leading config axis of every argument not in `shared`: all
  side by side (vmapped) when `per_pass` covers them (K = 1 included), else in groups
  of `per_pass` one after another."""
  per_pass = per_pass or configs_per_pass(configs)

  def mapped(*args):
    own = tuple(i for i in range(len(args)) if i not in shared)

    def one(values):
      full = list(args)
      for i, value in zip(own, values):
        full[i] = value
      return step(*full)

    values = tuple(args[i] for i in own)
    if per_pass >= configs:
      return jax.vmap(one)(values)
    return jax.lax.map(one, values, batch_size=per_pass)

  return mapped


def jit_train_step(cfg: StepConfig, replicated: jax.sharding.Sharding, configs: int = 1,
                   per_pass: int | None = None):
  """`train_step` compiled for `cfg` over K = `configs` configurations (K = 1 a run of
  one): the states and drop rates carry a leading axis of K (`stack_configs`), and
  everything else (batch, masks' key, backbone) is shared. `per_pass` of them are
  computed side by side (default: `configs_per_pass`). The states are donated (updated
  in place) and come back replicated over the mesh."""
  step = _over_configs(functools.partial(train_step, cfg=cfg), configs, per_pass,
                       shared=(1, 2, 3, 4, 5, 6))
  return jax.jit(step, donate_argnums=0, out_shardings=(replicated, replicated))


def jit_eval_step(cfg: StepConfig, replicated: jax.sharding.Sharding, configs: int = 1,
                  per_pass: int | None = None):
  """`eval_step` compiled for `cfg` over K = `configs` stacked trainable subtrees, its
  sums (with a leading axis of K) replicated over the mesh."""
  step = _over_configs(functools.partial(eval_step, cfg=cfg), configs, per_pass,
                       shared=(1, 2, 3, 4))
  return jax.jit(step, out_shardings=replicated)
