"""Stochastic depth, as timm's `DropPath`: a residual branch dropped per example.

In training, each example's branch output is kept with probability 1 - rate and
then scaled by 1 / (1 - rate) (dropped examples get zero), so the expectation is the
branch itself; at evaluation the branch passes unchanged. timm gives block i of a
depth-d ViT the rate `drop_path_rate * i / (d - 1)` (`block_drop_path_rates`).
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
from flax import linen as nn

# Named PRNG stream of the keep patterns; the trainer derives it from the seed and step.
DROP_PATH_RNG = 'drop_path'


def block_drop_path_rates(drop_path_rate: float, depth: int) -> tuple[float, ...]:
  """timm's per-block rates: linear from 0 (first block) to `drop_path_rate` (last)."""
  if depth == 1:
    return (0.0,)
  return tuple(drop_path_rate * i / (depth - 1) for i in range(depth))


class DropPath(nn.Module):
  """Multiplies a residual branch (batch, ...) by keep / (1 - rate) per example.

  The keep pattern (bool, (batch,)) comes from the 'drop_path' PRNG stream and is
  sown as 'intermediates/keep', so a cross-check can carry it to another
  implementation.
  """
  rate: float

  @nn.compact
  def __call__(self, branch: jax.Array, *, train: bool) -> jax.Array:
    if not train or self.rate == 0.0:
      return branch
    keep_prob = 1.0 - self.rate
    keep = jax.random.bernoulli(self.make_rng(DROP_PATH_RNG), keep_prob, (branch.shape[0],))
    self.sow('intermediates', 'keep', keep)
    # timm: the 0/1 tensor divided by the Python float keep_prob (computed in float32,
    # rounded once to the branch's dtype), times the branch.
    scale = (keep.astype(jnp.float32) / jnp.float32(keep_prob)).astype(branch.dtype)
    return branch * scale.reshape((-1,) + (1,) * (branch.ndim - 1))
