"""Methods that add nothing and only choose what trains: linear probing, full
fine-tuning and BitFit (VPT's `src/models/vit_models.py` transfer types 'linear',
'end2end' and 'tinytl-bias'). The head trains in every method."""

from __future__ import annotations

import dataclasses
from typing import Any, ClassVar, Mapping

from mlae_jax.adapters.method import PEFT_RECIPE, Method


@dataclasses.dataclass(frozen=True)
class LinearProbe(Method):
  """The head alone, on the frozen class token."""
  NAME: ClassVar[str] = 'linear_probe'
  MERGEABLE: ClassVar[bool] = True
  RECIPE: ClassVar[Mapping[str, Any]] = PEFT_RECIPE


@dataclasses.dataclass(frozen=True)
class FullFineTuning(Method):
  """Every parameter of the backbone (85.8 M at ViT-B/16), and the head."""
  NAME: ClassVar[str] = 'full'
  MERGEABLE: ClassVar[bool] = True
  # Full fine-tuning at the PEFT learning rate diverges; the PEFT papers' full rows
  # come from VPT's grid (SGD); AdamW at 1e-4 is the common substitute.
  RECIPE: ClassVar[Mapping[str, Any]] = {**PEFT_RECIPE, 'learning_rate': 1e-4}

  train: tuple[str, ...] = ('.*',)


@dataclasses.dataclass(frozen=True)
class BitFit(Method):
  """Every bias of the backbone (those of the dense layers, the LayerNorms and the patch
  embedding: 102,912 at ViT-B/16), and the head."""
  NAME: ClassVar[str] = 'bitfit'
  MERGEABLE: ClassVar[bool] = True
  RECIPE: ClassVar[Mapping[str, Any]] = PEFT_RECIPE

  train: tuple[str, ...] = ('.*/bias',)
