"""What is trained and what is frozen, decided from parameter paths.

Adapters (any subtree named `adapter_*`) and the classifier `head` are trained;
so are the backbone leaves whose '/'-joined paths match one of the regular expressions
in `tuned` (whole-path matches: a method's `trained_patterns`, e.g. '.*/bias' for
BitFit); everything else is the frozen backbone of the pre-trained checkpoint. Adapter
leaves named `state_*` are a method's state (masks, routing tables set by phases of the
run): they change during a run, so they travel with the trainable subtree and its
checkpoints, but the optimizer leaves them alone and they are not counted as trained.
"""

from __future__ import annotations

import functools
import re
from typing import Any, Collection, Mapping

import jax
import numpy as np
from flax import traverse_util

ADAPTER_PREFIX = 'adapter_'
STATE_PREFIX = 'state_'
ROLES = ('adapter', 'head', 'tuned', 'state', 'backbone')


@functools.lru_cache(maxsize=64)
def _matcher(patterns: tuple[str, ...]) -> re.Pattern | None:
  return re.compile('|'.join(f'(?:{p})' for p in patterns)) if patterns else None


def param_role(path: str, tuned: Collection[str] = ()) -> str:
  """'adapter', 'head', 'tuned' (a backbone leaf trained in place: its path matches a
  pattern of `tuned`), 'state' (a method's untrained state) or 'backbone' for a
  '/'-joined parameter path."""
  parts = path.split('/')
  if any(part.startswith(ADAPTER_PREFIX) for part in parts):
    return 'state' if parts[-1].startswith(STATE_PREFIX) else 'adapter'
  if parts[0] == 'head':
    return 'head'
  matcher = _matcher(tuple(tuned))
  if matcher is not None and matcher.fullmatch(path):
    return 'tuned'
  return 'backbone'


def count_params(params: Mapping[str, Any], tuned: Collection[str] = ()) -> dict[str, int]:
  """Parameter counts by role, plus 'trainable' (adapter + head + tuned) and 'total'
  (every leaf, state included)."""
  counts = dict.fromkeys(ROLES, 0)
  for path, leaf in traverse_util.flatten_dict(dict(params), sep='/').items():
    counts[param_role(path, tuned)] += int(np.prod(jax.numpy.shape(leaf)))
  counts['trainable'] = counts['adapter'] + counts['head'] + counts['tuned']
  counts['total'] = counts['trainable'] + counts['state'] + counts['backbone']
  return counts


def is_trainable(path: str, tuned: Collection[str] = ()) -> bool:
  """Whether the leaf changes during a run: adapters, the head and the `tuned` leaves
  (trained), and methods' state (set by phases); the rest is the frozen backbone."""
  return param_role(path, tuned) != 'backbone'


def split_trainable(params: Mapping[str, Any],
                    tuned: Collection[str] = ()) -> tuple[dict, dict]:
  """(trainable, frozen) subtrees of `params`, partitioned by path labels."""
  flat = traverse_util.flatten_dict(dict(params), sep='/')
  trainable = {k: v for k, v in flat.items() if is_trainable(k, tuned)}
  frozen = {k: v for k, v in flat.items() if not is_trainable(k, tuned)}
  return (traverse_util.unflatten_dict(trainable, sep='/'),
          traverse_util.unflatten_dict(frozen, sep='/'))


def combine(*trees: Mapping[str, Any]) -> dict:
  """Joins disjoint subtrees (e.g. the two halves of `split_trainable`) into one."""
  flat = {}
  for tree in trees:
    flat.update(traverse_util.flatten_dict(dict(tree), sep='/'))
  return traverse_util.unflatten_dict(flat, sep='/')
