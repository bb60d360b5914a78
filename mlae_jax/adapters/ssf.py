"""SSF: scaling and shifting the features (Lian et al., NeurIPS 2022).

After each adapted operation, every output channel is scaled and shifted by trained
vectors: y' = gamma * y + beta. Being affine per channel, it folds into the operation
itself (kernel' = kernel * gamma column-wise, bias' = gamma * bias + beta), so the
merged model costs the plain ViT.

Facts from the reference, dongzelian/SSF:
  - models/vision_transformer.py (`tuning_mode == 'ssf'`): `ssf_ada(x, scale, shift)`
    = x * scale + shift over the last (channel) axis, applied after the patch
    embedding's projection (PatchEmbed.ssf_*_1; the ViT has no patch norm, so no
    ssf_*_2), after norm1 and norm2 (Block.ssf_*_1/2), after qkv (Attention.ssf_*_1,
    3d channels of the fused q|k|v output) and proj (Attention.ssf_*_2), after fc1
    and fc2 (Mlp.ssf_*_1/2), and after the final norm (VisionTransformer.ssf_*_1).
    In our site names: 'embedding', 'ln1', 'qkv', 'out', 'ln2', 'fc1', 'fc2',
    'encoder_norm' (the default targets).
  - same file, `init_ssf_scale_shift`: scale ~ N(1, 0.02), shift ~ N(0, 0.02).
  - optim_factory.py (`create_optimizer_v2`, tuning_mode 'ssf'): only the ssf scales
    and shifts and the head train; every backbone weight is frozen.
  - train_scripts/vit/vtab/*/train_ssf.sh: AdamW, 100 epochs (10 of warm-up), batch
    32 per GPU on two GPUs; learning rate and weight decay per task: lr 5e-3 for 11 of
    the 19 tasks (others 1e-3 to 5e-2), weight decay 5e-5 for 14 of 19 (others 5e-2).
    RECIPE holds those representative values (5e-3, 5e-5, 100), not a per-task table.
Count at ViT-B/16: 12 blocks x 2 x (768 + 2304 + 768 + 768 + 3072 + 768) + 2 x 2 x 768
= 205,824; the paper's 0.24 M for VTAB-1k includes the head averaged over the 19 tasks
(940 classes in all, 769 x 940 / 19 = 38,046 per task: 0.244 M).
Beyond the reference: SSF may also sit on the separate 'query', 'key', 'value' sites
(the reference has only the fused qkv), with one (gamma, beta) of each map's width.
"""

from __future__ import annotations

import dataclasses
import math
from typing import Any, ClassVar, Mapping

import jax
import jax.numpy as jnp
from flax import linen as nn

from mlae_jax.adapters.method import Method, ModelInfo, SiteCall, is_number
from mlae_jax.adapters.sites import DENSE_SITES, NORM_SITES, Site

# The reference's placements in the ViT, in our site names.
REFERENCE_TARGETS = ('embedding', 'ln1', 'qkv', 'out', 'ln2', 'fc1', 'fc2', 'encoder_norm')


def _normal(mean: float, stddev: float):
  def init(key, shape, dtype):
    return mean + stddev * jax.random.normal(key, shape, dtype)
  return init


class ScaleShift(nn.Module):
  """gamma * y + beta over the last axis; gamma ~ N(1, std), beta ~ N(0, std)."""
  features: int
  init_std: float
  dtype: Any = jnp.float32
  param_dtype: Any = jnp.float32

  @nn.compact
  def __call__(self, y: jax.Array) -> jax.Array:
    scale = self.param('scale', _normal(1.0, self.init_std), (self.features,), self.param_dtype)
    shift = self.param('shift', _normal(0.0, self.init_std), (self.features,), self.param_dtype)
    return y * scale.astype(self.dtype) + shift.astype(self.dtype)


@dataclasses.dataclass(frozen=True)
class Ssf(Method):
  """SSF. Fields beyond `Method`'s:

    targets: the operations whose outputs are scaled and shifted: dense maps
      ('qkv' or 'query'/'key'/'value', 'out', 'fc1', 'fc2'), the block LayerNorms
      ('ln1', 'ln2'), the patch embedding ('embedding') and the final LayerNorm
      ('encoder_norm'). Default: every placement of the reference ViT.
    init_std: standard deviation of the initial scale (around 1) and shift (around 0).
  """
  NAME: ClassVar[str] = 'ssf'
  SITES: ClassVar[tuple[str, ...]] = DENSE_SITES + NORM_SITES + ('embedding', 'encoder_norm')
  MERGEABLE: ClassVar[bool] = True
  RECIPE: ClassVar[Mapping[str, Any]] = {'learning_rate': 5e-3, 'weight_decay': 5e-5,
                                         'epochs': 100}

  targets: tuple[str, ...] = REFERENCE_TARGETS
  init_std: float = 0.02

  def validate(self) -> None:
    super().validate()
    std = self.init_std
    if not (is_number(std) and math.isfinite(std) and std >= 0):
      self.fail(f'init_std must be a number >= 0 (the reference: 0.02), got {std!r}.')

  def adapt(self, site: Site, call: SiteCall, shared: Any, info: ModelInfo, *, train: bool,
            name: str) -> jax.Array:
    return ScaleShift(call.y.shape[-1], float(self.init_std), info.dtype, info.param_dtype,
                      name=name)(call.y)

  def merge(self, site: Site, params: Mapping[str, Any], shared: Any, kernel: jax.Array,
            bias: jax.Array) -> tuple[jax.Array, jax.Array]:
    """gamma (W x + b) + beta = (W gamma) x + (gamma b + beta): every column of the
    kernel (a LayerNorm's scale as (1, d)) scaled, the bias scaled and shifted."""
    scale, shift = jnp.asarray(params['scale']), jnp.asarray(params['shift'])
    return (kernel * scale.astype(kernel.dtype),
            (bias * scale + shift).astype(bias.dtype))
