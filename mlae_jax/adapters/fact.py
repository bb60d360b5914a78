"""FacT (Factor-Tuning): low-rank weight updates whose factors are shared by every layer.

FacT (Jie & Deng, AAAI 2023) stacks the increments of every d x d map of the ViT
into one tensor and decomposes it. Each adapted map x -> x W0 + b0 gains

    s * v(dropout(u(x) K))

with U (d, r) and V (r, d) shared by ALL maps of ALL blocks, and a small per-map
core K:
  - FacT-TT (tensor train): K is a free (r, r) matrix per map;
  - FacT-TK (Tucker): K = C x_3 p, a shared (r, r, r) core C contracted with a
    per-map vector p (r,) (a column of the reference's FacT_p (r, 12 L)).
The wide MLP maps count as mlp_dim / d = 4 maps of d x d each: fc1's output and fc2's
input are cut into 4 chunks of d, each chunk its own map (its own r x r core block),
all through the same U and V. Both are input-independent, hence mergeable:
dW[chunk i, chunk j] = s * U K[i, j] V.

Where each fact comes from (JieShibo/PETL-ViT, FacT/fact_tt.py and FacT/fact_tk.py):
  - U = `FacTu` = nn.Linear(768, r, bias=False) (PyTorch's default init,
    U(+-1/sqrt(768))), V = `FacTv` = nn.Linear(r, 768, bias=False) initialised to
    zero; both attached to the ViT once (`set_FacT`), so shared by every block.
  - TT cores (`q_FacTs`, `k_FacTs`, `v_FacTs`, `proj_FacTs` = nn.Linear(r, r),
    `fc1_FacTs` = nn.Linear(r, 4r), `fc2_FacTs` = nn.Linear(4r, r), no bias): PyTorch's
    default init, U(+-1/sqrt(fan_in)). Here they are stored as (in, out) kernels, one
    per site: 'qkv' (r, 3r) = [q | k | v] cores side by side, 'out' (r, r), 'fc1'
    (r, 4r), 'fc2' (4r, r).
  - TK: `FacTc` (r, r, r) and `FacTp` (r, 144) are both xavier_uniform (PyTorch's fans:
    r*r and r*r for the core, 144 and r for FacT_p). The columns of FacT_p are
    allotted per block in module order: attention 4 (q, k, v, proj), then MLP 8 (fc1's
    4 chunks, fc2's 4). Here each site keeps its own columns, `p` (r, columns):
    'qkv' 3, 'out' 1, 'fc1' 4, 'fc2' 4, drawn from the bound of the whole
    (r, 12 L) matrix, so the init distribution is the reference's.
    Per-map cores: T = C @ p (r, r, columns); q, k, v, proj use T[:, :, j] (x u @ T_j);
    fc1 uses T.reshape(r, 4r) (a row-major reshape: column b*4 + k, which the forward
    then reads as chunk (b*4 + k) // r, rank (b*4 + k) % r; kept exactly), fc2 the
    transpose of its own T.reshape(r, 4r).
  - Forward (`fact_forward_attn`, `fact_forward_mlp`): q, k, v deltas from the
    attention input, concatenated and added to the fused qkv output times s; proj's
    delta from the attention output (proj's input); fc1's delta added before the
    activation; fc2's from the activations cut into 4 chunks of d. Dropout
    nn.Dropout(0.1) (`dp`) acts on the core's output, before V, in every map.
  - Scale s and rank r per VTAB-1k task: FacT/configs/{tt,tk}/<task>.yaml (VTAB_TASKS
    below). `set_FacT(model, dim=8, s=1)` defaults give the field defaults.
  - Recipe (`__main__` of both scripts): AdamW lr 1e-3, weight decay 1e-4, 100 epochs,
    cosine schedule with 10 warm-up epochs (timm CosineLRScheduler), batch 64
    (FacT/vtab.py `get_data`), drop_path_rate 0.1 on the backbone.
Deliberate generalisations: d is the model's hidden size (768 in the reference) and
the MLP is cut into mlp_dim / d chunks (4 in the reference); for TK the xavier bound of
p is that of an (r, (4 + 2 * chunks) * num_layers) matrix (= (r, 144) at ViT-B).
The 'qkv' site draws one dropout mask over the concatenated q|k|v core outputs, which
is the reference's three independent draws (same distribution, elementwise).
"""

from __future__ import annotations

import dataclasses
import math
from typing import Any, ClassVar, Mapping

import jax
import jax.numpy as jnp
from flax import linen as nn

from mlae_jax.adapters.experts import torch_linear_init
from mlae_jax.adapters.method import Method, ModelInfo, SiteCall
from mlae_jax.adapters.products import up_project
from mlae_jax.adapters.sites import Site

FACT_SITES = ('qkv', 'out', 'fc1', 'fc2')

# FacT/configs/{tt,tk}/<task>.yaml: (rank, scale) per VTAB-1k task (the reference's
# 'cifar' is this library's 'cifar100').
VTAB_TASKS: Mapping[str, Mapping[str, tuple[int, float]]] = {
    'fact_tt': {
        'cifar100': (8, 1.0), 'caltech101': (16, 10.0), 'dtd': (8, 0.01),
        'oxford_flowers102': (16, 1.0), 'oxford_iiit_pet': (8, 1.0), 'svhn': (16, 100.0),
        'sun397': (8, 1.0), 'patch_camelyon': (8, 10.0), 'eurosat': (8, 100.0),
        'resisc45': (8, 0.1), 'diabetic_retinopathy': (8, 1.0), 'clevr_count': (16, 1.0),
        'clevr_dist': (4, 10.0), 'dmlab': (16, 10.0), 'kitti': (16, 10.0),
        'dsprites_loc': (16, 100.0), 'dsprites_ori': (16, 1.0), 'smallnorb_azi': (16, 100.0),
        'smallnorb_ele': (8, 10.0)},
    'fact_tk': {
        'cifar100': (32, 0.1), 'caltech101': (32, 10.0), 'dtd': (16, 0.01),
        'oxford_flowers102': (32, 1.0), 'oxford_iiit_pet': (16, 10.0), 'svhn': (32, 100.0),
        'sun397': (16, 1.0), 'patch_camelyon': (32, 10.0), 'eurosat': (32, 100.0),
        'resisc45': (32, 10.0), 'diabetic_retinopathy': (16, 1.0), 'clevr_count': (32, 10.0),
        'clevr_dist': (16, 10.0), 'dmlab': (32, 10.0), 'kitti': (32, 10.0),
        'dsprites_loc': (32, 100.0), 'dsprites_ori': (32, 1.0), 'smallnorb_azi': (32, 100.0),
        'smallnorb_ele': (16, 10.0)},
}

_torch_linear_init = torch_linear_init()  # torch.nn.Linear's default.


def mlp_chunks(info: ModelInfo) -> int:
  """How many d x d maps the MLP's wide side counts as (4 in ViT-B)."""
  return info.mlp_dim // info.hidden_size


def chunks(site: Site, info: ModelInfo) -> tuple[int, int]:
  """(input chunks, output chunks) of d at `site`: its map seen as a grid of d x d maps."""
  n = mlp_chunks(info)
  return {'qkv': (1, 3), 'out': (1, 1), 'fc1': (1, n), 'fc2': (n, 1)}[site.name]


def fact_delta(x: jax.Array, u: jax.Array, v: jax.Array, core: jax.Array, n_in: int,
               n_out: int, scale: float, dropout: nn.Module | None) -> jax.Array:
  """s * v(dropout(u(x) K)): x's n_in chunks of d each go through U (d, r), side by
  side through the core K (n_in r, n_out r), then each of the n_out outputs of r
  through V (r, d) (`bottleneck.up_project`: see there why)."""
  d, r = u.shape
  hidden = jnp.einsum('...id,dr->...ir', x.reshape(x.shape[:-1] + (n_in, d)), u)
  hidden = jnp.einsum('...k,ko->...o', hidden.reshape(x.shape[:-1] + (n_in * r,)), core)
  if dropout is not None:
    hidden = dropout(hidden)
  out = up_project(hidden.reshape(x.shape[:-1] + (n_out, r)), v)
  return scale * out.reshape(x.shape[:-1] + (n_out * d,))


def fact_update(u: jax.Array, v: jax.Array, core: jax.Array, n_in: int, n_out: int,
                scale: float) -> jax.Array:
  """The (n_in d, n_out d) weight increment of `fact_delta`: block (i, j) is
  s * U K[i, j] V."""
  d, r = u.shape
  blocks = core.reshape(n_in, r, n_out, r)
  delta = jnp.einsum('ar,irjs,se->iaje', u, blocks, v, precision='highest')
  return scale * delta.reshape(n_in * d, n_out * d)


class _SharedFactors(nn.Module):
  """U (d, r) (PyTorch Linear init), V (r, d) zero, and for Tucker the core C (r, r, r)
  (xavier uniform); returned as a dict."""
  hidden: int
  rank: int
  tucker: bool
  param_dtype: Any = jnp.float32

  @nn.compact
  def __call__(self) -> dict[str, jax.Array]:
    d, r = self.hidden, self.rank
    shared = {'u': self.param('u', _torch_linear_init, (d, r), self.param_dtype),
              'v': self.param('v', nn.initializers.zeros, (r, d), self.param_dtype)}
    if self.tucker:
      # torch xavier_uniform_ on (r, r, r): fan_in = fan_out = r * r.
      shared['core'] = self.param('core', nn.initializers.xavier_uniform(), (r, r, r),
                                  self.param_dtype)
    return shared


class _SiteFactors(nn.Module):
  """One site's own FacT parameters and its update, given the shared ones. TT: 'core'
  (n_in r, n_out r); TK: 'p' (r, n_in n_out columns) combined with the shared core."""
  method: 'Fact'
  site: str
  n_in: int
  n_out: int
  p_bound: float
  dtype: Any = None
  param_dtype: Any = jnp.float32

  @nn.compact
  def __call__(self, x: jax.Array, shared: Mapping[str, jax.Array], *, train: bool) -> jax.Array:
    r = shared['u'].shape[1]
    if isinstance(self.method, FactTK):
      bound = self.p_bound

      def p_init(key, shape, dtype):
        return jax.random.uniform(key, shape, dtype, -bound, bound)

      p = self.param('p', p_init, (r, self.n_in * self.n_out), self.param_dtype)
      core = tucker_core(shared['core'], p, self.site)
    else:
      core = self.param('core', _torch_linear_init, (self.n_in * r, self.n_out * r),
                        self.param_dtype)
    rate = self.method.dropout
    dropout = nn.Dropout(rate, deterministic=False) if train and rate > 0 else None
    dtype = self.dtype or x.dtype
    return fact_delta(x.astype(dtype), shared['u'].astype(dtype), shared['v'].astype(dtype),
                      core.astype(dtype), self.n_in, self.n_out, self.method.scale, dropout)


def tucker_core(core: jax.Array, p: jax.Array, site: str) -> jax.Array:
  """The (n_in r, n_out r) core of `site` from the shared Tucker core C (r, r, r) and the
  site's columns p (r, k), as fact_tk.py builds them: T = C @ p (r, r, k); q|k|v take
  T[:, :, j] side by side, proj T[:, :, 0], fc1 T.reshape(r, k r) (row-major), fc2 the
  transpose of T.reshape(r, k r)."""
  r = core.shape[0]
  t = jnp.einsum('abm,mk->abk', core, p, precision='highest')
  if site == 'qkv':  # q, k, v: one (r, r) core each, side by side.
    return jnp.transpose(t, (0, 2, 1)).reshape(r, 3 * r)
  wide = t.reshape(r, r * t.shape[-1])
  return wide.T if site == 'fc2' else wide


@dataclasses.dataclass(frozen=True)
class Fact(Method):
  """Fields of both FacT methods (and those of `Method`):

    targets: maps to adapt, of 'qkv' (q, k and v, each its own core), 'out', 'fc1',
      'fc2' (the reference adapts all four).
    rank: r, the width of the shared factors U (d, r) and V (r, d).
    scale: s, the fixed factor on every update (per task in the reference:
      `VTAB_TASKS`).
    dropout: dropout on the core's output, before V (0.1 in the reference).
  """
  SITES: ClassVar[tuple[str, ...]] = FACT_SITES
  MERGEABLE: ClassVar[bool] = True
  RECIPE: ClassVar[Mapping[str, Any]] = {'learning_rate': 1e-3, 'weight_decay': 1e-4,
                                         'epochs': 100}

  targets: tuple[str, ...] = FACT_SITES
  rank: int = 8
  scale: float = 1.0
  dropout: float = 0.1

  def validate(self) -> None:
    super().validate()
    self.check_integer('rank')
    self.check_finite('scale')
    self.check_fraction('dropout')

  def _check_model(self, info: ModelInfo) -> None:
    if set(self.targets) & {'fc1', 'fc2'} and info.mlp_dim % info.hidden_size:
      self.fail(f'FacT cuts the MLP into d x d maps, but mlp_dim {info.mlp_dim} is not a '
                f'multiple of hidden_size {info.hidden_size}; set targets to ("qkv", "out").')

  def shared(self, info: ModelInfo, *, name: str) -> dict[str, jax.Array]:
    """U, V (and for TK the core C), shared by every adapted map of every block."""
    self._check_model(info)
    return _SharedFactors(info.hidden_size, self.rank, isinstance(self, FactTK),
                          info.param_dtype, name=name)()

  def adapt(self, site: Site, call: SiteCall, shared: Any, info: ModelInfo, *, train: bool,
            name: str) -> jax.Array:
    n_in, n_out = chunks(site, info)
    columns = (4 + 2 * mlp_chunks(info)) * info.num_layers  # FacT_p's width (144 at ViT-B).
    bound = math.sqrt(6.0 / (self.rank + columns))  # torch xavier_uniform_ on (r, columns).
    delta = _SiteFactors(self, site.name, n_in, n_out, bound, info.dtype, info.param_dtype,
                         name=name)(call.x, shared, train=train)
    return call.y + delta.astype(call.y.dtype)

  def site_core(self, site: str, params: Mapping[str, Any],
                shared: Mapping[str, Any]) -> jax.Array:
    """The (n_in r, n_out r) core of `site` from its (flat-named) params."""
    raise NotImplementedError

  def merge(self, site: Site, params: Mapping[str, Any], shared: Any, kernel: jax.Array,
            bias: jax.Array) -> tuple[jax.Array, jax.Array]:
    """Adds dW = s * U K V blockwise (the eval-time update; dropout is off)."""
    d = shared['u'].shape[0]
    n_in, n_out = kernel.shape[0] // d, kernel.shape[1] // d
    core = self.site_core(site.name, params, shared)
    delta = fact_update(jnp.asarray(shared['u'], jnp.float32),
                        jnp.asarray(shared['v'], jnp.float32), jnp.asarray(core, jnp.float32),
                        n_in, n_out, self.scale)
    return kernel + delta.astype(kernel.dtype), bias


@dataclasses.dataclass(frozen=True)
class FactTT(Fact):
  """FacT-TT: a free r x r core per map (per chunk of the MLP): 1536 r + 144 r^2
  parameters at ViT-B/16 (21,504 at r = 8)."""
  NAME: ClassVar[str] = 'fact_tt'

  def site_core(self, site, params, shared):
    return jnp.asarray(params['core'])


@dataclasses.dataclass(frozen=True)
class FactTK(Fact):
  """FacT-TK: a shared r x r x r core, mixed per map by r weights: 1536 r + r^3 + 144 r
  parameters at ViT-B/16 (13,952 at r = 8)."""
  NAME: ClassVar[str] = 'fact_tk'

  def site_core(self, site, params, shared):
    return tucker_core(jnp.asarray(shared['core'], jnp.float32),
                       jnp.asarray(params['p'], jnp.float32), site)
