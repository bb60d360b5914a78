"""What adapter goes where: MLAE (masked rank-1 experts) or LoRA, and its masks.

One mechanism serves both methods. Every adapted linear map x -> x W0 + b0 gains
((x A^T) * c) B with A (r, d_in), B (r, d_out) and a coefficient vector c (r,):
  - MLAE: c is trainable, starts at `coeff_init`, and is masked by expert-level
    dropout (inverted: kept experts scaled by 1/(1-p)) during training;
  - LoRA: c is the constant lora_alpha / r.
Masks resolve to per-layer settings: the number of experts of each layer (fixed
masking removes experts for good, so they are never allocated) and the dropout
probability of each layer (stochastic masking). Mixed masking sets both.
"""

from __future__ import annotations

import dataclasses
import math
from typing import Sequence

from mlae_jax.adapters import patterns

# Adaptable linear maps of a transformer block, and where they live in timm.
ATTENTION_TARGETS = ('qkv', 'query', 'key', 'value', 'out')
MLP_TARGETS = ('fc1', 'fc2')
TARGETS = ATTENTION_TARGETS + MLP_TARGETS
METHODS = ('mlae', 'lora')
MASKS = ('stochastic', 'fixed', 'mixed')


@dataclasses.dataclass(frozen=True)
class LayerExperts:
  """Resolved adapter settings for one transformer block."""
  experts: int
  drop_rate: float
  coeff_init: float
  adaptive_coeff: bool
  per_example_mask: bool
  input_dropout: float


@dataclasses.dataclass(frozen=True)
class AdapterConfig:
  """Adapter method, placement and masking; validated on construction.

  Attributes:
    method: 'mlae' or 'lora'.
    targets: linear maps to adapt in every block: 'qkv' (the fused q-k-v
      projection, one expert spanning q, k and v: the paper's placement),
      'query', 'key', 'value', 'out' (attention output), 'fc1', 'fc2' (MLP).
    rank: experts per layer (LoRA rank); an int, or one int per layer.
    drop_rate: expert-level dropout probability p in [0, 1); a float, or one per
      layer. Only MLAE masks experts.
    mask: 'stochastic' (dropout on the coefficients, p per layer), 'fixed'
      (per-layer expert counts, no dropout) or 'mixed' (both).
    pattern: per-layer pattern of the paper's appendix A.5: 'uniform',
      'incremental', 'decremental', 'hourglass', 'protruding' or 'random'
      ('random' exists for fixed and mixed masks only).
    pattern_seed: seed of the 'random' pattern.
    coeff_init: initial MLAE coefficient (the paper's Table 10 per task).
    adaptive_coeff: train the MLAE coefficients; False keeps them at
      `coeff_init` (the 'decomposition only' ablation).
    per_example_mask: draw a mask per example instead of one per batch.
    input_dropout: ordinary dropout on the adapter's input (the reference
      code's `lora_dropout`).
    lora_alpha: LoRA scale numerator (scale = lora_alpha / rank); None = rank.
    train_bias: also train the biases of the adapted layers (for 'qkv', the
      query, key and value biases). The authors' PyTorch layer freezes only the
      kernel it wraps, so its bias may have trained in their (unpublished) runs.
  """
  method: str = 'mlae'
  targets: tuple[str, ...] = ('qkv',)
  rank: int | tuple[int, ...] = 8
  drop_rate: float | tuple[float, ...] = 0.0
  mask: str = 'stochastic'
  pattern: str = 'uniform'
  pattern_seed: int = 0
  coeff_init: float = 1.0
  adaptive_coeff: bool = True
  per_example_mask: bool = False
  input_dropout: float = 0.0
  lora_alpha: float | None = None
  train_bias: bool = False

  def __post_init__(self):
    # Lists from configs become tuples so the config stays hashable.
    for name in ('targets', 'rank', 'drop_rate'):
      value = getattr(self, name)
      if isinstance(value, (list, tuple)):
        object.__setattr__(self, name, tuple(value))
    if isinstance(self.targets, str):
      object.__setattr__(self, 'targets', (self.targets,))
    self._validate()

  def _validate(self):
    def fail(message):
      raise ValueError(f'Bad adapter config: {message}')

    if self.method not in METHODS:
      fail(f'method {self.method!r} is not one of {METHODS}.')
    if not self.targets:
      fail(f'targets is empty; choose from {TARGETS}.')
    unknown = [t for t in self.targets if t not in TARGETS]
    if unknown:
      fail(f'unknown targets {unknown}; valid targets are {TARGETS}.')
    if len(set(self.targets)) != len(self.targets):
      fail(f'targets {self.targets} name a layer twice.')
    if 'qkv' in self.targets and set(self.targets) & {'query', 'key', 'value'}:
      fail("'qkv' already covers query, key and value; do not combine them.")
    for name in ('adaptive_coeff', 'per_example_mask', 'train_bias'):
      if not isinstance(getattr(self, name), bool):
        fail(f'{name} must be True or False, got {getattr(self, name)!r}.')
    if not isinstance(self.pattern_seed, int) or isinstance(self.pattern_seed, bool):
      fail(f'pattern_seed must be an integer, got {self.pattern_seed!r}.')
    for name in ('coeff_init', 'input_dropout'):
      value = getattr(self, name)
      if not is_number(value) or not math.isfinite(value):
        fail(f'{name} must be a finite number, got {value!r}.')
    if self.lora_alpha is not None and not (
        is_number(self.lora_alpha) and math.isfinite(self.lora_alpha) and self.lora_alpha > 0):
      fail(f'lora_alpha must be a finite number > 0 (or None for the rank), got '
           f'{self.lora_alpha!r}.')
    for rank in _as_tuple(self.rank):
      if not isinstance(rank, int) or isinstance(rank, bool) or rank < 1:
        fail(f'rank must be an integer >= 1 (or one per layer), got {self.rank!r}.')
    for p in _as_tuple(self.drop_rate):
      if not is_number(p) or not 0.0 <= p < 1.0:
        fail(f'drop_rate must lie in [0, 1) (or one per layer), got {self.drop_rate!r}.')
    if not 0.0 <= self.input_dropout < 1.0:
      fail(f'input_dropout must lie in [0, 1), got {self.input_dropout!r}.')
    if self.mask not in MASKS:
      fail(f'mask {self.mask!r} is not one of {MASKS}.')
    if self.pattern not in patterns.PATTERN_NAMES:
      fail(f'pattern {self.pattern!r} is not one of {patterns.PATTERN_NAMES}.')
    if self.mask == 'stochastic' and self.pattern == 'random':
      fail("the 'random' pattern draws expert counts: use mask='fixed' or 'mixed'.")
    if self.mask == 'fixed' and any(p > 0 for p in _as_tuple(self.drop_rate)):
      fail("mask='fixed' removes experts without dropout; set drop_rate=0 or use mask='mixed'.")
    if self.mask == 'mixed' and isinstance(self.drop_rate, tuple):
      fail("mask='mixed' uses one drop_rate for all layers; give a single float.")
    if self.pattern != 'uniform':
      if self.mask == 'stochastic' and isinstance(self.drop_rate, tuple):
        fail(f'pattern {self.pattern!r} sets drop_rate per layer; give a single float or use pattern=uniform.')
      if self.mask in ('fixed', 'mixed') and isinstance(self.rank, tuple):
        fail(f'pattern {self.pattern!r} sets the experts per layer; give rank as an int or use pattern=uniform.')
      if (self.mask in ('fixed', 'mixed') and self.pattern != 'random'
          and self.rank != patterns.PAPER_RANK):
        fail(f'the paper\'s {self.pattern!r} expert counts assume rank {patterns.PAPER_RANK}; '
             'for another budget give rank as one int per layer with pattern=uniform.')
    if self.method == 'lora':
      if self.coeff_init != 1.0 or not self.adaptive_coeff:
        fail('coeff_init and adaptive_coeff belong to MLAE; LoRA scales by lora_alpha / rank.')
      if any(p > 0 for p in _as_tuple(self.drop_rate)) or self.mask != 'stochastic':
        fail('LoRA has no expert masks; use method=mlae for drop_rate or fixed/mixed masks.')
    elif self.lora_alpha is not None:
      fail('lora_alpha belongs to LoRA; MLAE learns its coefficients (see coeff_init).')

  def layer_experts(self, num_layers: int) -> tuple[LayerExperts, ...]:
    """The settings of each of `num_layers` blocks."""
    ranks = self._per_layer_ranks(num_layers)
    rates = self._per_layer_drop_rates(num_layers)
    layers = []
    for rank, rate in zip(ranks, rates):
      if self.method == 'lora':
        alpha = rank if self.lora_alpha is None else self.lora_alpha
        coeff, adaptive = alpha / rank, False
      else:
        coeff, adaptive = self.coeff_init, self.adaptive_coeff
      layers.append(LayerExperts(rank, float(rate), float(coeff), adaptive,
                                 self.per_example_mask, float(self.input_dropout)))
    return tuple(layers)

  def _per_layer_ranks(self, num_layers: int) -> tuple[int, ...]:
    if self.mask in ('fixed', 'mixed') and self.pattern == 'random':
      return patterns.random_expert_counts(num_layers, self.rank, self.pattern_seed)
    if self.mask in ('fixed', 'mixed') and self.pattern != 'uniform':
      return patterns.stretch(patterns.FIXED_PATTERNS[self.pattern], num_layers)
    return _per_layer('rank', self.rank, num_layers)

  def _per_layer_drop_rates(self, num_layers: int) -> tuple[float, ...]:
    if self.mask == 'stochastic' and self.pattern != 'uniform':
      return patterns.stretch(patterns.STOCHASTIC_PATTERNS[self.pattern], num_layers)
    return _per_layer('drop_rate', self.drop_rate, num_layers)


def is_number(value) -> bool:
  """An int or float, not a bool (which Python counts as an int)."""
  return isinstance(value, (int, float)) and not isinstance(value, bool)


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


def lora(rank: int = 8, targets: Sequence[str] = ('qkv',), alpha: float | None = None,
         input_dropout: float = 0.0) -> AdapterConfig:
  """The LoRA baseline in the same placement machinery."""
  return AdapterConfig(method='lora', targets=tuple(targets), rank=rank, lora_alpha=alpha,
                       input_dropout=input_dropout)
