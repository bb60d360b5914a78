"""Random-valued checkpoints in the exact key layout of the original ViT `.npz` files.

Written from the published layout (pre-Linen numbering, pre_logits, a 21,843-class
head), independently of the package's own layout code, so loading them tests it.
"""

from __future__ import annotations

import numpy as np


def original_vit_shapes(hidden: int, mlp: int, heads: int, layers: int, patch: int,
                        image_size: int = 224, head_classes: int = 21843,
                        pre_logits: bool = True) -> dict[str, tuple[int, ...]]:
  head_dim = hidden // heads
  tokens = 1 + (image_size // patch) ** 2
  shapes = {
      'embedding/kernel': (patch, patch, 3, hidden),
      'embedding/bias': (hidden,),
      'cls': (1, 1, hidden),
      'Transformer/posembed_input/pos_embedding': (1, tokens, hidden),
      'Transformer/encoder_norm/scale': (hidden,),
      'Transformer/encoder_norm/bias': (hidden,),
      'head/kernel': (hidden, head_classes),
      'head/bias': (head_classes,),
  }
  if pre_logits:
    shapes['pre_logits/kernel'] = (hidden, hidden)
    shapes['pre_logits/bias'] = (hidden,)
  for i in range(layers):
    block = f'Transformer/encoderblock_{i}'
    for norm in ('LayerNorm_0', 'LayerNorm_2'):
      shapes[f'{block}/{norm}/scale'] = (hidden,)
      shapes[f'{block}/{norm}/bias'] = (hidden,)
    for proj in ('query', 'key', 'value'):
      shapes[f'{block}/MultiHeadDotProductAttention_1/{proj}/kernel'] = (hidden, heads, head_dim)
      shapes[f'{block}/MultiHeadDotProductAttention_1/{proj}/bias'] = (heads, head_dim)
    shapes[f'{block}/MultiHeadDotProductAttention_1/out/kernel'] = (heads, head_dim, hidden)
    shapes[f'{block}/MultiHeadDotProductAttention_1/out/bias'] = (hidden,)
    shapes[f'{block}/MlpBlock_3/Dense_0/kernel'] = (hidden, mlp)
    shapes[f'{block}/MlpBlock_3/Dense_0/bias'] = (mlp,)
    shapes[f'{block}/MlpBlock_3/Dense_1/kernel'] = (mlp, hidden)
    shapes[f'{block}/MlpBlock_3/Dense_1/bias'] = (hidden,)
  return shapes


# ViT-B/16 as released: hidden 768, MLP 3072, 12 heads, 12 blocks, patch 16.
B16 = dict(hidden=768, mlp=3072, heads=12, layers=12, patch=16)


def random_arrays(shapes: dict[str, tuple[int, ...]], seed: int = 0) -> dict[str, np.ndarray]:
  """Values of a plausible scale: LayerNorm scales near 1, weights ~ 1/sqrt(fan_in)."""
  rng = np.random.default_rng(seed)
  arrays = {}
  for key, shape in shapes.items():
    if key.endswith('/scale'):
      value = 1.0 + 0.1 * rng.standard_normal(shape)
    elif key.endswith('/kernel'):
      fan_in = shape[0] if not key.endswith('out/kernel') else shape[0] * shape[1]
      if key == 'embedding/kernel':
        fan_in = shape[0] * shape[1] * shape[2]
      value = rng.standard_normal(shape) / np.sqrt(fan_in)
    else:
      value = 0.02 * rng.standard_normal(shape)
    arrays[key] = value.astype(np.float32)
  return arrays


def write_original_npz(path, seed: int = 0, **size) -> dict[str, np.ndarray]:
  """Writes a random checkpoint of `size` (see original_vit_shapes); returns it."""
  arrays = random_arrays(original_vit_shapes(**size), seed)
  np.savez(path, **arrays)
  return arrays
