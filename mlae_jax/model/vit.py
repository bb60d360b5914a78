"""A Flax Linen Vision Transformer whose parameter tree is the original checkpoint's.

The tree is that of the ImageNet-21k `.npz` files after flax's pre-Linen
renumbering (see `mlae_jax.checkpoints.layout`): `embedding`, `cls`,
`Transformer/posembed_input`, `Transformer/encoderblock_{i}/{LayerNorm_0,
MultiHeadDotProductAttention_0/{query,key,value,out}, LayerNorm_1,
MlpBlock_0/{Dense_0,Dense_1}}`, `Transformer/encoder_norm`, `head`. A PEFT method
(`mlae_jax.adapters`) acts at the sites of `mlae_jax.adapters.sites`: each site's
output passes through the method, whose parameters are `adapter_<site>` subtrees
beside the layer they adapt (and `adapter_shared` at the root).
"""

from __future__ import annotations

import dataclasses
import functools
import math
from typing import Any

import jax
import jax.numpy as jnp
from flax import linen as nn

from mlae_jax.adapters.method import Method, ModelInfo, SiteCall
from mlae_jax.adapters.sites import ADAPTER_PREFIX, SHARED_SCOPE, Site
from mlae_jax.checkpoints.variants import get_variant
from mlae_jax.model.attention import dot_product_attention
from mlae_jax.model.drop_path import DropPath, block_drop_path_rates

Dtype = Any

# Weights of the original ViT: N(0, 1e-6) biases, xavier-uniform kernels.
_kernel_init = nn.initializers.xavier_uniform()
_bias_init = nn.initializers.normal(stddev=1e-6)
_QKV = ('query', 'key', 'value')


@dataclasses.dataclass(frozen=True)
class Context:
  """What every site of one forward pass shares: the method's shared parameters and
  the example weights of the batch (None: every row is real)."""
  shared: Any = None
  weights: jax.Array | None = None


@dataclasses.dataclass(frozen=True)
class Adaptation:
  """A method and the sites it acts on, as the model's modules see it."""
  method: Method | None
  sites: frozenset[Site]
  info: ModelInfo

  def __call__(self, site: Site, call: SiteCall, context: Context, train: bool) -> jax.Array:
    """The output of `site`: the method's, where it acts, else the base model's. Must
    be called inside the compact method of the module that owns the site."""
    if site not in self.sites:
      return call.y
    return self.method.adapt(site, dataclasses.replace(call, weights=context.weights),
                             context.shared, self.info, train=train,
                             name=ADAPTER_PREFIX + site.name)


class LinearWeights(nn.Module):
  """Declares a kernel and bias in the checkpoint's shapes and returns them flat.

  The kernel of shape (*in_shape, *out_shape) is returned as (d_in, d_out) and
  the bias as (d_out,), so layers can fuse and adapt them as plain matrices.
  """
  in_shape: tuple[int, ...]
  out_shape: tuple[int, ...]
  param_dtype: Dtype = jnp.float32

  @nn.compact
  def __call__(self) -> tuple[jax.Array, jax.Array]:
    d_in, d_out = math.prod(self.in_shape), math.prod(self.out_shape)

    def kernel_init(key, shape, dtype):  # Xavier over the flat (d_in, d_out) matrix.
      return _kernel_init(key, (d_in, d_out), dtype).reshape(shape)

    kernel = self.param('kernel', kernel_init, self.in_shape + self.out_shape, self.param_dtype)
    bias = self.param('bias', _bias_init, self.out_shape, self.param_dtype)
    return kernel.reshape(d_in, d_out), bias.reshape(d_out)


def _linear(x: jax.Array, kernel: jax.Array, bias: jax.Array, dtype: Dtype) -> jax.Array:
  return jnp.dot(x, kernel.astype(dtype)) + bias.astype(dtype)


class SelfAttention(nn.Module):
  """Multi-head self-attention over the checkpoint's query/key/value/out weights.

  q, k and v come from one product with the three kernels side by side, (q|k|v, head,
  head_dim) as timm's fused `attn.qkv`: the 'qkv' site sees that map, the 'query',
  'key' and 'value' sites its parts. With `query_tokens`, only the first that many
  tokens attend (keys and values still come from every token): the last block of a
  class-token classifier needs no more.
  """
  num_heads: int
  adapt: Adaptation
  layer: int
  dtype: Dtype = jnp.float32
  param_dtype: Dtype = jnp.float32

  @nn.compact
  def __call__(self, x: jax.Array, context: Context, *, train: bool,
               query_tokens: int | None = None) -> jax.Array:
    d = x.shape[-1]
    heads, head_dim = self.num_heads, d // self.num_heads
    weights = functools.partial(LinearWeights, param_dtype=self.param_dtype)
    kernels, biases = zip(*(weights((d,), (heads, head_dim), name=name)() for name in _QKV))
    kernel, bias = jnp.concatenate(kernels, axis=1), jnp.concatenate(biases)
    fused = self.adapt(Site('qkv', self.layer),
                       SiteCall(x, _linear(x, kernel, bias, self.dtype), kernel, bias),
                       context, train)
    q, k, v = (self.adapt(Site(name, self.layer), SiteCall(x, part, part_kernel, part_bias),
                          context, train).reshape(x.shape[:-1] + (heads, head_dim))
               for name, part, part_kernel, part_bias
               in zip(_QKV, jnp.split(fused, 3, axis=-1), kernels, biases))
    attended = dot_product_attention(q[:, :query_tokens], k, v)
    attended = attended.reshape(attended.shape[:-2] + (d,))
    kernel, bias = weights((heads, head_dim), (d,), name='out')()
    return self.adapt(Site('out', self.layer),
                      SiteCall(attended, _linear(attended, kernel, bias, self.dtype), kernel,
                               bias), context, train)


class MlpBlock(nn.Module):
  """Dense -> GELU -> Dense; the dense layers are the 'fc1' and 'fc2' sites, the whole
  map the 'ffn' site."""
  mlp_dim: int
  gelu_approximate: bool
  adapt: Adaptation
  layer: int
  dtype: Dtype = jnp.float32
  param_dtype: Dtype = jnp.float32

  @nn.compact
  def __call__(self, x: jax.Array, context: Context, *, train: bool) -> jax.Array:
    d, inputs = x.shape[-1], x
    for index, (site, d_out) in enumerate((('fc1', self.mlp_dim), ('fc2', d))):
      kernel, bias = LinearWeights((x.shape[-1],), (d_out,), self.param_dtype,
                                   name=f'Dense_{index}')()
      y = self.adapt(Site(site, self.layer),
                     SiteCall(x, _linear(x, kernel, bias, self.dtype), kernel, bias),
                     context, train)
      x = nn.gelu(y, approximate=self.gelu_approximate) if index == 0 else y
    return self.adapt(Site('ffn', self.layer), SiteCall(inputs, x), context, train)


class EncoderBlock(nn.Module):
  """Pre-LN transformer block: x + Attn(LN(x)), then x + MLP(LN(x)).

  Sites: 'tokens' (the block's input), 'ln1', 'ln2', 'mlp' (the MLP branch's output
  after stochastic depth, the term added to the residual stream x it reads through
  'ln2'; x is the site's input), and those of its attention and MLP. With `class_token_only`, the block returns the first token alone (all tokens
  still serve as keys and values): the same value, for the last block of a classifier
  that reads the class token, at about a quarter of the work. In training, both
  residual branches go through stochastic depth at `drop_path_rate` (timm's
  `drop_path1` / `drop_path2`).
  """
  num_heads: int
  mlp_dim: int
  gelu_approximate: bool
  adapt: Adaptation
  layer: int
  class_token_only: bool = False
  drop_path_rate: float = 0.0
  dtype: Dtype = jnp.float32
  param_dtype: Dtype = jnp.float32

  @nn.compact
  def __call__(self, x: jax.Array, context: Context, *, train: bool) -> jax.Array:
    norm = functools.partial(nn.LayerNorm, epsilon=1e-6, use_fast_variance=False,
                             dtype=self.dtype, param_dtype=self.param_dtype)
    adapt = functools.partial(self.adapt, context=context, train=train)
    common = dict(adapt=self.adapt, layer=self.layer, dtype=self.dtype,
                  param_dtype=self.param_dtype)
    x = adapt(Site('tokens', self.layer), SiteCall(x, x))
    query_tokens = 1 if self.class_token_only else None
    normed = adapt(Site('ln1', self.layer), SiteCall(x, norm(name='LayerNorm_0')(x)))
    attended = SelfAttention(self.num_heads, **common, name='MultiHeadDotProductAttention_0')(
        normed, context, train=train, query_tokens=query_tokens)
    x = x[:, :query_tokens] + DropPath(self.drop_path_rate, name='drop_path_0')(
        attended, train=train)
    normed = adapt(Site('ln2', self.layer), SiteCall(x, norm(name='LayerNorm_1')(x)))
    mlp = MlpBlock(self.mlp_dim, self.gelu_approximate, **common, name='MlpBlock_0')(
        normed, context, train=train)
    mlp = DropPath(self.drop_path_rate, name='drop_path_1')(mlp, train=train)
    return x + adapt(Site('mlp', self.layer), SiteCall(x, mlp))


class AddPositionEmbs(nn.Module):
  """Adds a learned position embedding (1, tokens, hidden)."""
  param_dtype: Dtype = jnp.float32

  @nn.compact
  def __call__(self, x: jax.Array) -> jax.Array:
    pos = self.param('pos_embedding', nn.initializers.normal(stddev=0.02),
                     (1,) + x.shape[1:], self.param_dtype)
    return x + pos.astype(x.dtype)


class VisionTransformer(nn.Module):
  """ViT with a class-token classifier, optionally adapted with MLAE or LoRA.

  Attributes:
    num_classes: size of the zero-initialised head.
    patch_size, hidden_size, mlp_dim, num_heads, num_layers: the model size.
    adapter: the PEFT method (`mlae_jax.adapters`); None for the plain ViT.
    gelu_approximate: tanh GELU (as the checkpoints were trained in vit_jax) or,
      by default, exact erf GELU (as timm, which produced the paper's numbers).
    drop_path_rate: stochastic depth of the last block (timm's `drop_path_rate`);
      block i gets `drop_path_rate * i / (num_layers - 1)`. Training draws the
      keep patterns from the 'drop_path' PRNG stream.
    dtype: compute dtype (bfloat16 on GPU); params stay in `param_dtype`.
  Input: images (batch, height, width, 3), pixels in [-1, 1]; `example_weights`
  (batch,), 0 for padding rows, reach methods whose update mixes the examples of a batch.
  The last block computes the class token alone, unless the method mixes tokens.
  The class token after the final LayerNorm is sown as 'intermediates/pre_logits'.
  """
  num_classes: int
  patch_size: int
  hidden_size: int
  mlp_dim: int
  num_heads: int
  num_layers: int
  adapter: Method | None = None
  gelu_approximate: bool = False
  drop_path_rate: float = 0.0
  dtype: Dtype = jnp.float32
  param_dtype: Dtype = jnp.float32

  def __post_init__(self):
    # Shapes that cannot work fail here, by name, not deep inside a matrix product.
    for field in ('num_classes', 'patch_size', 'hidden_size', 'mlp_dim', 'num_heads',
                  'num_layers'):
      value = getattr(self, field)
      if not isinstance(value, int) or isinstance(value, bool) or value < 1:
        raise ValueError(f'VisionTransformer: {field} must be an integer >= 1, got {value!r}.')
    if self.hidden_size % self.num_heads:
      raise ValueError(f'VisionTransformer: num_heads {self.num_heads} does not divide '
                       f'hidden_size {self.hidden_size}.')
    if not (isinstance(self.drop_path_rate, (int, float)) and 0 <= self.drop_path_rate < 1):
      raise ValueError(f'VisionTransformer: drop_path_rate must lie in [0, 1), got '
                       f'{self.drop_path_rate!r}.')
    if self.adapter is not None and not isinstance(self.adapter, Method):
      raise ValueError(f'VisionTransformer: adapter must be a method of mlae_jax.adapters or '
                       f'None, got {self.adapter!r}.')
    super().__post_init__()

  def adaptation(self) -> Adaptation:
    """The method and the sites it acts on in this model."""
    info = ModelInfo(self.hidden_size, self.mlp_dim, self.num_heads, self.num_layers,
                     self.patch_size, self.dtype, self.param_dtype)
    sites = frozenset(self.adapter.sites(self.num_layers) if self.adapter else ())
    return Adaptation(self.adapter, sites, info)

  @nn.compact
  def __call__(self, images: jax.Array, *, train: bool = False,
               example_weights: jax.Array | None = None) -> jax.Array:
    p = self.patch_size
    adapt = self.adaptation()
    context = Context(
        self.adapter.shared(adapt.info, name=SHARED_SCOPE) if self.adapter else None,
        example_weights)
    conv = nn.Conv(self.hidden_size, (p, p), strides=(p, p), padding='VALID', dtype=self.dtype,
                   param_dtype=self.param_dtype, name='embedding')
    images = images.astype(self.dtype)
    batch = images.shape[0]
    x = adapt(Site('embedding'), SiteCall(images, conv(images).reshape(
        batch, -1, self.hidden_size)), context, train)
    cls = self.param('cls', nn.initializers.zeros, (1, 1, self.hidden_size), self.param_dtype)
    x = jnp.concatenate([jnp.broadcast_to(cls.astype(self.dtype), (batch, 1, self.hidden_size)),
                         x], axis=1)
    x = Encoder(self.num_heads, self.mlp_dim, self.gelu_approximate, adapt,
                class_token_only=not (self.adapter and self.adapter.MIXES_TOKENS),
                drop_path_rate=self.drop_path_rate, dtype=self.dtype,
                param_dtype=self.param_dtype, name='Transformer')(x, context, train=train)
    pre_logits = x[:, 0]
    self.sow('intermediates', 'pre_logits', pre_logits)
    head = nn.Dense(self.num_classes, kernel_init=nn.initializers.zeros, dtype=self.dtype,
                    param_dtype=self.param_dtype, name='head')
    return head(pre_logits).astype(jnp.float32)


class Encoder(nn.Module):
  """Position embedding, the blocks (`encoderblock_{i}`) and the final LayerNorm (the
  'encoder_norm' site).

  With `class_token_only`, only the class token's features come out (batch, 1,
  hidden), and the last block computes no more than they need.
  """
  num_heads: int
  mlp_dim: int
  gelu_approximate: bool
  adapt: Adaptation
  class_token_only: bool = False
  drop_path_rate: float = 0.0
  dtype: Dtype = jnp.float32
  param_dtype: Dtype = jnp.float32

  @nn.compact
  def __call__(self, x: jax.Array, context: Context = Context(), *, train: bool) -> jax.Array:
    x = AddPositionEmbs(self.param_dtype, name='posembed_input')(x)
    depth = self.adapt.info.num_layers
    rates = block_drop_path_rates(self.drop_path_rate, depth)
    for index in range(depth):
      x = EncoderBlock(self.num_heads, self.mlp_dim, self.gelu_approximate, self.adapt, index,
                       class_token_only=self.class_token_only and index == depth - 1,
                       drop_path_rate=rates[index], dtype=self.dtype, param_dtype=self.param_dtype,
                       name=f'encoderblock_{index}')(x, context, train=train)
    normed = nn.LayerNorm(epsilon=1e-6, use_fast_variance=False, dtype=self.dtype,
                          param_dtype=self.param_dtype, name='encoder_norm')(x)
    return self.adapt(Site('encoder_norm'), SiteCall(x, normed), context, train)


def create_model(name: str, num_classes: int, *, adapter: Method | None = None,
                 **overrides: Any) -> VisionTransformer:
  """A ViT of a named size ('ViT-B_16', 'B/16', ...); `overrides` change any field."""
  variant = get_variant(name)
  fields = dict(patch_size=variant.patch_size, hidden_size=variant.hidden_size,
                mlp_dim=variant.mlp_dim, num_heads=variant.num_heads,
                num_layers=variant.num_layers)
  fields.update(overrides)
  return VisionTransformer(num_classes=num_classes, adapter=adapter, **fields)
