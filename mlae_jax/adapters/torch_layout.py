"""Adapter weights in the layout of the PyTorch MLAE / LoRA layers on timm's ViT.

The reference PyTorch layers wrap timm's `nn.Linear`s (`blocks.{i}.attn.qkv`, ...)
and store, for MLAE, `lora_A` (r, d_in), `lora_B` (r, d_out), `lora_lamda` (r,),
and for LoRA `lora_A` (r, d_in), `lora_B` (d_out, r). Our fused q-k-v output order
equals timm's, so the arrays move between the implementations unchanged (LoRA's B
transposed). With `train_bias`, the trained biases of the adapted layers travel too,
as the wrapped layer's `bias` (for qkv: q|k|v concatenated, as timm's `attn.qkv.bias`).
"""

from __future__ import annotations

import os
from typing import Any, Mapping

import jax.numpy as jnp
import numpy as np

from mlae_jax.adapters.low_rank import Lora, LowRank
from mlae_jax.adapters.merge import AdaptedModel, subtree
from mlae_jax.adapters.sites import adapter_scope, base_biases, torch_module
from mlae_jax.checkpoints.layout import flatten, unflatten
from mlae_jax.checkpoints.npz import read_npz, write_npz


def _entries(model: AdaptedModel):
  """(site, settings, torch name) of every adapter of `model`."""
  method = model.adapter
  if not isinstance(method, LowRank) or getattr(method, 'expert_rank', 1) != 1:
    raise ValueError(f'The PyTorch layout exists for MLAE (rank-1 experts) and LoRA adapters; '
                     f'this model has {method.NAME if method else "none"}.')
  layer_experts = method.layer_experts(model.num_layers)
  for site in method.sites(model.num_layers):
    yield site, layer_experts[site.layer], torch_module(site)


def export_torch_state(model: AdaptedModel, params: Mapping) -> dict[str, np.ndarray]:
  """The adapters as a PyTorch state dict fragment (numpy arrays)."""
  flat = flatten(params)
  state = {}
  for site, _, name in _entries(model):
    adapter = subtree(flat, adapter_scope(site))
    a, b = np.asarray(adapter['A']), np.asarray(adapter['B'])
    state[f'{name}.lora_A'] = a
    if isinstance(model.adapter, Lora):
      state[f'{name}.lora_B'] = b.T.copy()
    else:
      state[f'{name}.lora_B'] = b
      state[f'{name}.lora_lamda'] = np.asarray(model.adapter.coefficients(adapter))
    if model.adapter.train_bias:
      state[f'{name}.bias'] = np.concatenate(
          [np.asarray(flat[path]).reshape(-1) for path in base_biases(site)])
  return state


def import_torch_state(model: AdaptedModel, params: Mapping,
                       state: Mapping[str, Any]) -> dict:
  """`params` with its adapters replaced by those of a PyTorch state dict.

  Other entries of `state` (the backbone, the head) are ignored (the biases of the
  adapted layers too, unless the adapter trains them); missing or mis-shaped
  adapter entries raise ValueError.
  """
  flat = flatten(params)
  problems = []

  def fetch(key: str, shape: tuple[int, ...]) -> np.ndarray | None:
    if key not in state:
      problems.append(f'missing {key}')
      return None
    value = state[key]
    value = np.asarray(value.detach().cpu().numpy() if hasattr(value, 'detach') else value)
    if value.shape != shape:
      problems.append(f'{key} has shape {value.shape}, expected {shape}')
      return None
    return value

  for site, settings, name in _entries(model):
    scope = adapter_scope(site)
    a_shape, b_shape = flat[f'{scope}/A'].shape, flat[f'{scope}/B'].shape
    lora = isinstance(model.adapter, Lora)
    if model.adapter.train_bias:
      paths = base_biases(site)
      sizes = [int(np.prod(flat[path].shape)) for path in paths]
      bias = fetch(f'{name}.bias', (sum(sizes),))
      if bias is not None:
        for path, part in zip(paths, np.split(bias, np.cumsum(sizes)[:-1])):
          flat[path] = jnp.asarray(part.reshape(flat[path].shape), flat[path].dtype)
    a = fetch(f'{name}.lora_A', a_shape)
    b = fetch(f'{name}.lora_B', b_shape[::-1] if lora else b_shape)
    if a is not None:
      flat[f'{scope}/A'] = jnp.asarray(a, flat[f'{scope}/A'].dtype)
    if b is not None:
      flat[f'{scope}/B'] = jnp.asarray(b.T if lora else b, flat[f'{scope}/B'].dtype)
    if lora:
      continue
    coeff = fetch(f'{name}.lora_lamda', (settings.experts,))
    if coeff is None:
      continue
    if settings.adaptive_coeff:
      flat[f'{scope}/coeff'] = jnp.asarray(coeff, flat[f'{scope}/coeff'].dtype)
    elif not np.allclose(coeff, settings.coeff_init):
      problems.append(f'{name}.lora_lamda differs from the frozen coefficient '
                      f'{settings.coeff_init}; set adaptive_coeff=True to import it')
  if problems:
    raise ValueError('Cannot import the PyTorch adapter weights: ' + '; '.join(problems))
  return unflatten(flat)


def save_torch_state(path: str | os.PathLike, state: Mapping[str, np.ndarray]) -> None:
  """Writes a state dict fragment: `.pt`/`.pth` with torch, anything else as `.npz`."""
  if os.fspath(path).endswith(('.pt', '.pth')):
    import torch  # Optional dependency, needed only for this format.
    torch.save({key: torch.from_numpy(np.array(v)) for key, v in state.items()},
               path)
  else:
    write_npz(path, state)


def load_torch_state(path: str | os.PathLike) -> dict[str, np.ndarray]:
  """Reads what `save_torch_state` (or `torch.save` of a state dict) wrote."""
  if os.fspath(path).endswith(('.pt', '.pth')):
    import torch
    return {key: value.detach().cpu().numpy()
            for key, value in torch.load(path, map_location='cpu', weights_only=True).items()}
  return read_npz(path)
