"""The fast paths of the model are the plain computation, values and gradients."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from tiny import TINY

from mlae_jax.adapters import Mlae
from mlae_jax.adapters.experts import MASK_RNG
from mlae_jax.checkpoints.pretrained import init_params
from mlae_jax.model.attention import dot_product_attention
from mlae_jax.model.vit import Encoder, create_model


@pytest.mark.parametrize('query_tokens', [None, 1])
def test_attention_matches_jax_nn_values_and_gradients(query_tokens):
  keys = jax.random.split(jax.random.key(0), 4)
  k, v, cotangent = (jax.random.normal(key, (2, 9, 3, 8)) * 3 for key in keys[1:])
  q = jax.random.normal(keys[0], (2, 9, 3, 8))[:, :query_tokens] * 3
  ours, ours_vjp = jax.vjp(dot_product_attention, q, k, v)
  theirs, theirs_vjp = jax.vjp(jax.nn.dot_product_attention, q, k, v)
  np.testing.assert_allclose(ours, theirs, rtol=1e-5, atol=1e-5)
  for mine, reference in zip(ours_vjp(cotangent[:, :q.shape[1]]),
                             theirs_vjp(cotangent[:, :q.shape[1]])):
    np.testing.assert_allclose(mine, reference, rtol=1e-4, atol=1e-4)


@pytest.mark.parametrize('targets', [('qkv',), ('query', 'key', 'value', 'out', 'fc1', 'fc2')])
def test_class_token_only_last_block_changes_nothing(targets):
  adapter = Mlae(targets=targets, rank=3, drop_rate=0.5)
  model = create_model('ViT-Ti_16', 5, adapter=adapter, **TINY)
  params = init_params(model, jax.random.key(1), 32)
  params = jax.tree.map(lambda p: p + 0.05 * jax.random.normal(jax.random.key(2), p.shape), params)
  tokens = jax.random.normal(jax.random.key(3), (2, 17, model.hidden_size))
  encoder = dict(num_heads=model.num_heads, mlp_dim=model.mlp_dim, gelu_approximate=False,
                 adapt=model.adaptation())
  rngs = {MASK_RNG: jax.random.key(4)}

  def run(class_token_only, x):
    return Encoder(**encoder, class_token_only=class_token_only).apply(
        {'params': params['Transformer']}, x, train=True, rngs=rngs)

  every = run(False, tokens)
  first = run(True, tokens)
  assert first.shape == (2, 1, model.hidden_size)
  np.testing.assert_allclose(first[:, 0], every[:, 0], atol=2e-6)
  grad_every = jax.grad(lambda x: jnp.sum(run(False, x)[:, 0] ** 2))(tokens)
  grad_first = jax.grad(lambda x: jnp.sum(run(True, x)[:, 0] ** 2))(tokens)
  np.testing.assert_allclose(grad_first, grad_every, atol=1e-5)
