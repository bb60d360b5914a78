"""A Flax Linen Vision Transformer whose parameter tree is the original checkpoint's.

The tree is that of the ImageNet-21k `.npz` files after flax's pre-Linen
renumbering (see `mlae_jax.checkpoints.layout`): `embedding`, `cls`,
`Transformer/posembed_input`, `Transformer/encoderblock_{i}/{LayerNorm_0,
MultiHeadDotProductAttention_0/{query,key,value,out}, LayerNorm_1,
MlpBlock_0/{Dense_0,Dense_1}}`, `Transformer/encoder_norm`, `head`. Adapters add
`adapter_<target>` subtrees beside the layers they adapt.
"""

from __future__ import annotations

import functools
import math
from typing import Any

import jax
import jax.numpy as jnp
from flax import linen as nn

from mlae_jax.adapters.config import (ATTENTION_TARGETS, MLP_TARGETS, AdapterConfig,
                                      LayerExperts)
from mlae_jax.adapters.experts import LowRankExperts
from mlae_jax.model.attention import dot_product_attention
from mlae_jax.model.drop_path import DropPath, block_drop_path_rates
from mlae_jax.model.variants import get_variant
from mlae_jax.partition import ADAPTER_PREFIX

Dtype = Any

# Weights of the original ViT: N(0, 1e-6) biases, xavier-uniform kernels.
_kernel_init = nn.initializers.xavier_uniform()
_bias_init = nn.initializers.normal(stddev=1e-6)


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

  The q, k and v products are taken separately (no per-step concatenation of the
  frozen kernels). A 'qkv' adapter spans all three: its output columns are ordered
  (q|k|v, head, head_dim) as timm's fused `attn.qkv`, so its B is interchangeable.
  With `query_tokens`, only the first that many tokens attend (keys and values
  still come from every token): the last block of a class-token classifier needs
  no more.
  """
  num_heads: int
  adapters: tuple[str, ...] = ()
  experts: LayerExperts | None = None
  dtype: Dtype = jnp.float32
  param_dtype: Dtype = jnp.float32

  @nn.compact
  def __call__(self, x: jax.Array, *, train: bool, query_tokens: int | None = None) -> jax.Array:
    d = x.shape[-1]
    heads, head_dim = self.num_heads, d // self.num_heads
    adapter = functools.partial(
        LowRankExperts, self.experts, dtype=self.dtype, param_dtype=self.param_dtype)
    weights = functools.partial(LinearWeights, param_dtype=self.param_dtype)
    inputs = dict(query=x[:, :query_tokens], key=x, value=x)
    projected = {name: _linear(inputs[name], *weights((d,), (heads, head_dim), name=name)(),
                               self.dtype) for name in ('query', 'key', 'value')}
    if 'qkv' in self.adapters:
      deltas = jnp.split(adapter(3 * d, name=ADAPTER_PREFIX + 'qkv')(x, train=train), 3, axis=-1)
      for name, delta in zip(('query', 'key', 'value'), deltas):
        projected[name] += delta[:, :query_tokens] if name == 'query' else delta
    for name in ('query', 'key', 'value'):
      if name in self.adapters:
        projected[name] += adapter(d, name=ADAPTER_PREFIX + name)(inputs[name], train=train)
    q, k, v = (projected[n].reshape(projected[n].shape[:-1] + (heads, head_dim))
               for n in ('query', 'key', 'value'))
    attended = dot_product_attention(q, k, v).reshape(q.shape[:-2] + (d,))
    kernel, bias = weights((heads, head_dim), (d,), name='out')()
    y = _linear(attended, kernel, bias, self.dtype)
    if 'out' in self.adapters:
      y = y + adapter(d, name=ADAPTER_PREFIX + 'out')(attended, train=train)
    return y


class MlpBlock(nn.Module):
  """Dense -> GELU -> Dense, with optional adapters on either dense layer."""
  mlp_dim: int
  gelu_approximate: bool
  adapters: tuple[str, ...] = ()
  experts: LayerExperts | None = None
  dtype: Dtype = jnp.float32
  param_dtype: Dtype = jnp.float32

  @nn.compact
  def __call__(self, x: jax.Array, *, train: bool) -> jax.Array:
    d = x.shape[-1]
    for index, (target, d_out) in enumerate((('fc1', self.mlp_dim), ('fc2', d))):
      kernel, bias = LinearWeights((x.shape[-1],), (d_out,), self.param_dtype,
                                   name=f'Dense_{index}')()
      y = _linear(x, kernel, bias, self.dtype)
      if target in self.adapters:
        y = y + LowRankExperts(self.experts, d_out, self.dtype, self.param_dtype,
                               name=ADAPTER_PREFIX + target)(x, train=train)
      x = nn.gelu(y, approximate=self.gelu_approximate) if index == 0 else y
    return x


class EncoderBlock(nn.Module):
  """Pre-LN transformer block: x + Attn(LN(x)), then x + MLP(LN(x)).

  With `class_token_only`, the block returns the first token alone (all tokens
  still serve as keys and values): the same value, for the last block of a
  classifier that reads the class token, at about a quarter of the work. In
  training, both residual branches go through stochastic depth at
  `drop_path_rate` (timm's `drop_path1` / `drop_path2`).
  """
  num_heads: int
  mlp_dim: int
  gelu_approximate: bool
  adapters: tuple[str, ...] = ()
  experts: LayerExperts | None = None
  class_token_only: bool = False
  drop_path_rate: float = 0.0
  dtype: Dtype = jnp.float32
  param_dtype: Dtype = jnp.float32

  @nn.compact
  def __call__(self, x: jax.Array, *, train: bool) -> jax.Array:
    norm = functools.partial(nn.LayerNorm, epsilon=1e-6, use_fast_variance=False,
                             dtype=self.dtype, param_dtype=self.param_dtype)
    shared = dict(experts=self.experts, dtype=self.dtype, param_dtype=self.param_dtype)
    attention_adapters = tuple(t for t in self.adapters if t in ATTENTION_TARGETS)
    mlp_adapters = tuple(t for t in self.adapters if t in MLP_TARGETS)
    query_tokens = 1 if self.class_token_only else None
    attended = SelfAttention(self.num_heads, attention_adapters, **shared,
                             name='MultiHeadDotProductAttention_0')(
                                 norm(name='LayerNorm_0')(x), train=train,
                                 query_tokens=query_tokens)
    x = x[:, :query_tokens] + DropPath(self.drop_path_rate, name='drop_path_0')(
        attended, train=train)
    mlp = MlpBlock(self.mlp_dim, self.gelu_approximate, mlp_adapters, **shared,
                   name='MlpBlock_0')(norm(name='LayerNorm_1')(x), train=train)
    return x + DropPath(self.drop_path_rate, name='drop_path_1')(mlp, train=train)


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
    adapter: MLAE/LoRA placement and masks; None for the plain ViT.
    gelu_approximate: tanh GELU (as the checkpoints were trained in vit_jax) or,
      by default, exact erf GELU (as timm, which produced the paper's numbers).
    drop_path_rate: stochastic depth of the last block (timm's `drop_path_rate`);
      block i gets `drop_path_rate * i / (num_layers - 1)`. Training draws the
      keep patterns from the 'drop_path' PRNG stream.
    dtype: compute dtype (bfloat16 on GPU); params stay in `param_dtype`.
  Input: images (batch, height, width, 3), pixels in [-1, 1].
  The class token after the final LayerNorm is sown as 'intermediates/pre_logits'.
  """
  num_classes: int
  patch_size: int
  hidden_size: int
  mlp_dim: int
  num_heads: int
  num_layers: int
  adapter: AdapterConfig | None = None
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
    if self.adapter is not None and not isinstance(self.adapter, AdapterConfig):
      raise ValueError(f'VisionTransformer: adapter must be an AdapterConfig or None, got '
                       f'{self.adapter!r}.')
    super().__post_init__()

  def layer_experts(self) -> tuple[LayerExperts | None, ...]:
    """The adapter settings of each block (None without adapters)."""
    if self.adapter is None:
      return (None,) * self.num_layers
    return self.adapter.layer_experts(self.num_layers)

  @nn.compact
  def __call__(self, images: jax.Array, *, train: bool = False) -> jax.Array:
    p = self.patch_size
    x = nn.Conv(self.hidden_size, (p, p), strides=(p, p), padding='VALID', dtype=self.dtype,
                param_dtype=self.param_dtype, name='embedding')(images.astype(self.dtype))
    batch = x.shape[0]
    x = x.reshape(batch, -1, self.hidden_size)
    cls = self.param('cls', nn.initializers.zeros, (1, 1, self.hidden_size), self.param_dtype)
    x = jnp.concatenate([jnp.broadcast_to(cls.astype(self.dtype), (batch, 1, self.hidden_size)),
                         x], axis=1)
    x = Encoder(self.num_heads, self.mlp_dim, self.gelu_approximate,
                self.adapter.targets if self.adapter else (), self.layer_experts(),
                class_token_only=True, drop_path_rate=self.drop_path_rate, dtype=self.dtype,
                param_dtype=self.param_dtype, name='Transformer')(x, train=train)
    pre_logits = x[:, 0]
    self.sow('intermediates', 'pre_logits', pre_logits)
    head = nn.Dense(self.num_classes, kernel_init=nn.initializers.zeros, dtype=self.dtype,
                    param_dtype=self.param_dtype, name='head')
    return head(pre_logits).astype(jnp.float32)


class Encoder(nn.Module):
  """Position embedding, the blocks (`encoderblock_{i}`) and the final LayerNorm.

  With `class_token_only`, only the class token's features come out (batch, 1,
  hidden), and the last block computes no more than they need.
  """
  num_heads: int
  mlp_dim: int
  gelu_approximate: bool
  adapters: tuple[str, ...]
  layer_experts: tuple[LayerExperts | None, ...]
  class_token_only: bool = False
  drop_path_rate: float = 0.0
  dtype: Dtype = jnp.float32
  param_dtype: Dtype = jnp.float32

  @nn.compact
  def __call__(self, x: jax.Array, *, train: bool) -> jax.Array:
    x = AddPositionEmbs(self.param_dtype, name='posembed_input')(x)
    last = len(self.layer_experts) - 1
    rates = block_drop_path_rates(self.drop_path_rate, len(self.layer_experts))
    for index, experts in enumerate(self.layer_experts):
      x = EncoderBlock(self.num_heads, self.mlp_dim, self.gelu_approximate, self.adapters,
                       experts, class_token_only=self.class_token_only and index == last,
                       drop_path_rate=rates[index], dtype=self.dtype, param_dtype=self.param_dtype,
                       name=f'encoderblock_{index}')(x, train=train)
    return nn.LayerNorm(epsilon=1e-6, use_fast_variance=False, dtype=self.dtype,
                        param_dtype=self.param_dtype, name='encoder_norm')(x)


def create_model(name: str, num_classes: int, *, adapter: AdapterConfig | None = None,
                 **overrides: Any) -> VisionTransformer:
  """A ViT of a named size ('ViT-B_16', 'B/16', ...); `overrides` change any field."""
  variant = get_variant(name)
  fields = dict(patch_size=variant.patch_size, hidden_size=variant.hidden_size,
                mlp_dim=variant.mlp_dim, num_heads=variant.num_heads,
                num_layers=variant.num_layers)
  fields.update(overrides)
  return VisionTransformer(num_classes=num_classes, adapter=adapter, **fields)
