"""Small models and helpers shared by the tests."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np

from mlae_jax.checkpoints.layout import flatten, unflatten
from mlae_jax.model.vit import VisionTransformer
from mlae_jax.partition import param_role

TINY = dict(patch_size=8, hidden_size=32, mlp_dim=64, num_heads=4, num_layers=3)
TINY_IMAGE = 32


def tiny_model(adapter=None, num_classes: int = 5, **overrides) -> VisionTransformer:
  return VisionTransformer(num_classes=num_classes, adapter=adapter, **{**TINY, **overrides})


def images(batch: int = 2, size: int = TINY_IMAGE, seed: int = 0) -> np.ndarray:
  return np.random.default_rng(seed).uniform(-1, 1, (batch, size, size, 3)).astype(np.float32)


def init(model: VisionTransformer, size: int = TINY_IMAGE, seed: int = 0) -> dict:
  return model.init(jax.random.key(seed), jnp.zeros((1, size, size, 3)))['params']


def randomize(params: dict, roles=('adapter', 'head'), seed: int = 1) -> dict:
  """Gives the leaves of `roles` random values (as if trained), so B != 0."""
  rng = np.random.default_rng(seed)
  flat = flatten(params)
  for key, value in flat.items():
    if param_role(key) in roles:
      flat[key] = jnp.asarray(0.3 * rng.standard_normal(value.shape), value.dtype)
  return unflatten(flat)
