"""HEAT (Head-level Efficient Adaptation with Taylor-expansion importance score; arXiv
2404.08894, renamed Heart-LoRA in its v2): LoRA whose update is switched off on the
attention heads a first-order Taylor score finds least relevant to the task.

THIS IS A RECONSTRUCTION. No code of the paper is public (none on the arXiv page or on
paperswithcode; ../shared/reference/peers.md), and what is known comes from the abstract
(../shared/seeds/003_*) and the v2 appendix (arxiv.org/html/2404.08894v2):
  - a first-order Taylor-expansion importance score (TIS) per attention head, computed
    by three strategies "from different perspectives, reflecting varying contributions
    of parameters" [abstract];
  - adaptation at head level: the `ne` lowest-scoring heads are deactivated, LoRA
    adapting the others; Heart-LoRA "uses layer-by-layer accumulation to calculate
    responsiveness", so that "the responsiveness of each head is considered globally"
    (we read: one ranking over every layer), and a variant (Heart-LoRA dagger) scores
    and deactivates within each layer [v2 appendix A];
  - on Swin, a percentage of the heads of each layer is deactivated [v2 appendix B];
  - ViT-B/16, VTAB-1k group means: LoRA 76.4, the per-layer variant 76.8 [v2 table 1].
Everything else is our guess, each a field below with its default and reason:
  - what is switched off: head h's slices of the LoRA update's output columns (for
    'qkv' the h-th head_dim slice of each of q, k and v; for 'query', 'key', 'value'
    that map's h-th slice), by a mask `state_head_mask` (num_heads,) per adapter, a
    method state leaf (ones until the scoring phase; never trained). The attention head
    itself (its frozen weights) still computes; its columns of B then get zero
    gradient (only weight decay moves them) and no longer reach any output. The
    parameters are kept, not removed, so the count is LoRA's (the v2 text says
    Heart-LoRA "generally requires fewer parameters": it may drop them);
  - the three strategies (`strategy`), Taylor scores |sum theta * dL/dtheta| over a
    head's slice of the FROZEN backbone weights, averaged over `score_batches` batches
    (`mlae_jax.adapters.taylor`, Molchanov et al. 2019):
      'qkv': the head's slices of the query, key and value kernels and biases;
      'out': the head's rows of the out-projection kernel. With o_t = sum_h a_th W_h + b
        (a_th the head's attention output at token t, W_h its head_dim rows), the sum of
        W_h * dL/dW_h equals sum_t a_th . dL/da_th, the derivative of the loss with
        respect to a gate on the head's output at gate 1: the head importance of Michel
        et al. 2019 ("Are Sixteen Heads Really Better than One?"), except that theirs
        takes |.| per example and ours per batch of the batch-mean loss;
      'both': the sum of the two scores;
    default 'out' (the established head score);
  - when it is scored (`score_epoch`): after that many completed epochs; default 10% of
    the run (the shared recipe's warm-up, 10 of 100 epochs). Not at step 0: the
    classifier head starts at zero, so the loss's gradient with respect to the features,
    and with it every backbone gradient and every score, is exactly zero;
  - how many heads (`heads_off`): a fraction of the adapted heads, 0.25 (the paper's
    `ne` is ablated per task but its value is not known to us);
  - the ranking (`ranking`): 'global' over every adapted block (the paper's default),
    'layer' within each block (Heart-LoRA dagger); `normalize` divides each block's
    scores by their L2 norm before a global ranking (Michel et al. sec. 4.2), off by
    default (nothing says HEAT does).
The mask folds into the base weights, so HEAT merges as LoRA does.
"""

from __future__ import annotations

import dataclasses
import re
from typing import Any, ClassVar, Iterable, Mapping

import jax
import jax.numpy as jnp
import numpy as np
from flax import linen as nn

from mlae_jax.adapters.experts import LowRankExperts
from mlae_jax.adapters.low_rank import Lora
from mlae_jax.adapters.method import (Gradients, ModelInfo, SiteCall, is_integer,
                                      round_half_up)
from mlae_jax.adapters.sites import Site, adapter_scope, base_biases, base_kernels
from mlae_jax.adapters.taylor import taylor_scores
from mlae_jax.checkpoints.layout import flatten, unflatten

MASK = 'state_head_mask'  # The per-adapter head mask (a method state leaf).
STRATEGIES = ('qkv', 'out', 'both')
RANKINGS = ('global', 'layer')
HEAD_SITES = ('qkv', 'query', 'key', 'value')  # Maps whose outputs split into heads.
# Fraction of the run's epochs before the scoring phase: the shared recipe's warm-up.
WARMUP_FRACTION = 0.1
_BLOCK = re.compile(r'^Transformer/encoderblock_(\d+)/')


def parts_of(site: Site) -> int:
  """How many maps of (heads, head_dim) columns lie side by side in the site's output."""
  return 3 if site.name == 'qkv' else 1


def column_mask(mask: jax.Array, features: int, parts: int) -> jax.Array:
  """The (features,) mask of output columns: each of `parts` maps holds the heads'
  head_dim columns in head order, each head's column taking its entry of `mask`."""
  heads = mask.shape[-1]
  if features % (parts * heads):
    raise ValueError(f'{features} output columns do not split into {parts} x {heads} heads.')
  return jnp.tile(jnp.repeat(mask, features // (parts * heads)), parts)


class HeadMaskedExperts(LowRankExperts):
  """LoRA's update ((x A^T) c) B with each head's output columns multiplied by its
  entry of the state leaf `state_head_mask` (num_heads,), ones at initialisation and
  read through stop_gradient. Created after A and B, so their initial values are
  LoRA's under the same PRNG key."""
  heads: int = 1
  parts: int = 1

  @nn.compact
  def __call__(self, x: jax.Array, *, train: bool) -> jax.Array:
    delta = super().__call__(x, train=train)
    mask = self.param(MASK, nn.initializers.ones, (self.heads,), self.param_dtype)
    columns = column_mask(jax.lax.stop_gradient(mask), delta.shape[-1], self.parts)
    return delta * columns.astype(delta.dtype)


@dataclasses.dataclass(frozen=True)
class Heat(Lora):
  """HEAT (a reconstruction; see the module docstring). LoRA's fields (targets 'qkv' or
  some of 'query', 'key', 'value'; rank, alpha, input_dropout, train_bias) and:

    strategy: the Taylor score of a head: 'qkv' (its query/key/value weights), 'out'
      (its rows of the out projection: Michel et al.'s gate score) or 'both' (the sum).
    score_epoch: the completed-epoch count after which the heads are scored and
      switched off; None for max(1, round(0.1 * epochs)) (after the warm-up). A value
      >= the run's epochs means no phase: the run is LoRA's.
    score_batches: training batches the scores average over.
    heads_off: the fraction of the adapted heads switched off (rounded half up: of the
      whole model with 'global' ranking, of each block with 'layer').
    ranking: 'global' (one ranking over the heads of every adapted block) or 'layer'
      (each block switches off its own lowest-scoring heads).
    normalize: divide each block's scores by their L2 norm before ranking.
  """
  NAME: ClassVar[str] = 'heat'
  SITES: ClassVar[tuple[str, ...]] = HEAD_SITES
  MERGEABLE: ClassVar[bool] = True
  RECIPE: ClassVar[Mapping[str, Any]] = Lora.RECIPE  # LoRA's: the shared VTAB recipe.

  strategy: str = 'out'
  score_epoch: int | None = None
  score_batches: int = 8
  heads_off: float = 0.25
  ranking: str = 'global'
  normalize: bool = False

  def validate(self) -> None:
    super().validate()
    if self.strategy not in STRATEGIES:
      self.fail(f'strategy {self.strategy!r} is not one of {STRATEGIES}.')
    if self.ranking not in RANKINGS:
      self.fail(f'ranking {self.ranking!r} is not one of {RANKINGS}.')
    if self.score_epoch is not None and not (is_integer(self.score_epoch)
                                             and self.score_epoch >= 1):
      self.fail(f'score_epoch must be an integer >= 1 (completed epochs before scoring) or '
                f'None (10% of the epochs), got {self.score_epoch!r}.')
    self.check_integer('score_batches')
    self.check_fraction('heads_off', hint='0 switches no head off: plain LoRA')
    self.check_flag('normalize')

  # --- The model side. ---

  def adapt(self, site: Site, call: SiteCall, shared: Any, info: ModelInfo, *, train: bool,
            name: str) -> jax.Array:
    settings = self.layer_experts(info.num_layers)[site.layer]
    delta = HeadMaskedExperts(settings, call.y.shape[-1], info.dtype, info.param_dtype,
                              heads=info.num_heads, parts=parts_of(site),
                              name=name)(call.x, train=train)
    return call.y + delta

  def masked_delta(self, site: Site, params: Mapping[str, Any]) -> jax.Array:
    """The (d_in, d_out) eval-time update of an adapter's `params`, heads masked."""
    delta = self.delta(params)
    return delta * column_mask(jnp.asarray(params[MASK], delta.dtype), delta.shape[-1],
                               parts_of(site))

  def merge(self, site: Site, params: Mapping[str, Any], shared: Any, kernel: jax.Array,
            bias: jax.Array) -> tuple[jax.Array, jax.Array]:
    return kernel + self.masked_delta(site, params).astype(kernel.dtype), bias

  # --- The scoring phase. ---

  def resolved_score_epoch(self, epochs: int) -> int:
    """The completed-epoch count after which a run of `epochs` scores its heads."""
    if self.score_epoch is not None:
      return self.score_epoch
    return max(1, round_half_up(WARMUP_FRACTION * epochs))

  def phase_epochs(self, epochs: int) -> tuple[int, ...]:
    epoch = self.resolved_score_epoch(epochs)
    return (epoch,) if epoch < epochs else ()

  def head_scores(self, params: Any, gradients: Iterable[Any], num_layers: int) -> np.ndarray:
    """(adapted blocks, heads) Taylor scores of `strategy` from the per-batch
    `gradients` (trees like `params`), blocks in `blocks(num_layers)` order, each
    block's scores divided by their L2 norm with `normalize`."""
    blocks = self.blocks(num_layers)

    def group_sums(products: Mapping[str, jax.Array]) -> jax.Array:
      rows = []
      for layer in blocks:
        qkv = sum(products[kernel].sum(axis=(0, 2)) + products[bias].sum(axis=-1)
                  for name in ('query', 'key', 'value')
                  for kernel, bias in zip(base_kernels(Site(name, layer)),
                                          base_biases(Site(name, layer))))
        out = products[base_kernels(Site('out', layer))[0]].sum(axis=(1, 2))
        rows.append(jnp.stack([qkv, out]))
      return jnp.stack(rows)  # (blocks, 2, heads): signed sums, made |.| by taylor_scores.

    both = taylor_scores(params, gradients, group_sums)
    scores = {'qkv': both[:, 0], 'out': both[:, 1], 'both': both.sum(axis=1)}[self.strategy]
    if self.normalize:
      norms = np.linalg.norm(scores, axis=1, keepdims=True)
      scores = scores / np.where(norms > 0, norms, 1.0)
    return scores

  def switched_off(self, scores: np.ndarray) -> np.ndarray:
    """Bool (blocks, heads): the heads whose update is switched off, the lowest scores
    of `ranking` (ties: the earlier block and head first)."""
    scores = np.asarray(scores, np.float64)
    off = np.zeros(scores.shape, bool)
    if self.ranking == 'global':
      count = round_half_up(self.heads_off * scores.size)
      off.reshape(-1)[np.argsort(scores.reshape(-1), kind='stable')[:count]] = True
    else:
      count = round_half_up(self.heads_off * scores.shape[1])
      for row, block_scores in enumerate(scores):
        off[row, np.argsort(block_scores, kind='stable')[:count]] = True
    return off

  def with_masks(self, params: Any, keep: np.ndarray, num_layers: int) -> dict:
    """`params` (a plain nested dict) with every adapter's head mask set from `keep`
    (adapted blocks, heads): 1 where a head keeps its update, 0 where it is off."""
    flat = flatten(params)
    blocks = self.blocks(num_layers)
    for site in self.sites(num_layers):
      path = f'{adapter_scope(site)}/{MASK}'
      if path not in flat:
        raise ValueError(f'{self.NAME}: the params have no head mask at {path}; are they a '
                         'HEAT model\'s?')
      flat[path] = np.asarray(keep[blocks.index(site.layer)], dtype=flat[path].dtype)
    return unflatten(flat)

  def run_phase(self, epoch: int, epochs: int, params: Any, gradients: Gradients) -> Any:
    """Scores the heads on `score_batches` training batches and switches the update of
    the lowest-scoring ones off."""
    if epoch != self.resolved_score_epoch(epochs):
      raise NotImplementedError(f'{self.NAME} has no phase after epoch {epoch}.')
    num_layers = 1 + max(int(m.group(1)) for m in map(_BLOCK.match, flatten(params)) if m)
    scores = self.head_scores(params, gradients(params, self.score_batches), num_layers)
    return self.with_masks(params, ~self.switched_off(scores), num_layers)
