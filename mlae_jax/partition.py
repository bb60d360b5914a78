"""What is trained and what is frozen, decided from parameter paths.

Adapters (any subtree named `adapter_*`) and the classifier `head` are trained;
everything else is the frozen backbone of the pre-trained checkpoint.
"""

from __future__ import annotations

from typing import Any, Mapping

import jax
import numpy as np
from flax import traverse_util

ADAPTER_PREFIX = 'adapter_'
ROLES = ('adapter', 'head', 'backbone')


def param_role(path: str) -> str:
  """'adapter', 'head' or 'backbone' for a '/'-joined parameter path."""
  parts = path.split('/')
  if any(part.startswith(ADAPTER_PREFIX) for part in parts):
    return 'adapter'
  if parts[0] == 'head':
    return 'head'
  return 'backbone'


def param_roles(params: Mapping[str, Any]) -> dict[str, Any]:
  """A tree like `params` whose leaves are their roles."""
  return traverse_util.unflatten_dict(
      {path: param_role(path) for path in traverse_util.flatten_dict(dict(params), sep='/')},
      sep='/')


def count_params(params: Mapping[str, Any]) -> dict[str, int]:
  """Parameter counts by role, plus 'trainable' (adapter + head) and 'total'."""
  counts = dict.fromkeys(ROLES, 0)
  for path, leaf in traverse_util.flatten_dict(dict(params), sep='/').items():
    counts[param_role(path)] += int(np.prod(jax.numpy.shape(leaf)))
  counts['trainable'] = counts['adapter'] + counts['head']
  counts['total'] = counts['trainable'] + counts['backbone']
  return counts


def is_trainable(path: str) -> bool:
  """Adapters and the head are trained; the backbone is frozen."""
  return param_role(path) != 'backbone'


def split_trainable(params: Mapping[str, Any]) -> tuple[dict, dict]:
  """(trainable, frozen) subtrees of `params`, partitioned by path labels."""
  flat = traverse_util.flatten_dict(dict(params), sep='/')
  trainable = {k: v for k, v in flat.items() if is_trainable(k)}
  frozen = {k: v for k, v in flat.items() if not is_trainable(k)}
  return (traverse_util.unflatten_dict(trainable, sep='/'),
          traverse_util.unflatten_dict(frozen, sep='/'))


def combine(*trees: Mapping[str, Any]) -> dict:
  """Joins disjoint subtrees (e.g. the two halves of `split_trainable`) into one."""
  flat = {}
  for tree in trees:
    flat.update(traverse_util.flatten_dict(dict(tree), sep='/'))
  return traverse_util.unflatten_dict(flat, sep='/')
