"""Parameter cosine similarity between the experts of each adapted layer (MLAE
paper, section 4.3 and appendix A.4).

Expert i of a layer is the rank-1 (d_in, d_out) matrix E_i = c_i a_i b_i^T, where
a_i is row i of A (r, d_in), b_i row i of B (r, d_out) and c_i the expert's
eval-time coefficient; the layer's update is dW = sum_i E_i. The paper flattens
each E_i and takes the cosine similarity of every pair of experts in a block,
then averages over the blocks. For LoRA, E_i is "column i of B times row i of A"
in the paper's (d_out, r) x (r, d_in) notation, which is outer(a_i, b_i) here
(LoRA's A and B are stored as MLAE's).

Coefficients: cosine similarity ignores each matrix's scale, so |c_i| cancels and
only its sign counts: cos(E_i, E_j) = sign(c_i c_j) cos(a_i b_i^T, a_j b_j^T).
By default (`include_coeff=True`) the sign is kept, i.e. the measure is taken on
the experts as they enter dW. LoRA's alpha / r is one positive constant for every
expert, so it never changes the result.

Nothing of size d_in x d_out is formed: the Frobenius inner product of two outer
products factorises, <a_i b_i^T, a_j b_j^T> = (a_i . a_j)(b_i . b_j), and
|a_i b_i^T| = |a_i| |b_i|, so an r x r matrix costs two Gram matrices.
"""

from __future__ import annotations

import dataclasses
import json
import os
from typing import Mapping

import numpy as np
from numpy.typing import ArrayLike

from mlae_jax.adapters.low_rank import LowRank
from mlae_jax.adapters.merge import subtree
from mlae_jax.adapters.registry import from_description
from mlae_jax.adapters.sites import adapter_scope
from mlae_jax.checkpoints.layout import flatten, unflatten
from mlae_jax.checkpoints.npz import read_npz
from mlae_jax.export import ADAPTER_FILE, CONFIG_FILE
from mlae_jax.model.vit import VisionTransformer


def expert_cosine_matrix(a: ArrayLike, b: ArrayLike, coeff: ArrayLike | None = None) -> np.ndarray:
  """(r, r) cosine similarities of the flattened experts c_i outer(a_i, b_i).

  a: (r, d_in); b: (r, d_out); coeff: (r,) or None (every coefficient +1).
  Rows and columns of an all-zero expert (e.g. B still at its zero init, or
  c_i = 0) are NaN: its direction is undefined. Computed in float64.
  """
  a, b = np.asarray(a, np.float64), np.asarray(b, np.float64)
  if a.ndim != 2 or b.ndim != 2 or a.shape[0] != b.shape[0]:
    raise ValueError(f'Expected A (r, d_in) and B (r, d_out), got {a.shape} and {b.shape}.')
  signs = np.ones(a.shape[0]) if coeff is None else np.sign(np.asarray(coeff, np.float64))
  if signs.shape != (a.shape[0],):
    raise ValueError(f'Expected coefficients of shape ({a.shape[0]},), got {signs.shape}.')
  norms = np.linalg.norm(a, axis=1) * np.linalg.norm(b, axis=1) * np.abs(signs)
  with np.errstate(divide='ignore', invalid='ignore'):
    inner = (a @ a.T) * (b @ b.T) * np.outer(signs, signs)
    cosine = inner / np.outer(norms, norms)
  cosine[(norms == 0)[:, None] | (norms == 0)[None, :]] = np.nan
  return np.clip(cosine, -1.0, 1.0)


def off_diagonal_mean(matrix: np.ndarray) -> float:
  """Mean over the pairs i < j that are defined; NaN when there are none."""
  values = matrix[np.triu_indices(matrix.shape[0], k=1)]
  values = values[~np.isnan(values)]
  return float(values.mean()) if values.size else float('nan')


@dataclasses.dataclass(frozen=True)
class ExpertSimilarity:
  """Expert cosine similarities of a model, per adapted layer.

  matrices: (block, target) -> the (r, r) matrix of that layer's experts.
  """
  matrices: dict[tuple[int, str], np.ndarray]

  @property
  def targets(self) -> tuple[str, ...]:
    return tuple(dict.fromkeys(target for _, target in self.matrices))

  def block_means(self, target: str | None = None) -> dict[int, float]:
    """Per block: the mean similarity over its pairs of distinct experts."""
    target = self._target(target)
    return {layer: off_diagonal_mean(m) for (layer, t), m in self.matrices.items()
            if t == target}

  def mean(self, target: str | None = None) -> float:
    """The paper's model-level figure: the mean over blocks of the block means.

    Every block weighs the same, also when blocks hold different numbers of
    experts (fixed masks); blocks with fewer than two defined experts are skipped.
    """
    values = [v for v in self.block_means(target).values() if not np.isnan(v)]
    return float(np.mean(values)) if values else float('nan')

  def stacked(self, target: str | None = None) -> np.ndarray:
    """The matrices of `target` as one (blocks, r, r) array (equal ranks only)."""
    target = self._target(target)
    matrices = [m for (_, t), m in sorted(self.matrices.items()) if t == target]
    if len({m.shape for m in matrices}) != 1:
      raise ValueError('The blocks hold different numbers of experts; use `matrices`.')
    return np.stack(matrices)

  def _target(self, target: str | None) -> str:
    if target is None:
      if len(self.targets) != 1:
        raise ValueError(f'The model adapts {self.targets}; name one target.')
      return self.targets[0]
    if target not in self.targets:
      raise ValueError(f'No adapter on {target!r}; adapted targets: {self.targets}.')
    return target


def expert_similarity(model: VisionTransformer, params: Mapping, *,
                      include_coeff: bool = True) -> ExpertSimilarity:
  """Expert cosine similarities of every adapter of `model` (MLAE or LoRA).

  `params` needs only the adapter leaves (a full tree or an adapter export's).
  `include_coeff=False` measures a_i b_i^T without the coefficients' signs.
  """
  if not isinstance(model.adapter, LowRank):
    raise ValueError(f'Expert similarity is defined for MLAE and LoRA adapters; the model has '
                     f'{model.adapter.NAME if model.adapter else "none"}.')
  flat = flatten(params)
  matrices = {}
  for site in model.adapter.sites(model.num_layers):
    adapter = subtree(flat, adapter_scope(site))
    coeff = np.asarray(model.adapter.coefficients(adapter)) if include_coeff else None
    matrices[site.layer, site.name] = expert_cosine_matrix(adapter['A'], adapter['B'], coeff)
  return ExpertSimilarity(matrices)


def export_similarity(directory: str | os.PathLike, *,
                      include_coeff: bool = True) -> ExpertSimilarity:
  """`expert_similarity` of an adapter export (`<workdir>/export`): reads only
  `adapter.npz` and `adapter_config.json`, no backbone checkpoint."""
  with open(os.path.join(directory, CONFIG_FILE)) as f:
    description = json.load(f)
  model = VisionTransformer(**description['model'],
                            adapter=from_description(description['adapter']))
  params = unflatten(read_npz(os.path.join(directory, ADAPTER_FILE)))
  return expert_similarity(model, params, include_coeff=include_coeff)
