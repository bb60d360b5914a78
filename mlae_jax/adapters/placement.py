"""Where each adapter target lives: its parameter scope, the base kernels it
updates, and its name in timm's ViT."""

from __future__ import annotations

from mlae_jax.adapters.config import ATTENTION_TARGETS, AdapterConfig
from mlae_jax.partition import ADAPTER_PREFIX

_ATTENTION = 'MultiHeadDotProductAttention_0'
_MLP = 'MlpBlock_0'
# target -> (base layers, in the order their outputs are concatenated).
_BASE_LAYERS = {
    'qkv': ('query', 'key', 'value'),
    'query': ('query',), 'key': ('key',), 'value': ('value',), 'out': ('out',),
    'fc1': ('Dense_0',), 'fc2': ('Dense_1',),
}
# target -> the nn.Linear of timm's `blocks.{i}` that computes the same map.
TORCH_MODULES = {'qkv': 'attn.qkv', 'out': 'attn.proj', 'fc1': 'mlp.fc1', 'fc2': 'mlp.fc2'}


def _scope(layer: int, target: str) -> str:
  parent = _ATTENTION if target in ATTENTION_TARGETS else _MLP
  return f'Transformer/encoderblock_{layer}/{parent}'


def adapter_scope(layer: int, target: str) -> str:
  """'/'-joined path of the adapter subtree of `target` in block `layer`."""
  return f'{_scope(layer, target)}/{ADAPTER_PREFIX}{target}'


def base_kernels(layer: int, target: str) -> tuple[str, ...]:
  """Paths of the kernels whose flattened (d_in, d_out) matrices, side by side,
  form the linear map that `target` adapts."""
  return tuple(f'{_scope(layer, target)}/{name}/kernel' for name in _BASE_LAYERS[target])


def base_biases(layer: int, target: str) -> tuple[str, ...]:
  """Paths of the biases of the layers `target` adapts (in `base_kernels`' order)."""
  return tuple(f'{_scope(layer, target)}/{name}/bias' for name in _BASE_LAYERS[target])


def tuned_paths(adapter: AdapterConfig | None, num_layers: int) -> frozenset[str]:
  """The backbone leaves an adapter configuration trains in place: with
  `train_bias`, the biases of every layer it adapts (for 'qkv', the query, key and
  value biases); else none. (The partition's `tuned` set.)"""
  if adapter is None or not adapter.train_bias:
    return frozenset()
  return frozenset(path for layer in range(num_layers) for target in adapter.targets
                   for path in base_biases(layer, target))


def torch_module(layer: int, target: str) -> str:
  """Name of the timm module that `target` of block `layer` corresponds to."""
  if target not in TORCH_MODULES:
    raise ValueError(f'timm\'s ViT has no separate layer for target {target!r} (its q, k and v '
                     f'are one fused `attn.qkv`); targets with a PyTorch layout: '
                     f'{tuple(TORCH_MODULES)}.')
  return f'blocks.{layer}.{TORCH_MODULES[target]}'
