"""The jitted training and evaluation steps, as pure functions."""

from __future__ import annotations

import dataclasses
from typing import Any

import flax
import jax
import jax.numpy as jnp
import optax

from mlae_jax.adapters.experts import MASK_RNG
from mlae_jax.data.augment import Augment
from mlae_jax.data.task_data import normalize
from mlae_jax.model.vit import VisionTransformer
from mlae_jax.partition import combine


@flax.struct.dataclass
class TrainState:
  """What changes during training. The frozen backbone is kept apart: it gets no
  gradient, no optimizer state and no update."""
  step: jax.Array
  trainable: Any
  opt_state: optax.OptState


@dataclasses.dataclass(frozen=True)
class StepConfig:
  """The static parts of a step (hashable, so jit can close over them)."""
  model: VisionTransformer
  tx: optax.GradientTransformation
  batch_size: int
  mean: tuple[float, float, float]
  std: tuple[float, float, float]
  augment: Augment | None = None  # (key, uint8 images) -> uint8 training inputs.


def epoch_order(key: jax.Array, num_examples: int, batch_size: int) -> jax.Array:
  """A permutation of the training set, padded to whole batches (padding = -1)."""
  steps = -(-num_examples // batch_size)
  order = jax.random.permutation(key, num_examples)
  return jnp.concatenate([order, jnp.full(steps * batch_size - num_examples, -1, order.dtype)])


def train_step(state: TrainState, frozen: Any, images: jax.Array, labels: jax.Array,
               order: jax.Array, index: jax.Array, key: jax.Array,
               cfg: StepConfig) -> tuple[TrainState, dict[str, jax.Array]]:
  """One AdamW step on batch `index` of the epoch `order`.

  The batch is gathered from the training set held on the device; padding rows of
  a last, partial batch get zero weight, so the loss is the mean over real examples
  (as PyTorch's last smaller batch). Masks and crops are drawn from `key` folded
  with the global step, so a resumed run repeats them exactly.
  """
  rows = jax.lax.dynamic_slice_in_dim(order, index * cfg.batch_size, cfg.batch_size)
  weights = (rows >= 0).astype(jnp.float32)
  rows = jnp.maximum(rows, 0)
  batch_images = jnp.take(images, rows, axis=0)
  batch_labels = jnp.take(labels, rows, axis=0)
  step_key = jax.random.fold_in(key, state.step)
  mask_key, dropout_key, crop_key = jax.random.split(step_key, 3)
  if cfg.augment is not None:
    batch_images = cfg.augment(crop_key, batch_images)
  inputs = normalize(batch_images, cfg.mean, cfg.std)

  def loss_fn(trainable):
    logits = cfg.model.apply({'params': combine(trainable, frozen)}, inputs, train=True,
                             rngs={MASK_RNG: mask_key, 'dropout': dropout_key})
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
  logits = cfg.model.apply({'params': combine(trainable, frozen)}, inputs, train=False)
  weights = mask.astype(jnp.float32)
  losses = optax.softmax_cross_entropy_with_integer_labels(logits, labels)
  return {'correct': jnp.sum((jnp.argmax(logits, -1) == labels) * weights),
          'loss_sum': jnp.sum(losses * weights), 'count': jnp.sum(weights)}
