"""The optimizer of the trainable subtree: AdamW with SPT's weight-decay groups."""

from __future__ import annotations

from typing import Any

import ml_collections
import numpy as np
import optax
from flax import traverse_util

from mlae_jax.partition import param_role
from mlae_jax.training.schedules import learning_rate_schedule

# 'spt': SPT's `set_weight_decay` (lib/utils.py), which the PyTorch VTAB-1k runs used:
#   a trained parameter with one dimension (biases, norm scales, MLAE's coefficient
#   vector) or named `*.bias`, or in timm ViT's `no_weight_decay()` set (class token,
#   position embedding), gets no weight decay; every other one gets the configured decay.
# 'all': the configured decay on every trained parameter.
WEIGHT_DECAY_RULES = ('spt', 'all')
# Our names of timm's VisionTransformer.no_weight_decay() entries (cls_token, pos_embed):
# part of SPT's rule, in effect for a run that trains them (full fine-tuning).
_TIMM_NO_WEIGHT_DECAY = ('cls', 'Transformer/posembed_input/pos_embedding')


def decays(path: str, shape: tuple[int, ...], rule: str) -> bool:
  """Whether the trained leaf at '/'-joined `path` with `shape` is weight-decayed."""
  if rule not in WEIGHT_DECAY_RULES:
    raise ValueError(f'Unknown weight-decay rule {rule!r}; choose one of {WEIGHT_DECAY_RULES}.')
  if param_role(path) == 'state':  # Not trained at all (see `keep_state`).
    return False
  if rule == 'all':
    return True
  # Our q/k/v biases are (heads, head_dim): the name, not the shape, marks them.
  return not (len(shape) <= 1 or path.rsplit('/', 1)[-1] == 'bias'
              or path in _TIMM_NO_WEIGHT_DECAY)


def weight_decay_mask(trainable: Any, rule: str) -> dict:
  """A tree of bools like `trainable`: True where `rule` applies weight decay."""
  flat = traverse_util.flatten_dict(dict(trainable), sep='/')
  return traverse_util.unflatten_dict(
      {path: decays(path, np.shape(leaf), rule) for path, leaf in flat.items()}, sep='/')


def keep_state(tx: optax.GradientTransformation, trainable: Any
               ) -> optax.GradientTransformation:
  """`tx` with its updates of methods' state leaves (`partition`: `state_*`) set to zero,
  weight decay included: they stay as phases of the run set them. `tx` itself where
  there are none (so the optimizer state of other runs keeps its structure)."""
  flat = traverse_util.flatten_dict(dict(trainable), sep='/')
  state = {path: param_role(path) == 'state' for path in flat}
  if not any(state.values()):
    return tx
  return optax.chain(tx, optax.masked(optax.set_to_zero(),
                                      traverse_util.unflatten_dict(state, sep='/')))


def make_optimizer(schedule: optax.Schedule, *, weight_decay: float,
                   grad_clip_norm: float | None, decay_mask: Any = None
                   ) -> optax.GradientTransformation:
  """AdamW as torch.optim.AdamW (decoupled weight decay, eps 1e-8) on the leaves
  where `decay_mask` (e.g. `weight_decay_mask`) is True, every leaf when None;
  optional global-norm gradient clipping first."""
  adamw = optax.adamw(schedule, b1=0.9, b2=0.999, eps=1e-8, weight_decay=weight_decay,
                      mask=decay_mask)
  if grad_clip_norm:
    return optax.chain(optax.clip_by_global_norm(grad_clip_norm), adamw)
  return adamw


def optimizer_from_config(config: ml_collections.ConfigDict, trainable: Any,
                          steps_per_epoch: int) -> tuple[optax.GradientTransformation,
                                                         optax.Schedule]:
  """The run's optimizer for the trainable subtree `trainable` (its weight-decay
  groups follow `config.weight_decay_rule`), and its learning-rate schedule."""
  schedule = learning_rate_schedule(
      config.schedule, base_lr=config.learning_rate, epochs=config.epochs,
      steps_per_epoch=steps_per_epoch, warmup_epochs=config.warmup_epochs,
      warmup_lr=config.warmup_lr, min_lr=config.min_lr)
  tx = make_optimizer(schedule, weight_decay=config.weight_decay,
                      grad_clip_norm=config.grad_clip_norm or None,
                      decay_mask=weight_decay_mask(trainable, config.weight_decay_rule))
  return keep_state(tx, trainable), schedule
