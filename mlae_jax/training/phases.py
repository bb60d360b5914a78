"""A method's phases between epochs (scoring, pruning, schedules), run inside the
training loop: after an epoch's training, before its checkpoint and evaluation, so a
checkpoint holds the state after every phase due by then, and a run killed during or
after a phase resumes to the same result (the phase is deterministic: fixed batches,
no random draws)."""

from __future__ import annotations

import functools
from typing import Any, Callable, Iterator

import jax
import jax.numpy as jnp
import optax

from mlae_jax.adapters.method import Method
from mlae_jax.data.task_data import normalize
from mlae_jax.model.vit import VisionTransformer
from mlae_jax.partition import combine, split_trainable
from mlae_jax.training.steps import TrainState, stack_configs, unstack_configs

# Folded into the order key for the batches a phase scores on (apart from the epochs').
_PHASE_ORDER_TAG = 1_000_003


def loss_gradients(model: VisionTransformer, mean: tuple[float, ...], std: tuple[float, ...]
                   ) -> Callable[[Any, jax.Array, jax.Array], Any]:
  """(params, uint8 images, labels) -> the gradient of the batch's mean cross-entropy
  with respect to every parameter, in eval mode (no dropout, masks or stochastic depth)."""

  def loss(params, images, labels):
    logits = model.apply({'params': params}, normalize(images, mean, std), train=False)
    return optax.softmax_cross_entropy_with_integer_labels(logits, labels).mean()

  return jax.jit(jax.grad(loss))


def run_phases(method: Method, epoch: int, epochs: int, state: TrainState, frozen: Any,
               count: int, tuned: tuple[str, ...], gradients_of: Callable[..., Iterator[Any]],
               sharding: jax.sharding.Sharding) -> TrainState:
  """`state` (K stacked configurations) after the method's phase following completed
  epoch `epoch`, if one is due; each configuration's phase sees its own parameters
  (`frozen`: the backbone, a host copy; `tuned`: the run's patterns of backbone leaves
  trained in place).
  `gradients_of(params, batches, epoch=)` gives the phase its gradients."""
  if epoch not in method.phase_epochs(epochs):
    return state
  configs = []
  for run_state in unstack_configs(jax.device_get(state), count):
    params = method.run_phase(epoch, epochs, combine(run_state.trainable, frozen),
                              functools.partial(gradients_of, epoch=epoch))
    trainable, _ = split_trainable(params, tuned)
    configs.append(run_state.replace(trainable=trainable))
  return jax.device_put(stack_configs(configs), sharding)


def batch_gradients(grad_fn: Callable, images: jax.Array, labels: jax.Array,
                    order_key: jax.Array, batch_size: int, size: int
                    ) -> Callable[..., Iterator[Any]]:
  """`gradients_of(params, batches, epoch=)` for `run_phases`: the gradients on the first
  `batches` batches (yielded one by one) of a permutation of the training set fixed by
  the run's order key and `epoch` (the same batches when a phase is redone after a
  resume), the images centre-cropped to `size` where the stored ones are larger (crops
  are augmentation)."""
  top, left = (images.shape[1] - size) // 2, (images.shape[2] - size) // 2

  def gradients_of(params: Any, batches: int, *, epoch: int) -> Iterator[Any]:
    params = jax.device_put(params)  # Once, not with every batch.
    num = labels.shape[0]
    order = jax.random.permutation(
        jax.random.fold_in(jax.random.fold_in(order_key, _PHASE_ORDER_TAG), epoch), num)
    for index in range(batches):  # One gradient tree at a time: a ViT-B/16 one is 344 MB.
      rows = order[jnp.arange(index * batch_size, (index + 1) * batch_size) % num]
      batch = jnp.take(images, rows, axis=0)[:, top:top + size, left:left + size]
      yield grad_fn(params, batch, jnp.take(labels, rows, axis=0))

  return gradients_of
