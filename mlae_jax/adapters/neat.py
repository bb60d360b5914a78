"""NEAT (later PEANuT): a small network of the frozen weights as the weight update.

NEAT (Zhong et al., arXiv 2410.01870) learns the update of a frozen dense map as a
nonlinear function of its own pre-trained kernel K0 (d_in, d_out):

    x -> x K0 + b + s * x f(K0),   f(K0) = g(relu(K0 A)) B

with A (d_out, r), B (r, d_out) and g the identity at depth 2, or at larger even
depths (depth - 2) r x r ReLU layers with residual connections: half "encoders",
each saving its input, then half "decoders", each adding back the input saved by its
mirror encoder. As K0 is frozen, f(K0) does not depend on the input, so the update
folds into the kernel (mergeable): K0 + s f(K0). It is computed as its reference
writes it out: the small (d_in, r) matrix g(relu(K0 A)) once per call, then x times
it (tokens, r), then times B, never the (d_in, d_out) matrix.

Where each fact comes from (yibozhong/neat, image-classification/):
  - neat.py `neat_vanilla` (depth 2): A = nn.Linear(out_dim, dim) (weight (r, d_out),
    PyTorch's default init kaiming_uniform(a=sqrt(5)) = U(+-1/sqrt(d_out))),
    B = nn.Linear(dim, out_dim) zero-initialised, no biases; forward
    `x @ relu(weight @ A.weight.t())` then B, with `weight` = the frozen layer's
    `weight.t()` (d_in, d_out), our kernel. Stored here as (in, out) kernels:
    'A' (d_out, r) = A.weight.t(), 'B' (r, d_out) = B.weight.t().
  - neat.py `neat_multilayers`: depth - 2 (even) intermediate nn.Linear(dim, dim)
    layers (default init U(+-1/sqrt(r)), no bias), (depth - 2) / 2 `encoders` then as
    many `decoders`: encoder i saves h, then h = relu(h E_i); decoder i does
    h = relu(h D_i) + (the input saved by encoder (n - 1 - i)); then B. Here
    'encoder_{i}', 'decoder_{i}' (r, r) (in, out) kernels. (`neat_multilayers_depth_6`,
    the paper's analysis variant, has another residual pattern; it is not built.)
  - neat.py `forward_attn`: query and value (HF ViTSelfAttention's separate maps) get
    `1.0 * adapter(hidden_states, W.t())` added to their outputs, the input being the
    attention's input (LN1 output); key and the output projection are not adapted.
    `forward_ffn`: F.linear(input, W, b) + 1.0 * adapter(input, W.t()) on the MLP's
    two `dense` layers (HF ViTIntermediate = our 'fc1', whose out_dim is
    weight.shape[0] = mlp_dim, ViTOutput = our 'fc2'). `set_neat_vanilla` /
    `set_neat_multilayers`: neat_mode 1 = query and value, our default targets
    ('query', 'value'); neat_mode 2 adds the MLP: targets ('query', 'value', 'fc1',
    'fc2'). `mhsa_dim` / `ffn_dim` are our `rank` / `mlp_rank`. The scale 1.0 is
    `scale`.
  - main.py `get_model`: only parameters named 'adapter' and the classifier train.
  - run.sh: every ViT-B run uses mhsa_dim 7 with neat_mode 1 (args.py's default is 16);
    README.md's multilayer example uses depth 6. Our default rank is 8 (the budget of
    LoRA rank 8 on query and value: 294,912 parameters at ViT-B/16; the reference's
    rank 7 gives 258,048).
Deliberate deviations:
  - `set_neat_multilayers` builds the MLP adapters with `neat_multilayers`' default
    depth 4 whatever `depth` says (it passes no depth for them); here the MLP's depth is
    `mlp_depth`, None meaning `depth`. To reproduce that run with --multilayer, set
    mlp_depth=4.
  - Beyond the reference, 'key' and 'out' may also be targets (rank `rank`, depth
    `depth`).
  - The weight-side chain g(relu(K0 A)) is computed at the parameters' precision
    (promoted with the kernel's), then cast to the compute dtype for the token products.
Recipe: the reference trains on Pets, Cars, CIFAR-10/100, EuroSAT, FGVC, RESISC45,
DTD (full training sets with HF Trainer: AdamW, head and adapter learning rates
5e-3 or 1e-2, weight decay 4e-5 to 8e-4 per dataset, 10 epochs, batch 64 x 4
accumulated), not VTAB-1k, so RECIPE is the shared VTAB-1k PEFT recipe
(`method.PEFT_RECIPE`).
"""

from __future__ import annotations

import dataclasses
from typing import Any, ClassVar, Mapping, Sequence

import jax
import jax.numpy as jnp
from flax import linen as nn

from mlae_jax.adapters.experts import torch_linear_init
from mlae_jax.adapters.method import PEFT_RECIPE, Method, ModelInfo, SiteCall, is_integer
from mlae_jax.adapters.products import up_project
from mlae_jax.adapters.sites import Site

NEAT_SITES = ('query', 'key', 'value', 'out', 'fc1', 'fc2')
MLP_SITES = ('fc1', 'fc2')

_torch_linear_init = torch_linear_init()  # torch.nn.Linear's default.


def neat_factor(kernel: jax.Array, a: jax.Array, encoders: Sequence[jax.Array],
                decoders: Sequence[jax.Array]) -> jax.Array:
  """The (d_in, r) matrix g(relu(K0 A)) of `neat_multilayers` (before B): encoder i
  saves its input and applies relu(h E_i); decoder i applies relu(h D_i) and adds the
  input saved by the mirror encoder. No encoders: relu(K0 A) (`neat_vanilla`)."""
  h = jax.nn.relu(kernel @ a)
  saved = []
  for encoder in encoders:
    saved.append(h)
    h = jax.nn.relu(h @ encoder)
  for decoder in decoders:
    h = jax.nn.relu(h @ decoder) + saved.pop()
  return h


class _NeatUpdate(nn.Module):
  """One site's NEAT network: 'A' (d_out, r), 'encoder_{i}' and 'decoder_{i}' (r, r),
  'B' (r, d_out) zero; returns s * (x g(relu(K0 A))) B."""
  rank: int
  depth: int
  scale: float
  dtype: Any = None
  param_dtype: Any = jnp.float32

  @nn.compact
  def __call__(self, x: jax.Array, kernel: jax.Array) -> jax.Array:
    d_out, r, pairs = kernel.shape[1], self.rank, (self.depth - 2) // 2
    a = self.param('A', _torch_linear_init, (d_out, r), self.param_dtype)
    encoders = [self.param(f'encoder_{i}', _torch_linear_init, (r, r), self.param_dtype)
                for i in range(pairs)]
    decoders = [self.param(f'decoder_{i}', _torch_linear_init, (r, r), self.param_dtype)
                for i in range(pairs)]
    b = self.param('B', nn.initializers.zeros, (r, d_out), self.param_dtype)
    weight_dtype = jnp.promote_types(kernel.dtype, self.param_dtype)
    factor = neat_factor(kernel.astype(weight_dtype), a.astype(weight_dtype),
                         [e.astype(weight_dtype) for e in encoders],
                         [d.astype(weight_dtype) for d in decoders])
    dtype = self.dtype or x.dtype
    hidden = jnp.einsum('...i,ir->...r', x.astype(dtype), factor.astype(dtype))
    return self.scale * up_project(hidden, b.astype(dtype))


@dataclasses.dataclass(frozen=True)
class Neat(Method):
  """NEAT. Fields (and those of `Method`):

    targets: dense maps to adapt, of 'query', 'key', 'value', 'out', 'fc1', 'fc2';
      the reference's neat_mode 1 is ('query', 'value') (the default), neat_mode 2
      ('query', 'value', 'fc1', 'fc2').
    rank: r, the network's hidden width (`mhsa_dim`; the reference's ViT runs use 7).
    mlp_rank: r on 'fc1' and 'fc2' (`ffn_dim`); None means `rank`.
    depth: layers of the network, an even number >= 2: 2 is A and B alone
      (`neat_vanilla`), larger inserts depth - 2 r x r ReLU layers with
      `neat_multilayers`' residuals.
    mlp_depth: depth on 'fc1' and 'fc2'; None means `depth` (the reference's
      multilayer mode 2 always used 4 there: see the module docstring).
    scale: s, the factor on the update (1.0 in the reference).
  """
  NAME: ClassVar[str] = 'neat'
  SITES: ClassVar[tuple[str, ...]] = NEAT_SITES
  MERGEABLE: ClassVar[bool] = True
  RECIPE: ClassVar[Mapping[str, Any]] = PEFT_RECIPE

  targets: tuple[str, ...] = ('query', 'value')
  rank: int = 8
  mlp_rank: int | None = None
  depth: int = 2
  mlp_depth: int | None = None
  scale: float = 1.0

  def validate(self) -> None:
    super().validate()
    self.check_integer('rank')
    if self.mlp_rank is not None:
      self.check_integer('mlp_rank', hint='or None for rank')
    for name in ('depth', 'mlp_depth'):
      value = getattr(self, name)
      if name == 'mlp_depth' and value is None:
        continue
      if not (is_integer(value) and value >= 2 and value % 2 == 0):
        none = ' or None for depth' if name == 'mlp_depth' else ''
        self.fail(f'{name} must be an even integer >= 2 (A and B, plus pairs of r x r '
                  f'layers){none}, got {value!r}.')
    self.check_finite('scale')

  def site_shape(self, site: str) -> tuple[int, int]:
    """(rank, depth) of the network at `site`."""
    if site in MLP_SITES:
      return (self.rank if self.mlp_rank is None else self.mlp_rank,
              self.depth if self.mlp_depth is None else self.mlp_depth)
    return self.rank, self.depth

  def adapt(self, site: Site, call: SiteCall, shared: Any, info: ModelInfo, *, train: bool,
            name: str) -> jax.Array:
    rank, depth = self.site_shape(site.name)
    delta = _NeatUpdate(rank, depth, self.scale, info.dtype, info.param_dtype,
                        name=name)(call.x, call.kernel)
    return call.y + delta.astype(call.y.dtype)

  def delta(self, params: Mapping[str, Any], kernel: jax.Array) -> jax.Array:
    """The (d_in, d_out) update s * g(relu(K0 A)) B of a site's (flat-named) `params`
    for its frozen kernel K0."""
    pairs = sum(1 for key in params if key.startswith('encoder_'))
    f32 = lambda key: jnp.asarray(params[key], jnp.float32)
    with jax.default_matmul_precision('highest'):
      factor = neat_factor(jnp.asarray(kernel, jnp.float32), f32('A'),
                           [f32(f'encoder_{i}') for i in range(pairs)],
                           [f32(f'decoder_{i}') for i in range(pairs)])
      return self.scale * (factor @ f32('B'))

  def merge(self, site: Site, params: Mapping[str, Any], shared: Any, kernel: jax.Array,
            bias: jax.Array) -> tuple[jax.Array, jax.Array]:
    """K0 + s f(K0), f computed from the frozen kernel given (the eval-time map)."""
    return kernel + self.delta(params, kernel).astype(kernel.dtype), bias
