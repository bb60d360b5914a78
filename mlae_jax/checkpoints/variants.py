"""The ViT sizes of the original release, by name."""

from __future__ import annotations

import dataclasses
import re


@dataclasses.dataclass(frozen=True)
class ViTVariant:
  """Shape hyper-parameters of one ViT size (Dosovitskiy et al., table 1)."""
  name: str
  patch_size: int
  hidden_size: int
  mlp_dim: int
  num_heads: int
  num_layers: int


def _variant(size: str, patch: int, hidden: int, mlp: int, heads: int, layers: int) -> ViTVariant:
  return ViTVariant(f'ViT-{size}_{patch}', patch, hidden, mlp, heads, layers)


VARIANTS: dict[str, ViTVariant] = {
    v.name: v for v in (
        _variant('Ti', 16, 192, 768, 3, 12),
        _variant('S', 16, 384, 1536, 6, 12),
        _variant('B', 16, 768, 3072, 12, 12),
        _variant('B', 32, 768, 3072, 12, 12),
        _variant('B', 8, 768, 3072, 12, 12),
        _variant('L', 16, 1024, 4096, 16, 24),
        _variant('L', 32, 1024, 4096, 16, 24),
        _variant('H', 14, 1280, 5120, 16, 32),
    )
}


def get_variant(name: str) -> ViTVariant:
  """Looks a size up by name; accepts 'ViT-B_16', 'ViT-B/16', 'B/16' or 'B_16'."""
  match = re.fullmatch(r'(?:ViT-)?(Ti|S|B|L|H)[_/](\d+)', name.strip())
  canonical = f'ViT-{match.group(1)}_{match.group(2)}' if match else None
  if canonical not in VARIANTS:
    raise ValueError(
        f'Unknown model name {name!r}. Valid names: {", ".join(VARIANTS)} '
        "(also written as 'B/16' or 'ViT-B/16').")
  return VARIANTS[canonical]
