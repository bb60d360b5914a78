"""The original checkpoint's key layout: flat '/'-joined paths, pre-Linen numbering.

The ImageNet-21k `.npz` files number the submodules of an encoder block by
creation order across classes (LayerNorm_0, MultiHeadDotProductAttention_1,
LayerNorm_2, MlpBlock_3). Linen numbers per class (LayerNorm_0,
MultiHeadDotProductAttention_0, LayerNorm_1, MlpBlock_0), which is the tree our
model uses. These functions convert between the two, in both directions.
"""

from __future__ import annotations

import re
from typing import Any, Mapping

import numpy as np
from flax import traverse_util

_NUMBERED = re.compile(r'^(?P<cls>[A-Za-z]\w*?)_(?P<index>\d+)$')
# Order in which an original encoder block creates its submodules.
_BLOCK_CLASS_ORDER = ('LayerNorm', 'MultiHeadDotProductAttention', 'LayerNorm', 'MlpBlock')


def flatten(tree: Mapping[str, Any]) -> dict[str, Any]:
  """Nested dict -> {'a/b/c': leaf}."""
  return traverse_util.flatten_dict(dict(tree), sep='/')


def unflatten(flat: Mapping[str, Any]) -> dict[str, Any]:
  """{'a/b/c': leaf} -> nested dict."""
  return traverse_util.unflatten_dict(dict(flat), sep='/')


def _renumber(flat: Mapping[str, Any], mapping_for_scope) -> dict[str, Any]:
  """Renames numbered children of every encoder block with `mapping_for_scope`."""
  out = {}
  scopes: dict[str, list[str]] = {}
  for key in flat:
    parts = key.split('/')
    for depth, part in enumerate(parts[:-1]):
      if part.startswith('encoderblock'):
        scopes.setdefault('/'.join(parts[:depth + 1]), []).append(parts[depth + 1])
  renames = {scope: mapping_for_scope(sorted(set(children)))
             for scope, children in scopes.items()}
  for key, value in flat.items():
    parts = key.split('/')
    for depth, part in enumerate(parts[:-1]):
      scope = '/'.join(parts[:depth + 1])
      if scope in renames:
        parts[depth + 1] = renames[scope].get(parts[depth + 1], parts[depth + 1])
    out['/'.join(parts)] = value
  return out


def _linen_names(children: list[str]) -> dict[str, str]:
  """Global creation indices -> per-class indices, keeping the creation order."""
  numbered = []
  for child in children:
    match = _NUMBERED.match(child)
    if match:
      numbered.append((int(match['index']), match['cls'], child))
  counts: dict[str, int] = {}
  names = {}
  for _, cls, child in sorted(numbered):
    names[child] = f'{cls}_{counts.get(cls, 0)}'
    counts[cls] = counts.get(cls, 0) + 1
  return names


def _pre_linen_names(children: list[str]) -> dict[str, str]:
  """Per-class indices -> the original block's global creation indices."""
  names = {}
  for position, cls in enumerate(_BLOCK_CLASS_ORDER):
    per_class = _BLOCK_CLASS_ORDER[:position].count(cls)
    names[f'{cls}_{per_class}'] = f'{cls}_{position}'
  return {child: names[child] for child in children if child in names}


def is_pre_linen(flat: Mapping[str, Any]) -> bool:
  """Whether the keys use the original (pre-Linen) numbering."""
  return any('/MultiHeadDotProductAttention_1/' in key for key in flat)


def to_linen(flat: Mapping[str, Any]) -> dict[str, Any]:
  """Original checkpoint keys -> our model's keys (no-op if already Linen)."""
  return _renumber(flat, _linen_names) if is_pre_linen(flat) else dict(flat)


def to_pre_linen(flat: Mapping[str, Any]) -> dict[str, Any]:
  """Our model's keys -> the original checkpoint's keys (read by vit_jax and timm)."""
  return dict(flat) if is_pre_linen(flat) else _renumber(flat, _pre_linen_names)


def as_numpy(flat: Mapping[str, Any]) -> dict[str, np.ndarray]:
  return {key: np.asarray(value) for key, value in flat.items()}
