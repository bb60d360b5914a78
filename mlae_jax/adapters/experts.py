"""The low-rank update of one linear map: MLAE's masked experts (and LoRA)."""

from __future__ import annotations

import dataclasses
from typing import Any, Mapping, Sequence

import jax
import jax.numpy as jnp
from flax import linen as nn

from mlae_jax.adapters.products import up_project
from mlae_jax.partition import ADAPTER_PREFIX

# Named PRNG stream of the expert masks; input dropout uses flax's 'dropout'.
MASK_RNG = 'expert_mask'
# Optional variable collection of traced per-layer drop rates (a leaf 'rate' per
# adapter), which replace the static ones: how K configurations that differ in
# their drop rates train in one vmapped step.
DROP_RATES = 'expert_drop_rates'



@dataclasses.dataclass(frozen=True)
class LayerExperts:
  """Resolved adapter settings for one transformer block: `experts` rank-1 columns,
  grouped `expert_rank` to an expert (one coefficient and one mask bit each)."""
  experts: int
  drop_rate: float
  coeff_init: float
  adaptive_coeff: bool
  per_example_mask: bool
  input_dropout: float
  expert_rank: int = 1

  @property
  def groups(self) -> int:
    return self.experts // self.expert_rank


# torch.nn.init.kaiming_uniform_(a=sqrt(5)) on an (r, d_in) tensor: U(+-1/sqrt(d_in)).
kaiming_uniform_a_sqrt5 = nn.initializers.variance_scaling(
    1.0 / 3.0, 'fan_in', 'uniform', in_axis=-1, out_axis=-2)


def torch_linear_init(batch_axis: tuple[int, ...] = ()) -> nn.initializers.Initializer:
  """torch.nn.Linear's default init (kaiming_uniform_, a=sqrt(5)) on an (in, out) kernel,
  stacked along `batch_axis`: U(+-1/sqrt(in))."""
  return nn.initializers.variance_scaling(1.0 / 3.0, 'fan_in', 'uniform', batch_axis=batch_axis)


class LowRankExperts(nn.Module):
  """Computes ((x A^T) * m * c) B, the adapter's contribution to x W0.

  A (r, d_in) is Kaiming-uniform, B (r, d_out) zero, c (r / k,) the coefficients of
  the experts of k = `expert_rank` columns (a parameter when adaptive). In training, m
  is an inverted-dropout mask over experts drawn from the 'expert_mask' PRNG stream:
  one per call (shared by the batch) or one per example. Dropped experts get no
  gradient that step. At eval, m = 1: every expert, unscaled. The mask is sown as
  'intermediates/expert_mask'.
  """
  settings: LayerExperts
  features: int
  dtype: Any = None
  param_dtype: Any = jnp.float32

  @nn.compact
  def __call__(self, x: jax.Array, *, train: bool) -> jax.Array:
    s = self.settings
    a = self.param('A', kaiming_uniform_a_sqrt5, (s.experts, x.shape[-1]), self.param_dtype)
    b = self.param('B', nn.initializers.zeros, (s.experts, self.features), self.param_dtype)
    coeff = (self.param('coeff', nn.initializers.constant(s.coeff_init), (s.groups,),
                        self.param_dtype)
             if s.adaptive_coeff else jnp.full((s.groups,), s.coeff_init, jnp.float32))
    traced_rate = self.has_variable(DROP_RATES, 'rate')
    rate = self.get_variable(DROP_RATES, 'rate') if traced_rate else s.drop_rate
    if train and (traced_rate or s.drop_rate > 0):
      # Per example: (batch, 1, ..., 1, r) broadcasts over tokens; else (r,).
      mask_shape = ((x.shape[0],) + (1,) * (x.ndim - 2) + (s.groups,)
                    if s.per_example_mask else (s.groups,))
      keep = jax.random.bernoulli(self.make_rng(MASK_RNG), 1.0 - rate, mask_shape)
      self.sow('intermediates', 'expert_mask', keep)
      coeff = jnp.where(keep, coeff / (1.0 - rate), 0.0)
    if train and s.input_dropout > 0:
      x = nn.Dropout(s.input_dropout, deterministic=False)(x)
    dtype = self.dtype or x.dtype
    hidden = jnp.einsum('...i,ri->...r', x.astype(dtype), a.astype(dtype))
    hidden = hidden * jnp.repeat(coeff, s.expert_rank, axis=-1).astype(dtype)
    return up_project(hidden, b.astype(dtype))


def drop_rate_variables(layer_experts: Sequence[LayerExperts | None], params: Mapping[str, Any]
                        ) -> dict[str, Any]:
  """The DROP_RATES collection for a model's params: each adapter of block i gets
  `layer_experts[i].drop_rate` (so another configuration's rates can be traced in)."""

  def walk(tree, block):
    out = {}
    for name, sub in tree.items():
      if name.startswith(ADAPTER_PREFIX):
        out[name] = {'rate': jnp.asarray(layer_experts[block].drop_rate, jnp.float32)}
      elif isinstance(sub, Mapping):
        index = int(name.rsplit('_', 1)[1]) if name.startswith('encoderblock_') else block
        inner = walk(sub, index)
        if inner:
          out[name] = inner
    return out

  return walk(params, None)
