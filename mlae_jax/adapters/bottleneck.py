"""Bottleneck adapters on the MLP branch: the sequential Adapter and AdaptFormer.

Both add a small down -> nonlinearity -> dropout -> up map per block at the 'mlp' site
(`call.x` is the residual stream entering the MLP branch, `call.y` the MLP's output
after the block's drop path, `drop_path(mlp(ln2(x)))`; the site's result is added to
x). Because the site follows drop path, Adapter's `y + f(y)` is NOAH's
`adapter(drop_path(mlp(norm2(x))))` and AdaptFormer's `y + s f(x)` is PETL-ViT's
`drop_path(mlp(norm2(x))) + s adapter(x)` (adapter outside drop path): both match
their references in every mode, drop path on or off, training or evaluation. Neither
can be merged: the update is a nonlinear function of the tokens.

Adapter (NAME 'adapter'), the "Adapter" row of the NOAH / SPT / MLAE VTAB-1k tables,
as NOAH trains it:
  - placement: `x + adapter(drop_path(mlp(norm2(x))))` with `adapter(h) = h +
    up(drop(act(down(h))))`: it reads the MLP output and carries its own residual
    (ZhangYuanhan-AI/NOAH: model/supernet_vision_transformer_timm.py `Block.forward`,
    model/module/adapter_super.py `AdapterSuper.forward`, `identity = x`).
  - activation QuickGELU, x * sigmoid(1.702 x); dropout after it, p = 0.1
    (`--drop_rate_adapter` default in supernet_train_prompt.py); biases on both maps.
  - bottleneck 8 in every block (experiments/Adapter/ViT-B_prompt_adapter_8.yaml).
  - init: AdapterSuper sets xavier-uniform weights and N(0, 1e-6) biases, but the
    VisionTransformer constructor then runs `self.init_weights('')`, which applies
    `_init_vit_weights` to every nn.Linear: trunc_normal(std 0.02, cut at +-2 absolute,
    i.e. effectively untruncated) weights and zero biases. The VTAB runs load the
    backbone with `load_checkpoint(strict=False)`, which leaves the adapter as that
    re-initialisation made it, so this module uses N(0, 0.02) kernels and zero biases
    for both maps (the up map is not zero: the adapter perturbs the features from
    step 0, as in the reference's training).
  - recipe: lr 5e-3, weight decay 1e-4, 100 epochs
    (configs/Adapter/VTAB/slurm_train_adapter_vtab.sh).
  - drop path: NOAH's order exactly (the adapter reads the dropped, rescaled MLP
    output, so a dropped example still adds f(0)); the 'mlp' site's y is that output.

AdaptFormer (NAME 'adaptformer'), the parallel scaled bottleneck:
  - placement: `x + drop_path(mlp(norm2(x))) + s * up(drop(relu(down(x))))`: it reads
    the residual stream x (not norm2(x)) and is added outside drop path
    (JieShibo/PETL-ViT: binary_adapter/adaptformer.py `forward_block`;
    ShoufaChen/AdaptFormer: models/custom_modules.py `Block.forward`, 'parallel' with
    `ffn_adapter_layernorm_option='none'` in main_image.py).
  - activation ReLU, dropout 0.1 after it (both references).
  - init: down kaiming_uniform(a=sqrt(5)) (torch's nn.Linear default in PETL-ViT,
    explicit 'lora' init in ShoufaChen/AdaptFormer models/adapter.py), up zeros, biases
    zero, so the model starts as the backbone.
  - biases: ShoufaChen/AdaptFormer's maps have them (12 x 12,296 = 156,768 parameters
    at bottleneck 8 on ViT-B/16, the 0.16 M the VTAB tables print); PETL-ViT's
    full-precision layer (`bit == 32`) has none (147,456). `bias` chooses; True by
    default, to match the printed count.
  - scale s: PETL-ViT main.py's `--scale` default 1.0 (its per-task configs choose from
    {0.01, 0.1, 1, 10}; ShoufaChen/AdaptFormer uses 0.1).
  - recipe: PETL-ViT binary_adapter/main.py: AdamW lr 1e-3, weight decay 1e-4, 100
    epochs.
  - drop path: as in the references, only the MLP branch is dropped; the adapter term
    s f(x) is added outside drop path (the 'mlp' site's y is already dropped).
"""

from __future__ import annotations

import dataclasses
from typing import Any, Callable, ClassVar, Mapping

import jax
import jax.numpy as jnp
from flax import linen as nn

from mlae_jax.adapters.method import Method, ModelInfo, SiteCall
from mlae_jax.adapters.products import up_project_dot_general
from mlae_jax.adapters.sites import Site

Initializer = Callable[..., jax.Array]


def quick_gelu(x: jax.Array) -> jax.Array:
  """CLIP's QuickGELU, x * sigmoid(1.702 x) (NOAH's adapter activation)."""
  return x * jax.nn.sigmoid(1.702 * x)


# torch's kaiming_uniform_(a=sqrt(5)) of an (r, d_in) weight is U(+-1/sqrt(d_in)); on a
# flax (d_in, r) kernel the fan-in is the first axis.
_kaiming_uniform_kernel = nn.initializers.variance_scaling(1.0 / 3.0, 'fan_in', 'uniform',
                                                           in_axis=-2, out_axis=-1)


class Bottleneck(nn.Module):
  """up(dropout(act(down(x)))): the two dense maps of a bottleneck adapter (up's product
  through `up_project`)."""
  features: int
  bottleneck: int
  activation: Callable[[jax.Array], jax.Array]
  dropout: float
  use_bias: bool
  down_init: Initializer
  up_init: Initializer
  dtype: Any = None
  param_dtype: Any = jnp.float32

  @nn.compact
  def __call__(self, x: jax.Array, *, train: bool) -> jax.Array:
    dense = dict(use_bias=self.use_bias, bias_init=nn.initializers.zeros, dtype=self.dtype,
                 param_dtype=self.param_dtype)
    hidden = nn.Dense(self.bottleneck, kernel_init=self.down_init, name='down', **dense)(x)
    hidden = self.activation(hidden)
    if train and self.dropout > 0:
      hidden = nn.Dropout(self.dropout, deterministic=False)(hidden)
    return nn.Dense(self.features, kernel_init=self.up_init, dot_general=up_project_dot_general,
                    name='up', **dense)(hidden)


@dataclasses.dataclass(frozen=True)
class BottleneckMethod(Method):
  """Fields shared by the bottleneck adapters (and those of `Method`):

    targets: ('mlp',), the block's MLP branch (the only site they act on).
    bottleneck: width of the hidden layer.
    dropout: dropout probability on the hidden activations, in training.
  """
  SITES: ClassVar[tuple[str, ...]] = ('mlp',)
  MERGEABLE: ClassVar[bool] = False

  targets: tuple[str, ...] = ('mlp',)
  bottleneck: int = 8
  dropout: float = 0.1

  def validate(self) -> None:
    super().validate()
    self.check_integer('bottleneck', hint='the hidden width')
    self.check_fraction('dropout')

  def layer(self, info: ModelInfo, *, name: str) -> Bottleneck:
    """The bottleneck module of one block."""
    raise NotImplementedError


@dataclasses.dataclass(frozen=True)
class Adapter(BottleneckMethod):
  """The sequential (Houlsby-style) adapter as NOAH trains it: the MLP output h
  becomes h + up(drop(QuickGELU(down(h)))), with N(0, 0.02) kernels and zero biases
  (NOAH's re-initialisation; see the module docstring)."""
  NAME: ClassVar[str] = 'adapter'
  RECIPE: ClassVar[Mapping[str, Any]] = {'learning_rate': 5e-3, 'weight_decay': 1e-4,
                                         'epochs': 100}

  def layer(self, info: ModelInfo, *, name: str) -> Bottleneck:
    normal = nn.initializers.normal(stddev=0.02)
    return Bottleneck(info.hidden_size, self.bottleneck, quick_gelu, float(self.dropout), True,
                      normal, normal, info.dtype, info.param_dtype, name=name)

  def adapt(self, site: Site, call: SiteCall, shared: Any, info: ModelInfo, *, train: bool,
            name: str) -> jax.Array:
    return call.y + self.layer(info, name=name)(call.y, train=train)


@dataclasses.dataclass(frozen=True)
class AdaptFormer(BottleneckMethod):
  """AdaptFormer: the MLP output gains s * up(drop(ReLU(down(x)))) of the residual
  stream x, down Kaiming-uniform, up zero. Fields beyond `BottleneckMethod`'s:

    scale: the constant s on the adapter's output.
    bias: give both maps a bias (ShoufaChen/AdaptFormer; PETL-ViT has none).
  """
  NAME: ClassVar[str] = 'adaptformer'
  RECIPE: ClassVar[Mapping[str, Any]] = {'learning_rate': 1e-3, 'weight_decay': 1e-4,
                                         'epochs': 100}

  scale: float = 1.0
  bias: bool = True

  def validate(self) -> None:
    super().validate()
    self.check_finite('scale')
    self.check_flag('bias')

  def layer(self, info: ModelInfo, *, name: str) -> Bottleneck:
    return Bottleneck(info.hidden_size, self.bottleneck, nn.relu, float(self.dropout),
                      self.bias, _kaiming_uniform_kernel, nn.initializers.zeros, info.dtype,
                      info.param_dtype, name=name)

  def adapt(self, site: Site, call: SiteCall, shared: Any, info: ModelInfo, *, train: bool,
            name: str) -> jax.Array:
    delta = self.layer(info, name=name)(call.x, train=train)
    return call.y + jnp.asarray(self.scale, delta.dtype) * delta
