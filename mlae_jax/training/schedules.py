"""Learning-rate schedules and the evaluation schedule of a run.

Learning rate: per-step warm-up + cosine, or timm's per-epoch `CosineLRScheduler`
stepped either as SPT's training script steps it (the PyTorch VTAB-1k runs) or as
timm's own `train.py` does.
"""

from __future__ import annotations

import jax.numpy as jnp
import optax

# 'timm_cosine_spt': SPT (train_spt.py) calls `scheduler.step(epoch)` after epoch
#   `epoch`, so epoch e >= 1 trains with lr(e - 1), and epochs 0 and 1 both with lr(0).
# 'timm_cosine': timm's train.py calls `scheduler.step(epoch + 1)`, so epoch e
#   trains with lr(e): one epoch ahead of SPT.
_TIMM_EPOCH_OFFSET = {'timm_cosine_spt': -1, 'timm_cosine': 0}
SCHEDULES = ('timm_cosine_spt', 'timm_cosine', 'warmup_cosine')


def timm_cosine_lr(t, *, base_lr: float, epochs: int, warmup_epochs: int, warmup_lr: float,
                   min_lr: float):
  """timm's `CosineLRScheduler(t_initial=epochs, warmup_t=warmup_epochs,
  warmup_lr_init=warmup_lr, lr_min=min_lr)._get_lr(t)`: linear warm-up over the
  first `warmup_epochs` values of t, then a cosine over t itself (no warm-up
  prefix, so it starts slightly below `base_lr`), `min_lr` from t = epochs on."""
  warming = warmup_lr + t * (base_lr - warmup_lr) / max(warmup_epochs, 1)
  cosine = min_lr + 0.5 * (base_lr - min_lr) * (1 + jnp.cos(jnp.pi * t / epochs))
  after = jnp.where(t < epochs, cosine, min_lr)
  return jnp.where(t < warmup_epochs, warming, after)


def learning_rate_schedule(kind: str, *, base_lr: float, epochs: int, steps_per_epoch: int,
                           warmup_epochs: float, warmup_lr: float, min_lr: float) -> optax.Schedule:
  """Maps the optimizer step count to a learning rate.

  'timm_cosine_spt' / 'timm_cosine': `timm_cosine_lr` held constant within each
    epoch, stepped as SPT or as timm's train.py steps the scheduler (see
    _TIMM_EPOCH_OFFSET). Epoch 0 always trains at lr(0) (= `warmup_lr` with a
    warm-up), the value timm's scheduler sets when it is created.
  'warmup_cosine': linear from `warmup_lr` to `base_lr` over the warm-up steps,
    then cosine to `min_lr`, updated every step.
  """
  if kind == 'warmup_cosine':
    warmup_steps = int(round(warmup_epochs * steps_per_epoch))
    total = max(epochs * steps_per_epoch, warmup_steps + 1)
    return optax.warmup_cosine_decay_schedule(
        init_value=warmup_lr, peak_value=base_lr, warmup_steps=warmup_steps,
        decay_steps=total, end_value=min_lr)
  if kind in _TIMM_EPOCH_OFFSET:
    offset = _TIMM_EPOCH_OFFSET[kind]

    def schedule(count):
      epoch = jnp.asarray(count) // steps_per_epoch
      t = jnp.maximum(epoch + offset, 0)
      return timm_cosine_lr(t, base_lr=base_lr, epochs=epochs, warmup_epochs=int(warmup_epochs),
                            warmup_lr=warmup_lr, min_lr=min_lr)

    return schedule
  raise ValueError(f'Unknown schedule {kind!r}; choose one of {SCHEDULES}.')


def is_evaluation_epoch(epoch: int, *, epochs: int, every: int, last: int) -> bool:
  """Whether the test split is evaluated after 0-based epoch `epoch`.

  SPT's rule (train_spt.py): `epoch % every == 0 or epoch >= epochs - last`, so
  with every = last = 10 and 100 epochs, after epochs 0, 10, ..., 80 and 90..99.
  The final epoch is always evaluated (results.json's final-epoch figure).
  """
  return epoch % every == 0 or epoch >= epochs - last or epoch == epochs - 1



def evaluation_count(*, epochs: int, every: int, last: int) -> int:
  """How many evaluations a run of `epochs` epochs makes (see is_evaluation_epoch)."""
  return sum(is_evaluation_epoch(e, epochs=epochs, every=every, last=last)
             for e in range(epochs))
