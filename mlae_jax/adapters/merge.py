"""Folding adapters into the base weights, so inference costs the plain ViT."""

from __future__ import annotations

import jax.numpy as jnp

from mlae_jax.adapters.experts import expert_coefficients
from mlae_jax.adapters.placement import adapter_scope, base_kernels
from mlae_jax.checkpoints.layout import flatten, unflatten
from mlae_jax.model.vit import VisionTransformer
from mlae_jax.partition import param_role


def adapter_deltas(model: VisionTransformer, params: dict) -> dict[tuple[int, str], jnp.ndarray]:
  """dW = sum_i c_i a_i b_i^T, (d_in, d_out), for each (layer, target): the eval-time
  update (every expert, unscaled)."""
  flat = flatten(params)
  deltas = {}
  for layer, settings in enumerate(model.layer_experts()):
    for target in model.adapter.targets if model.adapter else ():
      scope = adapter_scope(layer, target)
      coeff = expert_coefficients(settings, flat.get(f'{scope}/coeff'))
      deltas[layer, target] = jnp.einsum(
          'ri,r,ro->io', flat[f'{scope}/A'], coeff, flat[f'{scope}/B'],
          precision='highest')
  return deltas


def merge_adapters(model: VisionTransformer,
                   params: dict) -> tuple[VisionTransformer, dict]:
  """Returns a plain ViT and its parameters, with every adapter folded into its base
  kernel: its outputs equal the adapted model's eval outputs."""
  flat = {key: value for key, value in flatten(params).items()
          if param_role(key) != 'adapter'}
  for (layer, target), delta in adapter_deltas(model, params).items():
    kernels = base_kernels(layer, target)  # Equal-width parts of the output (q|k|v).
    for key, part in zip(kernels, jnp.split(delta, len(kernels), axis=1)):
      flat[key] = flat[key] + part.reshape(flat[key].shape).astype(flat[key].dtype)
  return model.clone(adapter=None), unflatten(flat)
