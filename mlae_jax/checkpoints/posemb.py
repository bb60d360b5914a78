"""Resizing position embeddings to another image size, as vit_jax does."""

from __future__ import annotations

import numpy as np
import scipy.ndimage


def resize_pos_embedding(posemb: np.ndarray, num_tokens: int) -> np.ndarray:
  """(1, 1 + g*g, d) -> (1, num_tokens, d), bilinear on the patch grid.

  The class token's embedding is kept apart; the square grid is zoomed with
  linear interpolation (scipy.ndimage.zoom, order 1), vit_jax's method.
  """
  cls_emb, grid = posemb[:, :1], posemb[0, 1:]
  old, new = _side(grid.shape[0]), _side(num_tokens - 1)
  grid = grid.reshape(old, old, -1)
  grid = scipy.ndimage.zoom(grid, (new / old, new / old, 1), order=1)
  return np.concatenate([cls_emb, grid.reshape(1, new * new, -1)], axis=1).astype(posemb.dtype)


def _side(count: int) -> int:
  side = int(round(count ** 0.5))
  if side * side != count:
    raise ValueError(f'{count} patch positions do not form a square grid.')
  return side
