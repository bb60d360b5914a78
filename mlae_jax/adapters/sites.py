"""Where a method can act on the ViT: the sites, their parameter paths and timm names.

Every site is an operation of the model whose output a method may replace: the
dense maps of a block ('qkv' is the fused q|k|v projection, 'query', 'key', 'value'
its parts, 'out' the attention output, 'fc1'/'fc2' the MLP's), its LayerNorms
('ln1', 'ln2'), its MLP as a function of its input ('ffn': the fc2 output before
stochastic depth; the site's input is the LN2 output, so an adapter parallel to the MLP
sits inside the branch, as Lily's), its whole MLP branch ('mlp': the branch's output
after stochastic depth, the term added to the residual stream; the site's input is that
stream), its input tokens ('tokens'), and two model-level sites: the
patch embedding ('embedding') and the final LayerNorm ('encoder_norm'). This module is
the one place that knows where each lives in the parameter tree (the original
checkpoint's layout), so merging, counting and interchange read paths from here.
"""

from __future__ import annotations

import dataclasses

from mlae_jax.partition import ADAPTER_PREFIX

SHARED_SCOPE = ADAPTER_PREFIX + 'shared'  # Parameters a method shares across blocks.

DENSE_SITES = ('qkv', 'query', 'key', 'value', 'out', 'fc1', 'fc2')
NORM_SITES = ('ln1', 'ln2')
BLOCK_SITES = DENSE_SITES + NORM_SITES + ('ffn', 'mlp', 'tokens')
MODEL_SITES = ('embedding', 'encoder_norm')
SITES = BLOCK_SITES + MODEL_SITES

_BLOCK = 'Transformer/encoderblock_{layer}'
_ATTENTION = _BLOCK + '/MultiHeadDotProductAttention_0'
_MLP = _BLOCK + '/MlpBlock_0'
# site -> (scope of the module computing it, its base layers concatenated on output).
_PLACES = {
    'qkv': (_ATTENTION, ('query', 'key', 'value')),
    'query': (_ATTENTION, ('query',)), 'key': (_ATTENTION, ('key',)),
    'value': (_ATTENTION, ('value',)), 'out': (_ATTENTION, ('out',)),
    'fc1': (_MLP, ('Dense_0',)), 'fc2': (_MLP, ('Dense_1',)),
    'ln1': (_BLOCK, ('LayerNorm_0',)), 'ln2': (_BLOCK, ('LayerNorm_1',)),
    'ffn': (_MLP, ()), 'mlp': (_BLOCK, ()), 'tokens': (_BLOCK, ()),
    'embedding': ('', ('embedding',)), 'encoder_norm': ('Transformer', ('encoder_norm',)),
}
_NORMS = NORM_SITES + ('encoder_norm',)
# site -> the module of timm's `blocks.{i}` (or model) computing the same map.
TORCH_MODULES = {'qkv': 'attn.qkv', 'out': 'attn.proj', 'fc1': 'mlp.fc1', 'fc2': 'mlp.fc2',
                 'ln1': 'norm1', 'ln2': 'norm2', 'ffn': 'mlp', 'embedding': 'patch_embed.proj',
                 'encoder_norm': 'norm'}


@dataclasses.dataclass(frozen=True, order=True)
class Site:
  """One place of the model: a site name and its block (None for model-level sites)."""
  name: str
  layer: int | None = None


def _parent(site: Site) -> str:
  return _PLACES[site.name][0].format(layer=site.layer)


def _join(*parts: str) -> str:
  return '/'.join(part for part in parts if part)


def adapter_scope(site: Site) -> str:
  """'/'-joined path of the parameters a method keeps for `site`."""
  return _join(_parent(site), ADAPTER_PREFIX + site.name)


def base_kernels(site: Site) -> tuple[str, ...]:
  """Paths of the weights whose flattened (d_in, d_out) matrices, side by side, form the
  map at `site` (for a LayerNorm: its scale, a (d,) vector)."""
  leaf = 'scale' if site.name in _NORMS else 'kernel'
  return tuple(_join(_parent(site), name, leaf) for name in _PLACES[site.name][1])


def base_biases(site: Site) -> tuple[str, ...]:
  """Paths of the biases of the layers at `site` (in `base_kernels`' order)."""
  return tuple(_join(_parent(site), name, 'bias') for name in _PLACES[site.name][1])


def torch_module(site: Site) -> str:
  """Name of the timm module that computes the map at `site`."""
  if site.name not in TORCH_MODULES:
    raise ValueError(f'timm\'s ViT has no separate layer for site {site.name!r} (its q, k and v '
                     f'are one fused `attn.qkv`); sites with a PyTorch layout: '
                     f'{tuple(TORCH_MODULES)}.')
  module = TORCH_MODULES[site.name]
  return module if site.layer is None else f'blocks.{site.layer}.{module}'
