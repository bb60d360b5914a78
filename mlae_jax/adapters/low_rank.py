"""MLAE (masked rank-1 experts) and LoRA: the low-rank methods on dense maps.

One mechanism serves both. Every adapted map x -> x W0 + b0 gains ((x A^T) * c) B
with A (r, d_in), B (r, d_out) and a coefficient vector c (r,):
  - MLAE: c is trainable, starts at `coeff_init`, and is masked by expert-level
    dropout (inverted: kept experts scaled by 1/(1-p)) during training;
  - LoRA: c is the constant alpha / r.
MLAE's masks resolve to per-layer settings: the number of experts of each layer (fixed
masking removes experts for good, so they are never allocated) and the dropout
probability of each layer (stochastic masking). Mixed masking sets both. With
`expert_rank` k > 1 (the paper's Table 12), the r rank-1 columns form r / k experts of
rank k, each with one coefficient and one mask bit.
"""

from __future__ import annotations

import dataclasses
import math
import re
from typing import Any, ClassVar, Mapping

import jax
import jax.numpy as jnp

from mlae_jax.adapters import patterns
from mlae_jax.adapters.experts import LayerExperts, LowRankExperts
from mlae_jax.adapters.method import Method, ModelInfo, SiteCall, is_number
from mlae_jax.adapters.sites import DENSE_SITES, Site, base_biases

MASKS = ('stochastic', 'fixed', 'mixed')


def _as_tuple(value) -> tuple:
  return value if isinstance(value, tuple) else (value,)


def _per_layer(name: str, value, num_layers: int) -> tuple:
  if not isinstance(value, tuple):
    return (value,) * num_layers
  if len(value) != num_layers:
    raise ValueError(
        f'Bad adapter config: {name} lists {len(value)} values but the model has '
        f'{num_layers} layers.')
  return value


@dataclasses.dataclass(frozen=True)
class LowRank(Method):
  """Fields of both low-rank methods (and those of `Method`):

    targets: dense maps to adapt: 'qkv' (the fused q-k-v projection, one update
      spanning q, k and v: the MLAE paper's placement), 'query', 'key', 'value',
      'out', 'fc1', 'fc2'.
    rank: experts per layer (LoRA rank); an int, or one int per layer.
    input_dropout: ordinary dropout on the adapter's input (`lora_dropout`).
    train_bias: also train the biases of the adapted layers (for 'qkv', the query,
      key and value biases). The authors' PyTorch layer freezes only the kernel it
      wraps, so its bias may have trained in their (unpublished) runs.
  """
  SITES: ClassVar[tuple[str, ...]] = DENSE_SITES
  MERGEABLE: ClassVar[bool] = True

  targets: tuple[str, ...] = ('qkv',)
  rank: int | tuple[int, ...] = 8
  input_dropout: float = 0.0
  train_bias: bool = False

  def validate(self) -> None:
    super().validate()
    self.check_flag('train_bias')
    self.check_integer('rank', per_layer=True)
    self.check_fraction('input_dropout')

  def layer_experts(self, num_layers: int) -> tuple[LayerExperts, ...]:
    """The settings of each of `num_layers` blocks."""
    raise NotImplementedError

  def trained_patterns(self, num_layers: int) -> tuple[str, ...]:
    """With `train_bias`, the biases of every adapted layer (escaped exact paths)."""
    biases = () if not self.train_bias else tuple(
        re.escape(path) for site in self.sites(num_layers) for path in base_biases(site))
    return self.train + biases

  def adapt(self, site: Site, call: SiteCall, shared: Any, info: ModelInfo, *, train: bool,
            name: str) -> jax.Array:
    settings = self.layer_experts(info.num_layers)[site.layer]
    delta = LowRankExperts(settings, call.y.shape[-1], info.dtype, info.param_dtype,
                           name=name)(call.x, train=train)
    return call.y + delta

  def merge(self, site: Site, params: Mapping[str, Any], shared: Any, kernel: jax.Array,
            bias: jax.Array) -> tuple[jax.Array, jax.Array]:
    """Adds dW = sum_i c_i a_i b_i^T: every expert, unscaled (the eval-time update)."""
    return kernel + self.delta(params).astype(kernel.dtype), bias

  def coefficients(self, params: Mapping[str, Any]) -> jax.Array:
    """The eval-time coefficient of each rank-1 column of an adapter's `params` (flat
    names 'A', 'B' and, when trained, 'coeff')."""
    rank = params['A'].shape[0]
    coeff = params.get('coeff')
    if coeff is None:
      coeff = jnp.full((rank // self.group_size(),), self.constant_coefficient(rank),
                       jnp.float32)
    return jnp.repeat(jnp.asarray(coeff), self.group_size())

  def delta(self, params: Mapping[str, Any]) -> jax.Array:
    """The (d_in, d_out) eval-time update of an adapter's `params`."""
    return jnp.einsum('ri,r,ro->io', params['A'], self.coefficients(params), params['B'],
                      precision='highest')

  def group_size(self) -> int:
    """Rank-1 columns per expert (one coefficient and mask bit each)."""
    return 1

  def constant_coefficient(self, rank: int) -> float:
    """The coefficient when it is not trained."""
    raise NotImplementedError

  def per_layer_ranks(self, num_layers: int) -> tuple[int, ...]:
    return _per_layer('rank', self.rank, num_layers)


@dataclasses.dataclass(frozen=True)
class Mlae(LowRank):
  """MLAE. Fields beyond `LowRank`'s:

    drop_rate: expert-level dropout probability p in [0, 1); a float, or one per layer.
    mask: 'stochastic' (dropout on the coefficients, p per layer), 'fixed' (per-layer
      expert counts, no dropout) or 'mixed' (both).
    pattern: per-layer pattern of the paper's appendix A.5: 'uniform', 'incremental',
      'decremental', 'hourglass', 'protruding' or 'random' (fixed and mixed only).
    pattern_seed: seed of the 'random' pattern.
    coeff_init: initial coefficient (the paper's Table 10 per task).
    adaptive_coeff: train the coefficients; False keeps them at `coeff_init` (the
      'decomposition only' ablation).
    per_example_mask: draw a mask per example instead of one per batch.
    expert_rank: rank of each expert (Table 12): the `rank` rank-1 columns form
      rank / expert_rank experts, each with one coefficient and one mask bit.
  """
  NAME: ClassVar[str] = 'mlae'
  RECIPE: ClassVar[Mapping[str, Any]] = {
      'learning_rate': 5e-4, 'weight_decay': 1e-4,
      'epochs': {'tfds': 500, 'fgvc': 300, 'default': 500}}

  drop_rate: float | tuple[float, ...] = 0.0
  mask: str = 'stochastic'
  pattern: str = 'uniform'
  pattern_seed: int = 0
  coeff_init: float = 1.0
  adaptive_coeff: bool = True
  per_example_mask: bool = False
  expert_rank: int = 1

  def validate(self) -> None:
    super().validate()
    self.check_flag('adaptive_coeff', 'per_example_mask')
    self.check_integer('pattern_seed', low=0)
    self.check_integer('expert_rank')
    self.check_finite('coeff_init')
    self.check_fraction('drop_rate', per_layer=True)
    if self.mask not in MASKS:
      self.fail(f'mask {self.mask!r} is not one of {MASKS}.')
    if self.pattern not in patterns.PATTERN_NAMES:
      self.fail(f'pattern {self.pattern!r} is not one of {patterns.PATTERN_NAMES}.')
    if self.mask == 'stochastic' and self.pattern == 'random':
      self.fail("the 'random' pattern draws expert counts: use mask='fixed' or 'mixed'.")
    if self.mask == 'fixed' and any(p > 0 for p in _as_tuple(self.drop_rate)):
      self.fail("mask='fixed' removes experts without dropout; set drop_rate=0 or use "
                "mask='mixed'.")
    if self.mask == 'mixed' and isinstance(self.drop_rate, tuple):
      self.fail("mask='mixed' uses one drop_rate for all layers; give a single float.")
    if self.pattern != 'uniform':
      if self.mask == 'stochastic' and isinstance(self.drop_rate, tuple):
        self.fail(f'pattern {self.pattern!r} sets drop_rate per layer; give a single float or '
                  'use pattern=uniform.')
      if self.mask in ('fixed', 'mixed') and isinstance(self.rank, tuple):
        self.fail(f'pattern {self.pattern!r} sets the experts per layer; give rank as an int or '
                  'use pattern=uniform.')
      if (self.mask in ('fixed', 'mixed') and self.pattern != 'random'
          and self.rank != patterns.PAPER_RANK):
        self.fail(f'the paper\'s {self.pattern!r} expert counts assume rank '
                  f'{patterns.PAPER_RANK}; for another budget give rank as one int per layer '
                  'with pattern=uniform.')
    if self.expert_rank > 1:
      if self.mask != 'stochastic' or self.pattern != 'uniform':
        self.fail('expert_rank > 1 (Table 12) groups a uniform rank into experts; use '
                  "mask='stochastic' and pattern='uniform'.")
      if any(r % self.expert_rank for r in _as_tuple(self.rank)):
        self.fail(f'expert_rank {self.expert_rank} must divide rank {self.rank!r}.')

  def group_size(self) -> int:
    return self.expert_rank

  def constant_coefficient(self, rank: int) -> float:
    return float(self.coeff_init)

  def layer_experts(self, num_layers: int) -> tuple[LayerExperts, ...]:
    """The settings of each of `num_layers` blocks."""
    return tuple(
        LayerExperts(rank, float(rate), float(self.coeff_init), self.adaptive_coeff,
                     self.per_example_mask, float(self.input_dropout), self.expert_rank)
        for rank, rate in zip(self.per_layer_ranks(num_layers),
                              self._per_layer_drop_rates(num_layers)))

  def per_layer_ranks(self, num_layers: int) -> tuple[int, ...]:
    if self.mask in ('fixed', 'mixed') and self.pattern == 'random':
      return patterns.random_expert_counts(num_layers, self.rank, self.pattern_seed)
    if self.mask in ('fixed', 'mixed') and self.pattern != 'uniform':
      return patterns.stretch(patterns.FIXED_PATTERNS[self.pattern], num_layers)
    return super().per_layer_ranks(num_layers)

  def _per_layer_drop_rates(self, num_layers: int) -> tuple[float, ...]:
    if self.mask == 'stochastic' and self.pattern != 'uniform':
      return patterns.stretch(patterns.STOCHASTIC_PATTERNS[self.pattern], num_layers)
    return _per_layer('drop_rate', self.drop_rate, num_layers)


@dataclasses.dataclass(frozen=True)
class Lora(LowRank):
  """LoRA: a fixed scale alpha / r on each update. `alpha` None means the rank (scale
  1). On 'qkv' it is the fused convention (NOAH, MLAE); on ('query', 'value') the
  PETL-ViT one; both hold 294,912 parameters at rank 8 on ViT-B/16."""
  NAME: ClassVar[str] = 'lora'
  RECIPE: ClassVar[Mapping[str, Any]] = {'learning_rate': 1e-3, 'weight_decay': 1e-4,
                                         'epochs': 100}

  alpha: float | None = None

  def validate(self) -> None:
    super().validate()
    if self.alpha is not None and not (
        is_number(self.alpha) and math.isfinite(self.alpha) and self.alpha > 0):
      self.fail(f'alpha must be a finite number > 0 (or None for the rank), got '
                f'{self.alpha!r}.')

  def constant_coefficient(self, rank: int) -> float:
    return (rank if self.alpha is None else self.alpha) / rank

  def layer_experts(self, num_layers: int) -> tuple[LayerExperts, ...]:
    return tuple(LayerExperts(rank, 0.0, self.constant_coefficient(rank), False, False,
                              float(self.input_dropout))
                 for rank in self.per_layer_ranks(num_layers))

