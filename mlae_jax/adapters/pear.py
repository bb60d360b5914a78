"""Pear ("Prune and Share", Zhong & Zhou, arXiv 2409.19733): AdaptFormer-style adapters,
some pruned partway through the run, the important unpruned ones shared into the pruned
positions, and a "knowledge checkpoint" keeping what the pruned ones had learned.

THIS IS A RECONSTRUCTION. The paper's code (github.com/yibozhong/pear) could not be read;
what is known of Pear is its abstract: "we prune certain adapters and share the more
important unpruned ones with positions where adapters are pruned, allowing continual
adaptation at these positions after pruning. Additionally, a knowledge checkpoint
strategy is introduced, which preserves the information of the pruned adapters". That
importance is a first-order Taylor score and pruning goes by a ratio (e.g. 50 %) is
second-hand. Everything else below marked [guess] is ours, each a config field with a
stated default, so a reader with the paper can set it to the paper's choice.

The adapter (facts from the same author's VTAB code, yibozhong/lily:
visual-adaptation-benchmark/vit/adaptformer.py, itself PETL-ViT's full-precision
AdaptFormer):
  - form: up(dropout(ReLU(down(x)))) with `down` d -> dim and `up` dim -> d, both
    WITHOUT biases (`nn.Linear(..., bias=False)`), dropout 0.1 after the ReLU.
  - placement: `x + drop_path(mlp(norm2(x))) + adapter_mlp(x) * s` (`forward_block`):
    the adapter reads the block's residual stream x (not norm2(x)) and is added outside
    drop path. That is our 'mlp' site (x = the residual stream entering the MLP branch,
    y = the branch after drop path, the result added to x), not 'ffn' (whose x is the
    LN2 output and whose y is before drop path): only 'mlp' gives the reference's
    output with drop path on.
  - init: down torch's nn.Linear default (kaiming_uniform(a=sqrt(5)) = U(+-1/sqrt(d))),
    up zeros: the model starts as the backbone.
  - defaults: dim 32 (`set_adapter(model, dim=32, s=1)`, and `--dim` default 32 in
    vit/main.py), scale s = 1 (`--scale` default 1).
  - recipe: vit/main.py: AdamW lr 1e-3, weight decay 1e-4, 100 epochs (the shared
    PEFT_RECIPE). (That main.py trains only parameters named 'head' or 'lily' and
    passes an unknown `bit` to adaptformer.set_adapter, so its adaptformer path does not
    run as published; the adapter file itself is unambiguous.) It builds timm's ViT
    with drop_path_rate 0.1, a run-config matter here.

Pear on top of it [guess: the mechanism below is our reading of the abstract]:
  - A position is one (site, block) the method adapts (`targets`, `layers`; in the order
    of `Method.sites`). All positions' adapters are stacked under `adapter_shared`:
    `down` (P, d, dim), `up` (P, dim, d). The adapter used at position p is
    sum_j S[p, j] * stacked[j] with S = `state_source` (P, P), a one-hot routing matrix
    (identity until pruning): exact for one-hot rows, and the source adapter receives
    the gradients of every position that shares it, while a pruned position's own
    stacked slot receives none (it is dead storage from then on; AdamW's leftover
    momentum and weight decay may still move it, and it never affects an output).
  - Pruning phase (`phase_epochs`, `run_phase`), once, after completed epoch
    `prune_epoch` [guess; default None = max(1, round(0.5 * epochs)), half-way: the
    scores need trained adapters (at init `up` is zero, so every score is exactly 0;
    hence at least 1), and the shared adapters get the other half of the run to adapt
    to the positions they now serve]. Scores: `taylor.taylor_scores` with one group per
    position, |sum theta * dL/dtheta| over that position's down and up, averaged over
    `score_batches` fixed training batches (eval mode): the first-order estimate of the
    loss change when the adapter is removed (for a bias-free ReLU bottleneck the down
    and up sums are equal, both <delta, dL/ddelta>, so the score is twice that
    estimate: the ranking is the same). The round(prune_ratio * P) lowest-scoring
    positions are pruned (ties: the earlier position first), keeping at least one
    position of each site kind.
  - Sharing [guess, `share`]: 'nearest' routes a pruned position to the nearest
    unpruned position of the same site by depth, the earlier on ties; 'best' to the
    highest-scoring unpruned position of the same site (the earlier on ties).
  - Knowledge checkpoint [guess, `checkpoint`]: 'keep' freezes the pruned adapter's
    weights at pruning time (`state_kept_down`, `state_kept_up`, zero elsewhere) and
    keeps adding their output at that position, beside the shared adapter's (with their
    own dropout draw in training, as a frozen copy of the module would); 'none' drops
    them. `state_pruned` (P,) marks the pruned positions.
  - Rounding: `round` here is half up (0.5 -> 1), not Python's half-to-even.
Not mergeable: the update is a nonlinear (ReLU) function of the tokens.
The state leaves (`state_*`) are read through stop_gradient and left alone by the
optimizer (`training.optimizer.keep_state`).
"""

from __future__ import annotations

import dataclasses
import logging
import math
from typing import Any, ClassVar, Iterable, Mapping

import jax
import jax.numpy as jnp
import numpy as np
from flax import linen as nn

from mlae_jax.adapters.experts import torch_linear_init
from mlae_jax.adapters.method import (PEFT_RECIPE, Gradients, Method, ModelInfo, SiteCall,
                                      round_half_up)
from mlae_jax.adapters.products import up_project
from mlae_jax.adapters.sites import SHARED_SCOPE, Site
from mlae_jax.adapters.taylor import taylor_scores

SHARES = ('nearest', 'best')
CHECKPOINTS = ('keep', 'none')
_ADAPTER_LEAVES = ('down', 'up')

# torch's nn.Linear default init, kaiming_uniform_(a=sqrt(5)) = U(+-1/sqrt(d_in)), of each
# (d, dim) slice of the stacked (P, d, dim) kernels (axis 0 is the stack).
_down_init = torch_linear_init(batch_axis=(0,))


class _Stack(nn.Module):
  """Every position's adapter, stacked, and Pear's state; returned as a dict."""
  positions: int
  hidden: int
  dim: int
  keep: bool
  param_dtype: Any = jnp.float32

  @nn.compact
  def __call__(self) -> dict[str, jax.Array]:
    p, d, r = self.positions, self.hidden, self.dim
    zeros = nn.initializers.zeros
    stack = {
        'down': self.param('down', _down_init, (p, d, r), self.param_dtype),
        'up': self.param('up', zeros, (p, r, d), self.param_dtype),
        'state_source': self.param('state_source', lambda _, s, t: jnp.eye(s[0], dtype=t),
                                   (p, p), self.param_dtype),
        'state_pruned': self.param('state_pruned', zeros, (p,), self.param_dtype),
    }
    if self.keep:
      stack['state_kept_down'] = self.param('state_kept_down', zeros, (p, d, r),
                                            self.param_dtype)
      stack['state_kept_up'] = self.param('state_kept_up', zeros, (p, r, d), self.param_dtype)
    return stack


class _Branch(nn.Module):
  """The adapter term s * (shared(x) + pruned * kept(x)) at one position (no parameters
  of its own: it reads the stack)."""
  position: int
  scale: float
  dropout: float
  keep: bool
  dtype: Any = None

  def _bottleneck(self, x: jax.Array, down: jax.Array, up: jax.Array, train: bool,
                  name: str) -> jax.Array:
    hidden = nn.relu(jnp.einsum('...d,dr->...r', x, down.astype(x.dtype)))
    if train and self.dropout > 0:
      hidden = nn.Dropout(self.dropout, deterministic=False, name=name)(hidden)
    return up_project(hidden, up.astype(x.dtype))

  @nn.compact
  def __call__(self, x: jax.Array, stack: Mapping[str, jax.Array], *, train: bool
               ) -> jax.Array:
    if self.dtype is not None:
      x = x.astype(self.dtype)
    route = jax.lax.stop_gradient(stack['state_source'][self.position])
    down = jnp.einsum('j,jdr->dr', route.astype(stack['down'].dtype), stack['down'])
    up = jnp.einsum('j,jrd->rd', route.astype(stack['up'].dtype), stack['up'])
    delta = self._bottleneck(x, down, up, train, 'dropout')
    if self.keep:
      kept = self._bottleneck(x, jax.lax.stop_gradient(stack['state_kept_down'][self.position]),
                              jax.lax.stop_gradient(stack['state_kept_up'][self.position]),
                              train, 'kept_dropout')
      pruned = jax.lax.stop_gradient(stack['state_pruned'][self.position])
      delta = delta + pruned.astype(kept.dtype) * kept
    return jnp.asarray(self.scale, delta.dtype) * delta


@dataclasses.dataclass(frozen=True)
class Pear(Method):
  """Pear (a reconstruction; see the module docstring). Fields beyond `Method`'s:

    targets: ('mlp',), the block's MLP branch (AdaptFormer's placement).
    dim: the adapter's bottleneck width (the reference's 32).
    scale: the constant s on the adapter's output (the reference's 1).
    dropout: dropout on the hidden activations, in training (the reference's 0.1).
    prune_epoch: the completed-epoch count after which the pruning phase runs; None:
      max(1, round(0.5 * epochs)). No pruning in a run of no more epochs than that.
    prune_ratio: the fraction of positions pruned (rounded half up; at least one
      position of each site kind stays).
    score_batches: training batches the Taylor scores are averaged over.
    share: which unpruned adapter a pruned position uses: 'nearest' (by depth, same
      site, the earlier on ties) or 'best' (highest score, same site).
    checkpoint: 'keep' (the pruned adapter, frozen at pruning, keeps adding its output
      at its position) or 'none' (dropped).
  """
  NAME: ClassVar[str] = 'pear'
  SITES: ClassVar[tuple[str, ...]] = ('mlp',)
  MERGEABLE: ClassVar[bool] = False
  RECIPE: ClassVar[Mapping[str, Any]] = PEFT_RECIPE

  targets: tuple[str, ...] = ('mlp',)
  dim: int = 32
  scale: float = 1.0
  dropout: float = 0.1
  prune_epoch: int | None = None
  prune_ratio: float = 0.5
  score_batches: int = 8
  share: str = 'nearest'
  checkpoint: str = 'keep'

  def validate(self) -> None:
    super().validate()
    self.check_integer('dim', hint='the bottleneck width')
    self.check_finite('scale')
    self.check_fraction('dropout')
    if self.prune_epoch is not None:
      self.check_integer('prune_epoch', hint='a completed-epoch count, or None for half the run')
    self.check_fraction('prune_ratio', hint='0 prunes nothing')
    self.check_integer('score_batches')
    if self.share not in SHARES:
      self.fail(f'share must be one of {SHARES}, got {self.share!r}.')
    if self.checkpoint not in CHECKPOINTS:
      self.fail(f'checkpoint must be one of {CHECKPOINTS}, got {self.checkpoint!r}.')

  @property
  def keep(self) -> bool:
    return self.checkpoint == 'keep'

  def shared(self, info: ModelInfo, *, name: str) -> dict[str, jax.Array]:
    """The stacked adapters of every position and Pear's state (see `_Stack`)."""
    return _Stack(len(self.sites(info.num_layers)), info.hidden_size, self.dim, self.keep,
                  info.param_dtype, name=name)()

  def adapt(self, site: Site, call: SiteCall, shared: Any, info: ModelInfo, *, train: bool,
            name: str) -> jax.Array:
    position = self.sites(info.num_layers).index(site)
    delta = _Branch(position, float(self.scale), float(self.dropout), self.keep, info.dtype,
                    name=name)(call.x, shared, train=train)
    return call.y + delta.astype(call.y.dtype)

  # --- The pruning phase ----------------------------------------------------------

  def prune_after(self, epochs: int) -> int:
    """The completed-epoch count after which pruning runs in a run of `epochs`."""
    if self.prune_epoch is not None:
      return self.prune_epoch
    return max(1, round_half_up(0.5 * epochs))

  def phase_epochs(self, epochs: int) -> tuple[int, ...]:
    epoch = self.prune_after(epochs)
    return (epoch,) if epoch < epochs else ()

  def scores(self, params: Mapping[str, Any], gradients: Iterable[Any]) -> np.ndarray:
    """(P,) Taylor importance of each position's adapter: the mean over `gradients`
    (full gradient trees) of |sum theta * g| over its stacked down and up slices."""

    def group_sums(products):
      return sum(jnp.sum(products[leaf], axis=(1, 2)) for leaf in _ADAPTER_LEAVES)

    stack = {leaf: params[SHARED_SCOPE][leaf] for leaf in _ADAPTER_LEAVES}
    return taylor_scores(stack, [{leaf: g[SHARED_SCOPE][leaf] for leaf in _ADAPTER_LEAVES}
                                 for g in gradients], group_sums)

  def plan(self, sites: tuple[Site, ...], scores: np.ndarray) -> tuple[list[int], list[int]]:
    """(pruned positions, sorted; the source of every position) for these scores."""
    count = len(sites)
    left = {}
    for site in sites:
      left[site.name] = left.get(site.name, 0) + 1
    budget = round_half_up(self.prune_ratio * count)
    pruned = set()
    for position in sorted(range(count), key=lambda p: (float(scores[p]), p)):
      if len(pruned) >= budget:
        break
      if left[sites[position].name] > 1:  # The last of a site kind stays.
        left[sites[position].name] -= 1
        pruned.add(position)
    def depth(q: int) -> int:
      return sites[q].layer if sites[q].layer is not None else q

    sources = list(range(count))
    for position in sorted(pruned):
      candidates = [q for q in range(count)
                    if q not in pruned and sites[q].name == sites[position].name]
      if self.share == 'nearest':
        sources[position] = min(candidates,
                                key=lambda q: (abs(depth(q) - depth(position)), depth(q)))
      else:
        sources[position] = min(candidates, key=lambda q: (-float(scores[q]), q))
    return sorted(pruned), sources

  def run_phase(self, epoch: int, epochs: int, params: Any, gradients: Gradients) -> Any:
    """Scores the positions, prunes the lowest, routes them to their sources and (with
    checkpoint 'keep') freezes their adapters into the knowledge checkpoint."""
    if epoch not in self.phase_epochs(epochs):
      raise ValueError(f'pear has no phase after epoch {epoch} of {epochs} (it prunes after '
                       f'{self.phase_epochs(epochs)}).')
    stack = {k: np.asarray(v) for k, v in params[SHARED_SCOPE].items()}
    if np.any(stack['state_pruned']):
      raise ValueError('pear: these parameters are already pruned (its one phase ran before).')
    num_layers = sum(1 for k in params['Transformer'] if k.startswith('encoderblock_'))
    sites = self.sites(num_layers)
    if len(sites) != stack['down'].shape[0]:
      raise ValueError(f'pear: {stack["down"].shape[0]} stacked adapters for {len(sites)} '
                       'positions; the parameters are not of this configuration.')
    scores = self.scores(params, gradients(params, self.score_batches))
    pruned, sources = self.plan(sites, scores)
    new = dict(stack)
    dtype = stack['state_source'].dtype
    new['state_source'] = np.eye(len(sites), dtype=dtype)[sources]
    new['state_pruned'] = np.zeros(len(sites), dtype)
    new['state_pruned'][pruned] = 1
    if self.keep:
      for leaf in _ADAPTER_LEAVES:
        kept = np.zeros_like(stack[leaf])
        kept[pruned] = stack[leaf][pruned]
        new['state_kept_' + leaf] = kept.astype(stack['state_kept_' + leaf].dtype)
    logging.info('pear after epoch %d: scores %s; pruned %s, sources %s', epoch,
                 np.array2string(scores, precision=4), [str(sites[p]) for p in pruned],
                 {str(sites[p]): str(sites[sources[p]]) for p in pruned})
    return {**params, SHARED_SCOPE: new}

  def adapter_storage(self, params: Mapping[str, Any]) -> dict[str, int]:
    """What the adapters take, for the closing note: `positions` and `pruned` counts;
    `before` (every position's adapter, as trained before pruning), `after` (the
    unpruned adapters, the trained weights a pruned run needs) and `kept` (the frozen
    knowledge-checkpoint copies it also needs with checkpoint 'keep') in parameters.
    `params`: the model's (or just its `adapter_shared`)."""
    stack = params.get(SHARED_SCOPE, params)
    per_adapter = sum(math.prod(np.shape(stack[leaf])[1:]) for leaf in _ADAPTER_LEAVES)
    positions = np.shape(stack['down'])[0]
    pruned = int(np.sum(np.asarray(stack['state_pruned']) > 0))
    return {'positions': positions, 'pruned': pruned, 'per_adapter': per_adapter,
            'before': positions * per_adapter, 'after': (positions - pruned) * per_adapter,
            'kept': pruned * per_adapter if self.keep else 0}
