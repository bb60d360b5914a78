"""RepAdapter: a linear adapter before a dense map, re-parameterised into it (Luo et
al., 2023, "Towards Efficient Visual Adaption via Structural Re-parameterization").

The input x of an adapted map x -> x W + b first passes through a purely linear
bottleneck with a residual: x + s * (B(drop(A x + a)) + b_B), with A (d_in -> dim,
bias a), B a grouped map (dim -> d_in in `groups` blocks, bias b_B) and a scale s. No
activation lies between A and B, so in eval mode the adapter is the affine map
x -> x (I + s A B_full) + s (a B_full + b_B) (B_full the block-diagonal (dim, d_in)
matrix of the grouped map), which folds into the map after it:
  W' = (I + s A B_full) W,  b' = b + s (a B_full + b_B) W.
The site's new output is (x + s * (B(drop(A x + a)) + b_B)) W + b, the reference's
order: the adapted input goes through the frozen map in its one product. The model's own
y = x W + b is then unused and XLA drops it, so an adapted map costs the base map plus
the bottleneck (adding (adapter change) W to y instead would cost a second d_in x d_out
product per site).

Facts from the reference, luogen1996/RepAdapter:
  - repadapter.py `RepAdapter`: conv_A = Conv1d(in, hidden_dim, 1, bias) with
    xavier-uniform weight and zero bias; conv_B = Conv1d(hidden_dim, in, 1,
    groups=2, bias) with zero weight and bias; Dropout(0.1) on conv_A's output;
    forward x + scale * conv_B(dropout(conv_A(x))) (the scale multiplies B's bias too).
    Defaults hidden_dim 8, groups 2, scale 1.
  - repadapter.py `forward_vit_block_adapter` / `set_RepAdapter(method='repblock')`: one
    adapter on norm1's output (the input of attention, i.e. of the fused qkv, its only
    use of it) and one on norm2's output (the input of the MLP, i.e. of fc1): our
    'qkv' and 'fc1' sites, the default targets. ('repattn' is targets=('qkv',).)
  - repadapter.py `reparameterize`, `sparse2dense`, `set_RepWeight`: the merge above;
    sparse2dense puts conv_B's group g (rows g*d/groups.., inputs g*dim/groups..) on
    the block diagonal.
  - train.py: trainable are the adapter parameters (with their biases) and the head;
    AdamW lr 1e-3, weight decay 1e-4 (argparse defaults, not overridden by
    scripts/exp.sh), 100 epochs, cosine with 10 warm-up epochs, drop_path_rate 0.1.
  - configs/repblock/<task>.yaml: the scale s per VTAB-1k task (`VTAB_SCALES` below;
    train.py's --scale 0 means "take it from there"). The field's default is the
    layer's own default, 1.
Parameters at ViT-B/16: per adapter 768 x 8 + (8 / 2) x 768 = 9,216 weights (+ 8 + 768
biases = 9,992); two per block: 221,184 weights (the paper's 0.22 M), 239,808 with
biases (what trains).
Deliberate differences: our parameters are matrices, A (d_in, dim) and B (groups,
dim/groups, d_in/groups), not Conv1d weights (the same maps). The reference's block
forward routes the MLP branch through `drop_path1` (timm's two drop paths have the same
rate, so only the random draw differs); ours uses the model's second drop path.
Beyond the reference: any dense site may be a target (the adapter acts on that map's
input); on 'query', 'key', 'value' separately, each gets its own adapter.
"""

from __future__ import annotations

import dataclasses
from typing import Any, ClassVar, Mapping

import jax
import jax.numpy as jnp
from flax import linen as nn

from mlae_jax.adapters.method import Method, ModelInfo, SiteCall
from mlae_jax.adapters.sites import DENSE_SITES, Site

# scale s per VTAB-1k task of the reference's 'repblock' runs (configs/repblock/*.yaml;
# 'cifar' there is cifar100 here).
VTAB_SCALES = {
    'cifar100': 0.1, 'caltech101': 5.0, 'dtd': 1.0, 'oxford_flowers102': 0.5,
    'oxford_iiit_pet': 0.1, 'svhn': 10.0, 'sun397': 0.1, 'patch_camelyon': 1.0,
    'eurosat': 1.0, 'resisc45': 5.0, 'diabetic_retinopathy': 0.1, 'clevr_count': 0.5,
    'clevr_dist': 0.1, 'dmlab': 5.0, 'kitti': 5.0, 'dsprites_loc': 5.0, 'dsprites_ori': 0.1,
    'smallnorb_azi': 10.0, 'smallnorb_ele': 1.0,
}


def dense_b(b: jax.Array) -> jax.Array:
  """The (dim, d) block-diagonal matrix of a grouped map's (groups, dim/groups,
  d/groups) weights."""
  groups, rows, cols = b.shape
  full = jnp.zeros((groups, rows, groups, cols), b.dtype)
  full = full.at[jnp.arange(groups), :, jnp.arange(groups), :].set(b)
  return full.reshape(groups * rows, groups * cols)


class RepAdapterLayer(nn.Module):
  """s * (B(drop(A x + a)) + b_B): the adapter's change to x (its residual excluded)."""
  features: int
  dim: int
  groups: int
  scale: float
  dropout: float
  dtype: Any = jnp.float32
  param_dtype: Any = jnp.float32

  @nn.compact
  def __call__(self, x: jax.Array, *, train: bool) -> jax.Array:
    d, g = self.features, self.groups
    a = self.param('A', nn.initializers.xavier_uniform(), (d, self.dim), self.param_dtype)
    a_bias = self.param('A_bias', nn.initializers.zeros, (self.dim,), self.param_dtype)
    b = self.param('B', nn.initializers.zeros, (g, self.dim // g, d // g), self.param_dtype)
    b_bias = self.param('B_bias', nn.initializers.zeros, (d,), self.param_dtype)
    h = jnp.dot(x.astype(self.dtype), a.astype(self.dtype)) + a_bias.astype(self.dtype)
    if train and self.dropout > 0:
      h = nn.Dropout(self.dropout, deterministic=False)(h)
    h = h.reshape(h.shape[:-1] + (g, self.dim // g))
    out = jnp.einsum('...gi,gio->...go', h, b.astype(self.dtype)).reshape(x.shape[:-1] + (d,))
    return self.scale * (out + b_bias.astype(self.dtype))


@dataclasses.dataclass(frozen=True)
class RepAdapter(Method):
  """RepAdapter. Fields beyond `Method`'s:

    targets: the dense maps whose input is adapted: 'qkv' (after LN1, before
      attention) and 'fc1' (after LN2, before the MLP) in the reference ('repblock');
      any of 'qkv'/'query'/'key'/'value', 'out', 'fc1', 'fc2'.
    dim: the bottleneck width (the reference's hidden_dim).
    groups: groups of the B map; must divide `dim` and the adapted maps' input width.
    scale: s, the factor of the adapter's output (per VTAB task in the reference:
      `VTAB_SCALES`).
    dropout: dropout on A's output in training.
  """
  NAME: ClassVar[str] = 'repadapter'
  SITES: ClassVar[tuple[str, ...]] = DENSE_SITES
  MERGEABLE: ClassVar[bool] = True
  RECIPE: ClassVar[Mapping[str, Any]] = {'learning_rate': 1e-3, 'weight_decay': 1e-4,
                                         'epochs': 100}

  targets: tuple[str, ...] = ('qkv', 'fc1')
  dim: int = 8
  groups: int = 2
  scale: float = 1.0
  dropout: float = 0.1

  def validate(self) -> None:
    super().validate()
    self.check_integer('dim', 'groups')
    if self.dim % self.groups:
      self.fail(f'groups {self.groups} must divide dim {self.dim}.')
    self.check_finite('scale')
    self.check_fraction('dropout')

  def adapt(self, site: Site, call: SiteCall, shared: Any, info: ModelInfo, *, train: bool,
            name: str) -> jax.Array:
    d = call.x.shape[-1]
    if d % self.groups:
      self.fail(f'groups {self.groups} must divide the input width {d} of site '
                f'{site.name!r}; choose groups dividing it.')
    change = RepAdapterLayer(d, self.dim, self.groups, float(self.scale), float(self.dropout),
                             info.dtype, info.param_dtype, name=name)(call.x, train=train)
    dtype = call.y.dtype
    adapted = (call.x + change).astype(dtype)
    return jnp.dot(adapted, call.kernel.astype(dtype)) + call.bias.astype(dtype)

  def merge(self, site: Site, params: Mapping[str, Any], shared: Any, kernel: jax.Array,
            bias: jax.Array) -> tuple[jax.Array, jax.Array]:
    """W' = (I + s A B_full) W and b' = b + s (a B_full + b_B) W (the eval-time map)."""
    a, b = jnp.asarray(params['A'], jnp.float32), dense_b(jnp.asarray(params['B'], jnp.float32))
    s = float(self.scale)
    w = jnp.asarray(kernel, jnp.float32)
    mixing = jnp.eye(a.shape[0], dtype=jnp.float32) + s * jnp.dot(a, b, precision='highest')
    shift = s * (jnp.dot(jnp.asarray(params['A_bias'], jnp.float32), b, precision='highest')
                 + jnp.asarray(params['B_bias'], jnp.float32))
    return (jnp.dot(mixing, w, precision='highest').astype(kernel.dtype),
            (bias + jnp.dot(shift, w, precision='highest')).astype(bias.dtype))
