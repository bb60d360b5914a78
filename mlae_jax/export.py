"""What a finished run leaves behind for others to use.

- Adapter export: the trained leaves only (the method's parameters + head, and the
  backbone leaves it trains in place; ~1 MB for MLAE on ViT-B/16) in `adapter.npz`,
  and `adapter_config.json` saying model, method (all its fields) and classes.
  `load_adapter_export` rebuilds the model from them.
- Merged export: the plain ViT with the method folded in, as an `.npz` in the
  original checkpoint layout (pre-Linen names), which our loader and timm read; only
  for mergeable methods.
"""

from __future__ import annotations

import os
from typing import Any

import jax
import numpy as np

from mlae_jax.adapters.merge import merge_adapters
from mlae_jax.adapters.registry import from_description
from mlae_jax.checkpoints import layout
from mlae_jax.checkpoints.npz import check_finite, read_npz, write_npz
from mlae_jax.files import read_json, write_json
from mlae_jax.checkpoints.pretrained import load_pretrained
from mlae_jax.model.vit import VisionTransformer
from mlae_jax.partition import combine, is_trainable, split_trainable

ADAPTER_FILE = 'adapter.npz'
CONFIG_FILE = 'adapter_config.json'
_MODEL_FIELDS = ('num_classes', 'patch_size', 'hidden_size', 'mlp_dim', 'num_heads',
                 'num_layers', 'gelu_approximate', 'drop_path_rate')


def export_adapters(directory: str, model: VisionTransformer, params: Any,
                    extra: dict[str, Any] | None = None) -> None:
  """Writes `adapter.npz` and `adapter_config.json` into `directory`."""
  trainable, _ = split_trainable(params, model.adapter.trained_patterns(model.num_layers))
  write_npz(os.path.join(directory, ADAPTER_FILE),
            layout.as_numpy(layout.flatten(trainable)))
  description = {
      'model': {field: getattr(model, field) for field in _MODEL_FIELDS},
      'adapter': model.adapter.describe(),
      **(extra or {}),
  }
  write_json(os.path.join(directory, CONFIG_FILE), description)


def load_adapter_export(directory: str, pretrained: str, *,
                        rng: jax.Array | None = None) -> tuple[VisionTransformer, dict]:
  """The model and parameters of an adapter export, with its backbone read from the
  pre-trained checkpoint `pretrained` it was trained on."""
  description = read_json(os.path.join(directory, CONFIG_FILE))
  model = VisionTransformer(**description['model'],
                            adapter=from_description(description['adapter']))
  params = load_pretrained(pretrained, model, rng=rng if rng is not None else jax.random.key(0),
                           image_size=description.get('image_size', 224))
  trained = read_npz(os.path.join(directory, ADAPTER_FILE))
  check_finite(trained, os.path.join(directory, ADAPTER_FILE))
  tuned = model.adapter.trained_patterns(model.num_layers)
  _, frozen = split_trainable(params, tuned)
  expected = {k for k in layout.flatten(params) if is_trainable(k, tuned)}
  if set(trained) != expected:
    raise ValueError(f'{directory}/{ADAPTER_FILE} does not match {CONFIG_FILE}: missing '
                     f'{sorted(expected - set(trained))[:5]}, unexpected '
                     f'{sorted(set(trained) - expected)[:5]}.')
  return model, combine(layout.unflatten(trained), frozen)


def export_merged(path: str, model: VisionTransformer, params: Any) -> None:
  """Writes the merged plain ViT (head included) in the original `.npz` layout (raises
  NotMergeable for a method that cannot be merged)."""
  _, merged = merge_adapters(model, params)
  flat = layout.to_pre_linen(layout.as_numpy(layout.flatten(merged)))
  write_npz(path, {key: value.astype(np.float32) for key, value in flat.items()})
