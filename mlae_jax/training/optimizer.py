"""The optimizer of the trainable subtree (adapters and head)."""

from __future__ import annotations

import optax


def make_optimizer(schedule: optax.Schedule, *, weight_decay: float,
                   grad_clip_norm: float | None) -> optax.GradientTransformation:
  """AdamW (decoupled weight decay on every trained leaf, as torch.optim.AdamW), with
  optional global-norm gradient clipping first."""
  adamw = optax.adamw(schedule, b1=0.9, b2=0.999, eps=1e-8, weight_decay=weight_decay)
  if grad_clip_norm:
    return optax.chain(optax.clip_by_global_norm(grad_clip_norm), adamw)
  return adamw
