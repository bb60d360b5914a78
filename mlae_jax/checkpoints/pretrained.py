"""Loading an original ViT checkpoint into a (possibly adapted) model."""

from __future__ import annotations

import os
from typing import Any

from flax import linen as nn

import jax
import jax.numpy as jnp
import numpy as np

from mlae_jax.checkpoints import layout
from mlae_jax.checkpoints.npz import CheckpointError, check_finite, read_npz
from mlae_jax.checkpoints.posemb import resize_pos_embedding
from mlae_jax.partition import param_role

POS_EMBEDDING = 'Transformer/posembed_input/pos_embedding'
# Layers of the pre-training task that fine-tuning replaces.
_DISCARDED = ('pre_logits/', 'head/')


def init_params(model: nn.Module, rng: jax.Array, image_size: int = 224) -> dict:
  """Freshly initialised parameters for square images of `image_size`."""
  return jax.jit(model.init)(rng, _dummy_images(image_size, model.patch_size))['params']


def _dummy_images(image_size: int, patch_size: int) -> jax.Array:
  if not isinstance(image_size, int) or isinstance(image_size, bool) or image_size < 1:
    raise ValueError(f'image_size must be an integer >= 1, got {image_size!r}.')
  if image_size % patch_size:
    raise ValueError(f'image_size {image_size} is not a multiple of the patch size '
                     f'{patch_size}: the patches would not tile the image.')
  return jnp.zeros((1, image_size, image_size, 3), jnp.float32)


def load_pretrained(path: str | os.PathLike, model: nn.Module, *, rng: jax.Array,
                    image_size: int = 224, keep_head: bool = False) -> dict:
  """Parameters for `model`: the backbone from `path`, adapters and head fresh.

  `pre_logits` and the pre-training head are dropped and the head is created for
  `model.num_classes` (zero-initialised), unless `keep_head` (for re-reading a
  fine-tuned export, whose head must then fit). The position embeddings are resized
  if `image_size` differs from the checkpoint's. A file that does not fit the model
  raises CheckpointError naming the missing, unexpected and mis-shaped keys.
  """
  discarded = ('pre_logits/',) if keep_head else _DISCARDED
  loaded = {key: value for key, value in layout.to_linen(read_npz(path)).items()
            if not key.startswith(discarded)}
  images = _dummy_images(image_size, model.patch_size)
  shapes = layout.flatten(jax.eval_shape(model.init, rng, images)['params'])
  kept = ('backbone', 'head') if keep_head else ('backbone',)
  expected = {key: leaf.shape for key, leaf in shapes.items() if param_role(key) in kept}
  posemb, want = loaded.get(POS_EMBEDDING), expected.get(POS_EMBEDDING)
  if (posemb is not None and want is not None and posemb.shape != want
      and posemb.ndim == 3 and posemb.shape[-1] == want[-1]):
    loaded[POS_EMBEDDING] = resize_pos_embedding(posemb, want[1])
  _check_fits(loaded, expected, path, model)
  check_finite(loaded, path)

  def fresh_leaves(key):  # Only adapters and head: XLA drops the backbone's init.
    params = layout.flatten(model.init(key, images)['params'])
    return {k: v for k, v in params.items() if param_role(k) not in kept}

  params = dict(jax.jit(fresh_leaves)(rng))
  for key, value in loaded.items():
    params[key] = jnp.asarray(value, dtype=shapes[key].dtype)
  return layout.unflatten(params)


def _check_fits(loaded: dict[str, np.ndarray], expected: dict[str, tuple], path: Any,
                model: nn.Module) -> None:
  missing = sorted(set(expected) - set(loaded))
  unexpected = sorted(set(loaded) - set(expected))
  misshaped = sorted(key for key in set(loaded) & set(expected)
                     if tuple(loaded[key].shape) != tuple(expected[key]))
  if not (missing or unexpected or misshaped):
    return
  lines = [f'Checkpoint {os.fspath(path)} does not fit the model (patch {model.patch_size}, '
           f'hidden {model.hidden_size}, mlp {model.mlp_dim}, heads {model.num_heads}, '
           f'layers {model.num_layers}). Choose the model that matches the file '
           '(e.g. ViT-B_16.npz needs ViT-B_16).']
  for title, keys, describe in (
      ('missing from the file', missing, lambda k: k),
      ('not in the model', unexpected, lambda k: k),
      ('with the wrong shape (file vs model)', misshaped,
       lambda k: f'{k}: {tuple(loaded[k].shape)} vs {tuple(expected[k])}')):
    if keys:
      shown = [describe(k) for k in keys[:8]]
      more = f' ... and {len(keys) - 8} more' if len(keys) > 8 else ''
      lines.append(f'{len(keys)} keys {title}: ' + '; '.join(shown) + more + '.')
  raise CheckpointError(' '.join(lines))
