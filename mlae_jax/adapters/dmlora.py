"""DMLoRA (Fang, Wang, Yi, Ma: "Dropout Mixture Low-Rank Adaptation for Visual
Parameters-Efficient Fine-Tuning", ECCV 2024): a RECONSTRUCTION from the abstract.

No official code is public (a GitHub repository named DMLoRA is an unrelated LLM
method), and only the abstract was available, so everything beyond its four statements
is a guess, made a config field with a stated default:

  Known (abstract)                         Reconstructed here (field, default)
  several up and down branches per layer   `branches` (4) LoRA branches of rank `rank` (8)
                                           per adapted map, averaged (the 1/B)
  branches dropped out gradually as        each branch dropped with probability p at a
  training proceeds                        step (one Bernoulli keep per branch per step,
                                           shared by the batch; inverted dropout, so
                                           the expectation is the eval-time map); p rises
                                           linearly epoch by epoch from `drop_start`
                                           (0.0) to `drop_end` (0.5), reached at the
                                           fraction `drop_ramp` (1.0) of the run
  2-stage learning scalar: one scale per   a trained `scale` (1,) per adapted map, from
  layer's module                           `scale_init` (1.0); held (gradient stopped) in
                                           stage 1, trained in stage 2, which starts
                                           after the fraction `scalar_stage` (0.5) of
                                           the epochs
  no inference overhead                    merged into the base weights (MERGEABLE)

At a site with input x, in training:
  y + s * (1/B) * sum_i keep_i / (1 - p) * (x A_i^T) B_i,
and at eval (and merged): y + s * (1/B) * sum_i (x A_i^T) B_i. The branches are stored
stacked, A (B r, d_in) and B (B r, d_out), so the update is one low-rank product with a
per-column coefficient; A_i are initialised as LoRA's / MLAE's (torch
kaiming_uniform_(a=sqrt(5)), i.e. U(+-1/sqrt(d_in))), B_i zero, so training starts at the
base model. Also reconstructed: the placement (default ('qkv',), the fused q|k|v map as
MLAE's; any dense site may be chosen), `input_dropout` (0.0, LoRA's dropout on the
adapter's input) and the recipe (the paper's own VTAB-1k settings are unknown: the
shared PEFT recipe).

The schedule is method state (adapter leaves `state_drop_rate` and `state_stage` under
`adapter_shared`, shared by every site): the optimizer never changes them, the phases
after the epochs where a value changes set them (`phase_epochs`, `run_phase`), and their
initialisers give epoch 0's values. With branches=1, drop rates 0 and scale 1 it is LoRA
with alpha = rank (the registry's `lora` with alpha None: coefficient alpha/r = 1).
"""

from __future__ import annotations

import dataclasses
import math
from typing import Any, ClassVar, Mapping

import jax
import jax.numpy as jnp
import numpy as np
from flax import linen as nn

from mlae_jax.adapters.experts import MASK_RNG, kaiming_uniform_a_sqrt5
from mlae_jax.adapters.method import (PEFT_RECIPE, Gradients, Method, ModelInfo, SiteCall,
                                      is_number)
from mlae_jax.adapters.products import up_project
from mlae_jax.adapters.sites import DENSE_SITES, SHARED_SCOPE, Site

DROP_RATE = 'state_drop_rate'  # The branch drop probability of the current epoch.
STAGE = 'state_stage'  # 0.0: stage 1 (scale held), 1.0: stage 2 (scale trained).


class _Schedule(nn.Module):
  """The shared state leaves, at epoch 0's values (float32 scalars)."""
  drop_rate: float
  stage: float

  @nn.compact
  def __call__(self) -> dict[str, jax.Array]:
    return {DROP_RATE: self.param(DROP_RATE, nn.initializers.constant(self.drop_rate), (),
                                  jnp.float32),
            STAGE: self.param(STAGE, nn.initializers.constant(self.stage), (), jnp.float32)}


class _Branches(nn.Module):
  """The update s * (1/B) * sum_i m_i (x A_i^T) B_i of one site, the B branches stacked.

  m_i = keep_i / (1 - p) in training (keep drawn once per call from the 'expert_mask'
  stream and sown as 'intermediates/branch_keep'), 1 at eval. `scale` gets no gradient
  while `stage` is 0."""
  method: 'DmLora'
  features: int
  dtype: Any = None
  param_dtype: Any = jnp.float32

  @nn.compact
  def __call__(self, x: jax.Array, drop_rate: jax.Array, stage: jax.Array, *,
               train: bool) -> jax.Array:
    m = self.method
    columns = m.branches * m.rank
    a = self.param('A', kaiming_uniform_a_sqrt5, (columns, x.shape[-1]), self.param_dtype)
    b = self.param('B', nn.initializers.zeros, (columns, self.features), self.param_dtype)
    scale = self.param('scale', nn.initializers.constant(m.scale_init), (1,), self.param_dtype)
    # Stage 1: the scale's gradient is exactly 0 (so Adam moves it by exactly 0).
    scale = jnp.where(stage > 0.5, scale, jax.lax.stop_gradient(scale)).astype(jnp.float32)
    coeff = jnp.full((m.branches,), 1.0 / m.branches, jnp.float32)
    if train and m.drops():
      keep = jax.random.bernoulli(self.make_rng(MASK_RNG), 1.0 - drop_rate, (m.branches,))
      self.sow('intermediates', 'branch_keep', keep)
      coeff = jnp.where(keep, coeff / (1.0 - drop_rate), 0.0)
    if train and m.input_dropout > 0:
      x = nn.Dropout(m.input_dropout, deterministic=False)(x)
    dtype = self.dtype or x.dtype
    hidden = jnp.einsum('...i,ri->...r', x.astype(dtype), a.astype(dtype))
    hidden = hidden * jnp.repeat(scale * coeff, m.rank).astype(dtype)
    return up_project(hidden, b.astype(dtype))


@dataclasses.dataclass(frozen=True)
class DmLora(Method):
  """DMLoRA (reconstructed; see the module docstring). Fields beyond `Method`'s:

    targets: dense maps to adapt ('qkv', 'query', 'key', 'value', 'out', 'fc1', 'fc2').
    rank: the rank of each branch.
    branches: LoRA branches per adapted map (B).
    drop_start, drop_end: the probability in [0, 1) that a branch is dropped at a step,
      in the first epoch and from the fraction `drop_ramp` of the run on; linear,
      epoch by epoch, in between.
    drop_ramp: the fraction (0, 1] of the run (of its epochs after the first) by which
      the drop probability reaches `drop_end`.
    scale_init: the initial value of each map's learning scalar.
    scalar_stage: the fraction [0, 1] of the epochs after which stage 2 starts (the
      scalars train); 0 trains them from the start, 1 never.
    input_dropout: ordinary dropout on the adapter's input (LoRA's `lora_dropout`).
  """
  NAME: ClassVar[str] = 'dmlora'
  SITES: ClassVar[tuple[str, ...]] = DENSE_SITES
  MERGEABLE: ClassVar[bool] = True
  RECIPE: ClassVar[Mapping[str, Any]] = PEFT_RECIPE  # The paper's own is unknown.

  targets: tuple[str, ...] = ('qkv',)
  rank: int = 8
  branches: int = 4
  drop_start: float = 0.0
  drop_end: float = 0.5
  drop_ramp: float = 1.0
  scale_init: float = 1.0
  scalar_stage: float = 0.5
  input_dropout: float = 0.0

  def validate(self) -> None:
    super().validate()
    self.check_integer('rank', 'branches')
    self.check_fraction('drop_start', 'drop_end', 'input_dropout')
    self.check_finite('scale_init')
    self._check(('drop_ramp',), lambda v: is_number(v) and 0.0 < v <= 1.0,
                'lie in (0, 1]', hint='the fraction of the run by which drop_end is reached')
    self._check(('scalar_stage',), lambda v: is_number(v) and 0.0 <= v <= 1.0,
                'lie in [0, 1]', hint='0 trains the scalars from the start, 1 never')

  def drops(self) -> bool:
    """Whether branches are ever dropped (else no mask is drawn)."""
    return max(self.drop_start, self.drop_end) > 0

  # --- The schedule. ---

  def drop_rate(self, epoch: int, epochs: int) -> float:
    """The branch drop probability during 0-based epoch `epoch` of a run of `epochs`:
    drop_start + (drop_end - drop_start) * min(1, epoch / (drop_ramp (epochs - 1)))."""
    progress = 0.0 if epochs <= 1 else min(1.0, epoch / (self.drop_ramp * (epochs - 1)))
    return float(self.drop_start + (self.drop_end - self.drop_start) * progress)

  def stage2_start(self, epochs: int) -> int:
    """The first 0-based epoch of stage 2: ceil(scalar_stage * epochs) (= epochs: never)."""
    # Rounded first, so e.g. 0.3 * 10 (3.0000000000000004) starts at 3, not 4.
    return math.ceil(round(self.scalar_stage * epochs, 9))

  def stage(self, epoch: int, epochs: int) -> float:
    """1.0 in stage 2 (the scalars train) during 0-based epoch `epoch`, else 0.0."""
    return 1.0 if epoch >= self.stage2_start(epochs) else 0.0

  def phase_epochs(self, epochs: int) -> tuple[int, ...]:
    """Each completed-epoch count 1..epochs-1 after which the drop rate or stage changes."""
    return tuple(e for e in range(1, epochs)
                 if (self.drop_rate(e, epochs), self.stage(e, epochs))
                 != (self.drop_rate(e - 1, epochs), self.stage(e - 1, epochs)))

  def run_phase(self, epoch: int, epochs: int, params: Any, gradients: Gradients) -> Any:
    """`params` with the state set for 0-based epoch `epoch` (the next to train); the
    values depend on the epoch alone, so redoing a phase gives the same result."""
    del gradients
    shared = dict(params[SHARED_SCOPE])
    for leaf, value in ((DROP_RATE, self.drop_rate(epoch, epochs)),
                        (STAGE, self.stage(epoch, epochs))):
      shared[leaf] = np.asarray(value, np.asarray(shared[leaf]).dtype)
    return {**params, SHARED_SCOPE: shared}

  # --- The model. ---

  def shared(self, info: ModelInfo, *, name: str) -> dict[str, jax.Array]:
    """The state leaves every site reads, at epoch 0's values (drop_start; stage 2 from
    the start only when scalar_stage is 0)."""
    del info
    return _Schedule(float(self.drop_start), 1.0 if self.scalar_stage == 0 else 0.0,
                     name=name)()

  def adapt(self, site: Site, call: SiteCall, shared: Any, info: ModelInfo, *, train: bool,
            name: str) -> jax.Array:
    drop_rate = jax.lax.stop_gradient(shared[DROP_RATE])
    stage = jax.lax.stop_gradient(shared[STAGE])
    delta = _Branches(self, call.y.shape[-1], info.dtype, info.param_dtype, name=name)(
        call.x, drop_rate, stage, train=train)
    return call.y + delta.astype(call.y.dtype)

  def delta(self, params: Mapping[str, Any]) -> jax.Array:
    """The (d_in, d_out) eval-time update s * (1/B) * sum_i A_i^T B_i of a site's
    `params` (flat names 'A', 'B', 'scale')."""
    product = jnp.einsum('ri,ro->io', jnp.asarray(params['A'], jnp.float32),
                         jnp.asarray(params['B'], jnp.float32), precision='highest')
    return product * (jnp.asarray(params['scale'], jnp.float32)[0] / self.branches)

  def merge(self, site: Site, params: Mapping[str, Any], shared: Any, kernel: jax.Array,
            bias: jax.Array) -> tuple[jax.Array, jax.Array]:
    """Adds every branch, unscaled by dropout (the eval-time map)."""
    return kernel + self.delta(params).astype(kernel.dtype), bias
