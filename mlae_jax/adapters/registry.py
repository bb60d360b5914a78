"""Every method by name, and the `config.adapter` group derived from their dataclasses."""

from __future__ import annotations

import dataclasses
import types
import typing
from typing import Any, Mapping

import ml_collections
from ml_collections.config_dict import placeholder

from mlae_jax.adapters.bottleneck import AdaptFormer, Adapter
from mlae_jax.adapters.dmlora import DmLora
from mlae_jax.adapters.fact import FactTK, FactTT
from mlae_jax.adapters.heat import Heat
from mlae_jax.adapters.lily import Lily
from mlae_jax.adapters.low_rank import Lora, Mlae
from mlae_jax.adapters.method import Method
from mlae_jax.adapters.neat import Neat
from mlae_jax.adapters.pear import Pear
from mlae_jax.adapters.repadapter import RepAdapter
from mlae_jax.adapters.selection import BitFit, FullFineTuning, LinearProbe
from mlae_jax.adapters.ssf import Ssf
from mlae_jax.adapters.vpt import VptDeep

# Adding a method: its module under adapters/, and its class here.
METHODS: dict[str, type[Method]] = {cls.NAME: cls for cls in (
    Mlae, Lora, LinearProbe, FullFineTuning, BitFit, VptDeep, Adapter, AdaptFormer, Ssf,
    FactTT, FactTK, RepAdapter, Lily, Neat, DmLora, Heat, Pear)}


def get_method(name: str) -> type[Method]:
  """The method class registered as `name`."""
  if name not in METHODS:
    raise ValueError(f'Unknown method {name!r}; choose one of {tuple(METHODS)}.')
  return METHODS[name]


def create(name: str, fields: Mapping[str, Any] | None = None) -> Method:
  """The method `name` with `fields` (others at their defaults); unknown fields are an
  error naming them."""
  cls = get_method(name)
  known = {f.name for f in dataclasses.fields(cls)}
  fields = dict(fields or {})
  unknown = sorted(set(fields) - known)
  if unknown:
    raise ValueError(f'Bad {name} config: unknown fields {unknown}; its fields are '
                     f'{sorted(known)}.')
  return cls(**fields)


def from_description(description: Mapping[str, Any] | None) -> Method | None:
  """The method of `Method.describe()`'s output (None for None)."""
  if description is None:
    return None
  fields = dict(description)
  return create(fields.pop('method'), fields)


def config_group(method: str = 'mlae') -> ml_collections.ConfigDict:
  """`config.adapter`: the chosen method's name and one sub-group per method, holding
  its dataclass fields at their defaults (None ones as typed placeholders, so the
  command line can set them)."""
  group = ml_collections.ConfigDict()
  group.method = method
  for name, cls in METHODS.items():
    hints = typing.get_type_hints(cls)
    sub = ml_collections.ConfigDict()
    for field in dataclasses.fields(cls):
      sub[field.name] = (placeholder(_optional_type(hints[field.name]))
                         if field.default is None else field.default)
    group[name] = sub
  return group


def from_config_group(group: ml_collections.ConfigDict) -> Method:
  """The Method a `config.adapter` group selects."""
  name = group.get('method')
  if name not in METHODS:
    raise ValueError(f'Bad config value config.adapter.method = {name!r}: use one of '
                     f'{tuple(METHODS)}.')
  if name not in group:
    raise ValueError(f'Bad config: config.adapter has no group {name!r}.')
  try:
    return create(name, group[name].to_dict())
  except ValueError as error:
    raise ValueError(f'{error} (config.adapter.{name})') from None


def _optional_type(hint: Any) -> type:
  args = [a for a in typing.get_args(hint) if a is not type(None)]
  if typing.get_origin(hint) in (typing.Union, types.UnionType) and len(args) == 1:
    return args[0]
  raise TypeError(f'Cannot derive a config placeholder from {hint!r}.')
