"""The widening product's custom gradient gives autodiff's sums."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from mlae_jax.adapters.products import up_project, up_project_dot_general


def _loss(product):
  def loss(hidden, kernel):
    return jnp.sum(jnp.tanh(product(hidden, kernel)) * jnp.arange(6.0))
  return loss


@pytest.mark.parametrize('shape', [(5, 3), (2, 7, 3), (2, 2, 4, 3)])
def test_gradients_equal_autodiffs(shape):
  keys = jax.random.split(jax.random.key(0), 2)
  hidden = jax.random.normal(keys[0], shape)
  kernel = jax.random.normal(keys[1], (3, 6))
  ours = jax.grad(_loss(up_project), argnums=(0, 1))(hidden, kernel)
  theirs = jax.grad(_loss(lambda h, k: jnp.einsum('...r,rd->...d', h, k)),
                    argnums=(0, 1))(hidden, kernel)
  for mine, reference in zip(ours, theirs):
    np.testing.assert_allclose(mine, reference, rtol=1e-5, atol=1e-6)
  batched = jax.vmap(jax.grad(_loss(up_project), argnums=1), in_axes=(0, None))(hidden, kernel)
  assert batched.shape == (shape[0], 3, 6)


def test_dense_products_other_than_last_axis_by_first_are_refused():
  with pytest.raises(ValueError, match="last axis by the kernel's first"):
    up_project_dot_general(jnp.ones((2, 3)), jnp.ones((3, 2)), (((0,), (1,)), ((), ())))
