"""Lily (Zhong et al., ACL Findings 2025, arXiv 2407.09946): low-rank interconnected
adaptation across layers.

Each adapted map gains s * h @ (sum_e w_e HP_e) with h = phi(x LP):
  - LP (d, dim), a low-dimension projector shared by `lp_stride` consecutive blocks
    (locally shared);
  - HP_e (dim, d), e = 1..`experts`, high-dimension projector experts shared by every
    block (globally shared), one set per kind of adapted map;
  - w (experts,) the routing weights: softmax of a per-map router (dim -> experts, no
    bias) on h, averaged over tokens and (by default) over the examples of the batch.
    The 'monoscale' variant has no router: w_e = 1 / experts.
Sites: 'key' and 'value' (phi = identity, x = the attention's input, the LN1 output;
the update is added to k and v after the fused qkv) and 'ffn' (a parallel adapter on
the MLP of width 2 dim, phi = ReLU, x = the MLP's input, the LN2 output; the update is
added to the MLP's output inside the residual branch, before stochastic depth).
The update depends on the input (ReLU, the data-dependent router), so Lily is not
mergeable, and the router averages over tokens (MIXES_TOKENS: the last block computes
every token, as the reference does).

Where each fact comes from (yibozhong/lily, visual-adaptation-benchmark/vit/lily.py):
  - `lily_adapter.forward`: hidden = non_linear(lp(x)); router_logits = router(hidden);
    softmax over experts; `expert_probabilities = router_probability.mean(dim=(0, 1))`
    (over batch AND tokens); `combined_hp = einsum('e,eio->io', probs, hps)`;
    `hidden @ combined_hp`. router = nn.Linear(hidden_dim, ne, bias=False);
    non_linear = nn.ReLU() for the MLP adapter (mlp=True), else nn.Identity().
  - `lily_adapter_monoscale`: no router; `torch.sum(hps, 0) * (1 / ne)`.
  - `forward_attn_lily_kv`: delta_k = lily_k(x) * s and delta_v = lily_v(x) * s, x the
    attention's input, added to k and v (split by heads as qkv is); q untouched.
  - `forward_mlp_lily`: `fc2(...)` then `x = self.drop(x) + delta_mlp * self.s` with
    delta_mlp = lily_mlp(x) of the MLP's input: inside the MLP, so before drop path.
  - `set_lily_kv(model, dim=32, s=1, ne=4)`: lily_k_hps, lily_v_hps zeros (ne, dim,
    768), lily_mlp_hps zeros (ne, 2 dim, 768), each one nn.Parameter for the whole
    model; `stride = 12 // ne`; at each block idx with idx % stride == 0 new LPs
    nn.Linear(768, dim, bias=False) for k and v and nn.Linear(768, 2 dim, bias=False)
    for the MLP (PyTorch's default init, U(+-1/sqrt(768))), reused by the following
    blocks until the next; a router per adapter (U(+-1/sqrt(width)), PyTorch default).
  - `main.py`: defaults dim 32, ne 4, scale 1; `--monoscale` picks the variant. Its
    count (`param`: every parameter named with 'lily', shared tensors once, as
    `named_parameters` deduplicates): at ViT-B/16 with the defaults HPs 4*32*768*2 +
    4*64*768 = 393,216, LPs 4 groups * (768*32*2 + 768*64) = 393,216, routers
    12 * (32*4*2 + 64*4) = 6,144: 792,576 (monoscale: 786,432).
  - Recipe (`main.py`): AdamW lr 1e-3, weight decay 1e-4, 100 epochs (RECIPE). Other
    differences, not implemented here (set them in the run config where wanted): one
    AdamW group, so weight decay on every trained parameter, head included (config
    weight_decay_rule='all'); timm CosineLRScheduler(t_initial=100, warmup_t=10,
    lr_min=1e-5, warmup_lr_init=1e-6), stepped per epoch; drop_path_rate 0.1; no input
    normalisation (`get_data(normalize=False)`: pixels in [0, 1]); train batch 64 with
    drop_last; test batch 256; evaluation every 10 epochs (after epochs 10, 20, .., 100),
    the best accuracy reported.

Parameter layout: `adapter_shared/lp_<site>` (groups, d, width) stacks the LPs of the
groups of blocks (group g = block // lp_stride, over the groups that hold an adapted
block, in order), `adapter_shared/hp_<site>` (experts, width, d) the HP experts, for each
targeted site of 'key', 'value', 'ffn' (width: dim, dim, 2 dim); `adapter_<site>/router`
(width, experts) per block (not with router='none').

Deliberate generalisations: d is the model's hidden size (768 in the reference); the
LP stride defaults to num_layers // experts (the reference's 12 // ne, at least 1);
with `layers` a subset, groups are still counted on the absolute block index. The
batch mean of the router weights is taken over the real examples only (`call.weights`),
so a padded last batch equals PyTorch's smaller last batch; router='example' (per-example
mean over tokens, so a prediction does not depend on the rest of its batch) is an option
the reference does not have. Note that with router='batch' (the default, as the
reference) evaluation depends on the batch composition too: the reference evaluates in
batches of 256.
"""

from __future__ import annotations

import dataclasses
from typing import Any, ClassVar, Mapping

import jax
import jax.numpy as jnp
from flax import linen as nn

from mlae_jax.adapters.experts import torch_linear_init
from mlae_jax.adapters.method import Method, ModelInfo, SiteCall
from mlae_jax.adapters.products import up_project
from mlae_jax.adapters.sites import Site

LILY_SITES = ('key', 'value', 'ffn')
ROUTERS = ('batch', 'example', 'none')


def routing_weights(probs: jax.Array, router: str, weights: jax.Array | None) -> jax.Array:
  """The expert weights from the router's softmax `probs` (batch, tokens, experts):
  'batch': one (experts,) vector, the mean over tokens and the real examples (weighted by
  `weights` (batch,); None: all real); 'example': (batch, experts), the mean over each
  example's tokens."""
  per_example = jnp.mean(probs, axis=1)
  if router == 'example':
    return per_example
  if weights is None:
    return jnp.mean(per_example, axis=0)
  weights = weights.astype(per_example.dtype)
  total = jnp.sum(weights)
  # A batch of padding alone: zero weights (its outputs are never counted), not NaN.
  return jnp.einsum('b,be->e', weights, per_example) / jnp.where(total > 0, total, 1.0)


class _LilyShared(nn.Module):
  """The LPs (groups, d, width) and HP experts (experts, width, d) of each site."""
  widths: Mapping[str, int]
  groups: int
  hidden: int
  experts: int
  param_dtype: Any = jnp.float32

  @nn.compact
  def __call__(self) -> dict[str, jax.Array]:
    shared = {}
    for site, width in self.widths.items():
      shared[f'lp_{site}'] = self.param(f'lp_{site}', torch_linear_init(batch_axis=(0,)),
                                        (self.groups, self.hidden, width), self.param_dtype)
      shared[f'hp_{site}'] = self.param(f'hp_{site}', nn.initializers.zeros,
                                        (self.experts, width, self.hidden), self.param_dtype)
    return shared


class _LilySite(nn.Module):
  """One adapted map: its router and the update s * phi(x LP) @ sum_e w_e HP_e."""
  experts: int
  router: str
  scale: float
  relu: bool
  dtype: Any = None
  param_dtype: Any = jnp.float32

  @nn.compact
  def __call__(self, x: jax.Array, lp: jax.Array, hp: jax.Array,
               weights: jax.Array | None) -> jax.Array:
    dtype = self.dtype or x.dtype
    width = lp.shape[-1]
    hidden = jnp.einsum('...i,ir->...r', x.astype(dtype), lp.astype(dtype))
    if self.relu:
      hidden = nn.relu(hidden)
    hp = hp.astype(jnp.float32)
    if self.router == 'none':  # Monoscale: the mean of the experts.
      combined = jnp.sum(hp, axis=0) * (1.0 / self.experts)
    else:
      kernel = self.param('router', torch_linear_init(), (width, self.experts),
                          self.param_dtype)
      logits = jnp.einsum('...r,re->...e', hidden, kernel.astype(dtype))
      probs = jax.nn.softmax(logits.astype(jnp.float32), axis=-1)
      mix = routing_weights(probs, self.router, weights)
      if self.router == 'example':
        combined = jnp.einsum('be,eio->bio', mix, hp).astype(dtype)
        return self.scale * jnp.einsum('bni,bio->bno', hidden, combined)
      combined = jnp.einsum('e,eio->io', mix, hp)
    return self.scale * up_project(hidden, combined.astype(dtype))


@dataclasses.dataclass(frozen=True)
class Lily(Method):
  """Lily. Fields beyond `Method`'s:

    targets: of 'key', 'value' (attention; phi = identity) and 'ffn' (parallel to the
      MLP, width 2 dim, phi = ReLU); the reference adapts all three.
    dim: the LPs' width (`--dim`, 32).
    experts: the number of HP experts ne (`--ne`, 4).
    scale: s, the factor on every update (`--scale`, 1).
    lp_stride: how many consecutive blocks share one LP; None: num_layers // experts
      (the reference's 12 // ne), at least 1.
    router: 'batch' (the reference: router weights averaged over tokens and the
      batch's real examples, in evaluation too), 'example' (averaged over each
      example's tokens: a prediction independent of its batch) or 'none' (the
      monoscale variant: no router, the mean of the experts).
  """
  NAME: ClassVar[str] = 'lily'
  SITES: ClassVar[tuple[str, ...]] = LILY_SITES
  MERGEABLE: ClassVar[bool] = False
  MIXES_TOKENS: ClassVar[bool] = True
  RECIPE: ClassVar[Mapping[str, Any]] = {'learning_rate': 1e-3, 'weight_decay': 1e-4,
                                         'epochs': 100}

  targets: tuple[str, ...] = LILY_SITES
  dim: int = 32
  experts: int = 4
  scale: float = 1.0
  lp_stride: int | None = None
  router: str = 'batch'

  def validate(self) -> None:
    super().validate()
    self.check_integer('dim', 'experts')
    self.check_finite('scale')
    if self.lp_stride is not None:
      self.check_integer('lp_stride', hint='or None for num_layers // experts')
    if self.router not in ROUTERS:
      self.fail(f'router {self.router!r} is not one of {ROUTERS}.')

  def stride(self, num_layers: int) -> int:
    """Consecutive blocks sharing one LP."""
    if self.lp_stride is not None:
      return self.lp_stride
    return max(1, num_layers // self.experts)

  def groups(self, num_layers: int) -> tuple[int, ...]:
    """The LP groups (block // stride) that hold an adapted block, in order: the rows of
    the stacked LPs."""
    stride = self.stride(num_layers)
    return tuple(sorted({layer // stride for layer in self.blocks(num_layers)}))

  def width(self, site: str) -> int:
    """The hidden width of the adapter at `site`: 2 dim on the MLP, else dim."""
    return 2 * self.dim if site == 'ffn' else self.dim

  def shared(self, info: ModelInfo, *, name: str) -> dict[str, jax.Array]:
    """The stacked LPs and the HP experts of every targeted site."""
    widths = {site: self.width(site) for site in LILY_SITES if site in self.targets}
    return _LilyShared(widths, len(self.groups(info.num_layers)), info.hidden_size,
                       self.experts, info.param_dtype, name=name)()

  def adapt(self, site: Site, call: SiteCall, shared: Any, info: ModelInfo, *, train: bool,
            name: str) -> jax.Array:
    del train  # No dropout: train and eval compute the same map.
    group = self.groups(info.num_layers).index(site.layer // self.stride(info.num_layers))
    delta = _LilySite(self.experts, self.router, float(self.scale), site.name == 'ffn',
                      info.dtype, info.param_dtype, name=name)(
                          call.x, shared[f'lp_{site.name}'][group], shared[f'hp_{site.name}'],
                          call.weights)
    return call.y + delta.astype(call.y.dtype)
