"""Learning-rate schedules: per-step warm-up + cosine, or timm's per-epoch cosine."""

from __future__ import annotations

import jax.numpy as jnp
import optax

SCHEDULES = ('warmup_cosine', 'timm_cosine')


def learning_rate_schedule(kind: str, *, base_lr: float, epochs: int, steps_per_epoch: int,
                           warmup_epochs: float, warmup_lr: float, min_lr: float) -> optax.Schedule:
  """Maps the optimizer step count to a learning rate.

  'warmup_cosine': linear from `warmup_lr` to `base_lr` over the warm-up steps,
    then cosine to `min_lr`, updated every step.
  'timm_cosine': timm's CosineLRScheduler(t_initial=epochs, warmup_t=warmup_epochs,
    warmup_lr_init=warmup_lr, lr_min=min_lr) stepped once per epoch, as the PyTorch
    PEFT code stepped it; its cosine runs over the epoch index itself (no warm-up
    prefix), so at the end of warm-up it is already slightly below `base_lr`.
  """
  if kind == 'warmup_cosine':
    warmup_steps = int(round(warmup_epochs * steps_per_epoch))
    total = max(epochs * steps_per_epoch, warmup_steps + 1)
    return optax.warmup_cosine_decay_schedule(
        init_value=warmup_lr, peak_value=base_lr, warmup_steps=warmup_steps,
        decay_steps=total, end_value=min_lr)
  if kind == 'timm_cosine':
    warmup = int(warmup_epochs)

    def schedule(count):
      epoch = jnp.asarray(count) // steps_per_epoch
      warming = warmup_lr + epoch * (base_lr - warmup_lr) / max(warmup, 1)
      cosine = min_lr + 0.5 * (base_lr - min_lr) * (1 + jnp.cos(jnp.pi * epoch / epochs))
      after = jnp.where(epoch < epochs, cosine, min_lr)
      return jnp.where(epoch < warmup, warming, after)

    return schedule
  raise ValueError(f'Unknown schedule {kind!r}; choose one of {SCHEDULES}.')
