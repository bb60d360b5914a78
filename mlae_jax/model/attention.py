"""Scaled dot-product attention, written for the speed of its backward pass.

softmax(q k^T / sqrt(d)) v is computed as (exp(s - max s) v) / sum exp(s - max s):
the normalisation comes after the value product, and the row maximum (which the
result does not depend on) is held out of differentiation. Mathematically the
same as `jax.nn.dot_product_attention`; on the project's CPU it made the ViT-B/16
train step ~25% faster (XLA's lowering of the softmax backward is the slow part).
"""

from __future__ import annotations

import jax
import jax.numpy as jnp


def dot_product_attention(q: jax.Array, k: jax.Array, v: jax.Array) -> jax.Array:
  """Attention over (batch, tokens, heads, head_dim) inputs; q may have fewer tokens."""
  q = q * jnp.asarray(q.shape[-1] ** -0.5, q.dtype)
  q, k, v = (jnp.swapaxes(t, -3, -2) for t in (q, k, v))  # (batch, heads, tokens, dim)
  scores = jnp.matmul(q, jnp.swapaxes(k, -1, -2)).astype(jnp.float32)
  weights = jnp.exp(scores - jax.lax.stop_gradient(jnp.max(scores, -1, keepdims=True)))
  out = jnp.matmul(weights.astype(v.dtype), v) / jnp.sum(weights, -1, keepdims=True).astype(v.dtype)
  return jnp.swapaxes(out, -3, -2)
