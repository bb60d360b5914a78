"""Folding a method into the base weights, so inference costs the plain ViT."""

from __future__ import annotations

from typing import Any, Protocol

import jax.numpy as jnp

from mlae_jax.adapters.method import Method, NotMergeable
from mlae_jax.adapters.sites import SHARED_SCOPE, Site, adapter_scope, base_biases, base_kernels
from mlae_jax.checkpoints.layout import flatten, unflatten
from mlae_jax.partition import param_role


class AdaptedModel(Protocol):
  """What merging needs of a model: its method, depth, and a copy without the method."""
  adapter: Method | None
  num_layers: int

  def clone(self, **fields: Any) -> Any: ...


def subtree(flat: dict[str, Any], scope: str) -> dict[str, Any]:
  """The leaves under `scope`, by their names relative to it."""
  prefix = scope + '/'
  return {key[len(prefix):]: value for key, value in flat.items() if key.startswith(prefix)}


def merge_adapters(model: AdaptedModel, params: dict) -> tuple[Any, dict]:
  """A plain ViT and its parameters with the method folded into every site's base
  weights: its outputs equal the adapted model's eval outputs. Raises NotMergeable for
  a method whose update depends on the input."""
  method = model.adapter
  if method is not None and not method.MERGEABLE:
    raise NotMergeable(f'{method.NAME} cannot be merged into the base weights (its update '
                       'depends on the input); keep the adapted model for inference.')
  flat = flatten(params)
  merged = {key: value for key, value in flat.items()
            if param_role(key) not in ('adapter', 'state')}
  shared = unflatten(subtree(flat, SHARED_SCOPE)) if method else None
  for site in method.sites(model.num_layers) if method else ():
    _merge_site(method, site, subtree(flat, adapter_scope(site)), shared, merged)
  return model.clone(adapter=None), unflatten(merged)


def _merge_site(method: Method, site: Site, params: dict, shared: Any,
                merged: dict[str, Any]) -> None:
  """Replaces the base weights of `site` in `merged` by the method's merged ones. The
  weights of a site are its layers' kernels (or LayerNorm scales) flattened to
  (d_in, d_out) and put side by side (q|k|v for 'qkv'), and their biases."""
  kernel_paths, bias_paths = base_kernels(site), base_biases(site)
  widths = [merged[path].size for path in bias_paths]
  kernel = jnp.concatenate([merged[path].reshape(-1, width)
                            for path, width in zip(kernel_paths, widths)], axis=1)
  bias = jnp.concatenate([merged[path].reshape(-1) for path in bias_paths])
  kernel, bias = method.merge(site, params, shared, kernel, bias)
  splits = [sum(widths[:i + 1]) for i in range(len(widths) - 1)]
  for paths, value in ((kernel_paths, kernel), (bias_paths, bias)):
    for path, part in zip(paths, jnp.split(value, splits, axis=-1)):
      merged[path] = part.reshape(merged[path].shape).astype(merged[path].dtype)
