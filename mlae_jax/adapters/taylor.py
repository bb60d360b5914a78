"""First-order Taylor importance of groups of parameters (heads, adapters), for the
scoring phases of HEAT and Pear.

Removing a group (setting its parameters to zero) changes the loss by about
-sum_{p in group} theta_p dL/dtheta_p (the first-order Taylor expansion around the
current parameters); the importance of the group is the magnitude of that sum, averaged
over batches (Molchanov et al., CVPR 2019, "Importance Estimation for Neural Network
Pruning", the criterion HEAT's and Pear's abstracts name).
"""

from __future__ import annotations

from typing import Any, Callable, Iterable, Mapping

import jax
import jax.numpy as jnp
import numpy as np

from mlae_jax.checkpoints.layout import flatten


def taylor_scores(params: Any, gradients: Iterable[Any],
                  group_sums: Callable[[Mapping[str, jax.Array]], jax.Array]) -> np.ndarray:
  """Mean over the gradient batches of |group_sums(theta * g)|.

  `params` and each of `gradients` (iterated once) are parameter trees of the same
  structure; `group_sums` maps the flat tree ('/'-joined paths) of elementwise products
  theta * dL/dtheta to an array with one summed entry per group (e.g. per head)."""
  flat = flatten(params)
  scores = []
  for gradient in gradients:
    grads = flatten(gradient)
    products = {path: jnp.asarray(value, jnp.float32) * jnp.asarray(grads[path], jnp.float32)
                for path, value in flat.items() if path in grads}
    scores.append(np.abs(np.asarray(group_sums(products), np.float64)))
  if not scores:
    raise ValueError('A Taylor score needs the gradients of at least one batch.')
  return np.mean(scores, axis=0)
