"""FacT-TT and FacT-TK against PyTorch versions written after the reference
(JieShibo/PETL-ViT FacT/fact_tt.py, FacT/fact_tk.py) inserted into timm's ViT; their
ViT-B/16 counts, init, merging, dropout and a training step."""

import functools
import math
import types

import torch  # Before jax (see conftest.py).
from torch import nn

import jax
import numpy as np
import optax
import pytest

from fake_checkpoint import write_original_npz
from mlae_jax.adapters.fact import VTAB_TASKS, FactTK, FactTT
from mlae_jax.checkpoints import load_pretrained
from mlae_jax.checkpoints.layout import flatten
from mlae_jax.partition import param_role
from tiny import (assert_merge_matches, images, init, moved, randomize, relative_error,
                  tiny_model, train_steps, vit_b16_adapter_count)
from torch_reference import TINY_SIZE, nchw, tensor, timm_vit

TOLERANCE = 1e-4
RANK = 4
SCALE = 2.5
# The reference cuts the MLP into 4 chunks of d (mlp_ratio 4): the parity model too.
SIZE = {**TINY_SIZE, 'mlp': 4 * TINY_SIZE['hidden']}
ATTN = 'Transformer/encoderblock_{}/MultiHeadDotProductAttention_0/adapter_{}'
MLP = 'Transformer/encoderblock_{}/MlpBlock_0/adapter_{}'


def fact_model(method):
  """The tiny ViT with a 4 d MLP, as the reference assumes."""
  return tiny_model(method, mlp_dim=SIZE['mlp'])


# --- The PyTorch side: set_FacT and the two forwards of each reference script, for
# timm 1.0's Attention and Mlp (the reference's `self.drop` is now drop1/drop2), with
# the ViT passed in instead of read from a global (timm 1.0 also passes attn_mask=None,
# is_causal=False to the attention: unused, as in the reference).

def tt_attn_forward(vit, self, x, attn_mask=None, is_causal=False):
  B, N, C = x.shape
  qkv = self.qkv(x)
  q = vit.FacTv(self.dp(self.q_FacTs(vit.FacTu(x))))
  k = vit.FacTv(self.dp(self.k_FacTs(vit.FacTu(x))))
  v = vit.FacTv(self.dp(self.v_FacTs(vit.FacTu(x))))
  qkv = qkv + torch.cat([q, k, v], dim=2) * self.s
  return _attend(self, qkv, B, N, C, lambda x: vit.FacTv(self.dp(self.proj_FacTs(vit.FacTu(x)))))


def tt_mlp_forward(vit, self, x):
  B, N, C = x.shape
  h = self.fc1(x)
  h = h + vit.FacTv(self.dp(self.fc1_FacTs(vit.FacTu(x))).reshape(
      B, N, 4, self.dim)).reshape(B, N, 4 * C) * self.s
  x = self.drop1(self.act(h))
  h = self.fc2(x)
  x = x.reshape(B, N, 4, C)
  h = h + vit.FacTv(self.dp(self.fc2_FacTs(vit.FacTu(x).reshape(B, N, 4 * self.dim)))) * self.s
  return self.drop2(h)


def tk_attn_forward(vit, self, x, attn_mask=None, is_causal=False):
  B, N, C = x.shape
  FacTc = vit.FacTc @ vit.FacTp[:, self.idx:self.idx + 4]
  q_c, k_c, v_c, proj_c = FacTc[:, :, 0], FacTc[:, :, 1], FacTc[:, :, 2], FacTc[:, :, 3]
  qkv = self.qkv(x)
  q = vit.FacTv(self.dp(vit.FacTu(x) @ q_c))
  k = vit.FacTv(self.dp(vit.FacTu(x) @ k_c))
  v = vit.FacTv(self.dp(vit.FacTu(x) @ v_c))
  qkv = qkv + torch.cat([q, k, v], dim=2) * self.s
  return _attend(self, qkv, B, N, C, lambda x: vit.FacTv(self.dp(vit.FacTu(x) @ proj_c)))


def tk_mlp_forward(vit, self, x):
  B, N, C = x.shape
  FacTc = vit.FacTc @ vit.FacTp[:, self.idx:self.idx + 8]
  fc1_c = FacTc[:, :, :4].reshape(self.dim, self.dim * 4)
  fc2_c = FacTc[:, :, 4:].reshape(self.dim, self.dim * 4)
  h = self.fc1(x)
  h = h + vit.FacTv(self.dp(vit.FacTu(x) @ fc1_c).reshape(
      B, N, 4, self.dim)).reshape(B, N, 4 * C) * self.s
  x = self.drop1(self.act(h))
  h = self.fc2(x)
  x = x.reshape(B, N, 4, C)
  h = h + vit.FacTv(self.dp(vit.FacTu(x).reshape(B, N, 4 * self.dim) @ fc2_c.t())) * self.s
  return self.drop2(h)


def _attend(self, qkv, B, N, C, proj_delta):
  qkv = qkv.reshape(B, N, 3, self.num_heads, C // self.num_heads).permute(2, 0, 3, 1, 4)
  q, k, v = qkv[0], qkv[1], qkv[2]
  attn = ((q @ k.transpose(-2, -1)) * self.scale).softmax(dim=-1)
  x = (self.attn_drop(attn) @ v).transpose(1, 2).reshape(B, N, C)
  proj = self.proj(x) + proj_delta(x) * self.s
  return self.proj_drop(proj)


def set_fact(vit, kind: str, dim: int, s: float, dropout: float):
  """fact_{tt,tk}.py `set_FacT` on timm's ViT (d = embed_dim, 4 + 8 FacT_p columns per
  block: 144 at depth 12)."""
  d = vit.embed_dim
  vit.FacTu = nn.Linear(d, dim, bias=False)
  vit.FacTv = nn.Linear(dim, d, bias=False)
  nn.init.zeros_(vit.FacTv.weight)
  if kind == 'tk':
    vit.FacTp = nn.Parameter(torch.zeros([dim, 12 * len(vit.blocks)]))
    vit.FacTc = nn.Parameter(torch.zeros([dim, dim, dim]))
    nn.init.xavier_uniform_(vit.FacTc)
    nn.init.xavier_uniform_(vit.FacTp)
  idx = 0
  for block in vit.blocks:
    for module in (block.attn, block.mlp):
      module.dp, module.s, module.dim = nn.Dropout(dropout), s, dim
    if kind == 'tt':
      for name in ('q', 'k', 'v', 'proj'):
        setattr(block.attn, f'{name}_FacTs', nn.Linear(dim, dim, bias=False))
      block.mlp.fc1_FacTs = nn.Linear(dim, 4 * dim, bias=False)
      block.mlp.fc2_FacTs = nn.Linear(4 * dim, dim, bias=False)
    else:
      block.attn.idx, block.mlp.idx = idx, idx + 4
      idx += 12
    attn, mlp = (tt_attn_forward, tt_mlp_forward) if kind == 'tt' else (tk_attn_forward,
                                                                         tk_mlp_forward)
    block.attn.forward = types.MethodType(functools.partial(attn, vit), block.attn)
    block.mlp.forward = types.MethodType(functools.partial(mlp, vit), block.mlp)
  return vit


def copy_ours_to_torch(vit, kind: str, flat: dict, r: int):
  """Our parameters into the reference's; returns [(our path, torch tensor, getter of
  the torch tensor's entries in our layout)] to compare gradients."""
  pairs = [('adapter_shared/u', vit.FacTu.weight, lambda t: t.T),
           ('adapter_shared/v', vit.FacTv.weight, lambda t: t.T),
           ('head/kernel', vit.head.weight, lambda t: t.T), ('head/bias', vit.head.bias, None)]
  if kind == 'tk':
    pairs.append(('adapter_shared/core', vit.FacTc, None))
  for i, block in enumerate(vit.blocks):
    qkv, out, fc1, fc2 = (ATTN.format(i, 'qkv'), ATTN.format(i, 'out'), MLP.format(i, 'fc1'),
                          MLP.format(i, 'fc2'))
    if kind == 'tt':
      a, m = block.attn, block.mlp
      pairs.append((f'{qkv}/core', (a.q_FacTs.weight, a.k_FacTs.weight, a.v_FacTs.weight),
                    lambda ts: torch.cat([t.T for t in ts], dim=1)))
      pairs += [(f'{out}/core', a.proj_FacTs.weight, lambda t: t.T),
                (f'{fc1}/core', m.fc1_FacTs.weight, lambda t: t.T),
                (f'{fc2}/core', m.fc2_FacTs.weight, lambda t: t.T)]
    else:
      for path, lo, hi in ((qkv, 0, 3), (out, 3, 4), (fc1, 4, 8), (fc2, 8, 12)):
        # Block i's FacT_p columns: q, k, v, proj, fc1 x4, fc2 x4 from 12 i.
        pairs.append((f'{path}/p', vit.FacTp,
                      functools.partial(_columns, lo=12 * i + lo, hi=12 * i + hi)))
  with torch.no_grad():
    for path, theirs, view in pairs:
      value = tensor(flat[path])
      if isinstance(theirs, tuple):  # q|k|v cores side by side.
        for j, t in enumerate(theirs):
          t.copy_(value[:, j * r:(j + 1) * r].T)
      elif view is None:
        theirs.copy_(value)
      else:
        view(theirs).copy_(value)
  return pairs


def _columns(t, lo, hi):
  return t[:, lo:hi]


def torch_grad(theirs, view):
  if isinstance(theirs, tuple):
    return view(tuple(t.grad for t in theirs)).numpy()
  return (theirs.grad if view is None else view(theirs.grad)).numpy()


@pytest.mark.parametrize('method_cls', [FactTT, FactTK])
def test_logits_and_gradients_match_pytorch(tmp_path, method_cls):
  path = tmp_path / 'tiny.npz'
  write_original_npz(path, **SIZE)
  kind = method_cls.NAME[-2:]
  model = fact_model(method_cls(rank=RANK, scale=SCALE, dropout=0.0))
  params = randomize(load_pretrained(path, model, rng=jax.random.key(0), image_size=32))
  x, labels = images(4), np.array([0, 3, 1, 4])

  def loss_fn(p, train):
    logits = model.apply({'params': p}, x, train=train, rngs={'dropout': jax.random.key(3)})
    return optax.softmax_cross_entropy_with_integer_labels(logits, labels).mean(), logits

  grads, logits = jax.grad(loss_fn, has_aux=True)(params, True)
  eval_logits = loss_fn(params, False)[1]
  flat_params, flat_grads = flatten(params), flatten(grads)

  reference = set_fact(timm_vit(path, SIZE), kind, RANK, SCALE, dropout=0.0)
  reference.head.weight.requires_grad_(True)
  reference.head.bias.requires_grad_(True)
  pairs = copy_ours_to_torch(reference, kind, flat_params, RANK)
  reference.train()
  torch_logits = reference(nchw(x))
  torch.nn.functional.cross_entropy(torch_logits, torch.from_numpy(labels)).backward()
  reference.eval()
  with torch.no_grad():
    torch_eval = reference(nchw(x)).numpy()

  errors = {'logits': relative_error(logits, torch_logits.detach().numpy()),
            'eval logits': relative_error(eval_logits, torch_eval)}
  for path, theirs, view in pairs:
    expected = torch_grad(theirs, view)
    assert np.abs(expected).max() > 0, path
    errors[path] = relative_error(flat_grads[path], expected)
  print(method_cls.NAME, 'max relative errors:', max(errors.values()), errors)
  assert all(error <= TOLERANCE for error in errors.values()), errors
  # Every method parameter was compared.
  ours = {k for k in flat_params if param_role(k) in ('adapter', 'head')}
  assert ours == {path for path, _, _ in pairs}


def test_trainable_parameter_counts_of_vit_b16():
  # The reference's `total_param` (every 'FacT' parameter) at set_FacT's default dim=8:
  # TT: FacTu 768*8 + FacTv 8*768 + 12 blocks x (4 (8x8) + (8x32) + (32x8)) = 21,504;
  # TK: FacTu + FacTv + FacTc 8^3 + FacTp 8*144 = 13,952.
  counts = {(cls, r): vit_b16_adapter_count(cls(rank=r))
            for cls, ranks in ((FactTT, (4, 8, 16)), (FactTK, (16, 32))) for r in ranks}
  for r in (4, 8, 16):
    assert counts[FactTT, r] == 1536 * r + 144 * r * r
  for r in (16, 32):
    assert counts[FactTK, r] == 1536 * r + r ** 3 + 144 * r
  assert counts[FactTT, 8] == 21_504 and vit_b16_adapter_count(FactTT()) == 21_504
  assert vit_b16_adapter_count(FactTK()) == 13_952
  # The paper's Table 1 prints 0.04 M (TT) and 0.07 M (TK): the mean over the 19 VTAB-1k
  # tasks at their ranks (FacT/configs/{tt,tk}/*.yaml) is 39,734 and 68,985.
  tt = np.mean([counts[FactTT, r] for r, _ in VTAB_TASKS['fact_tt'].values()])
  tk = np.mean([counts[FactTK, r] for r, _ in VTAB_TASKS['fact_tk'].values()])
  assert (round(tt), round(tk)) == (39_734, 68_985)
  assert (round(tt / 1e6, 2), round(tk / 1e6, 2)) == (0.04, 0.07)


def test_init_follows_the_reference():
  d, r = TINY_SIZE['hidden'], RANK
  flats = {cls: flatten(init(fact_model(cls(rank=r)), seed=2)) for cls in (FactTT, FactTK)}
  for flat in flats.values():
    u, v = np.asarray(flat['adapter_shared/u']), np.asarray(flat['adapter_shared/v'])
    assert u.shape == (d, r) and v.shape == (r, d)
    assert not v.any()  # FacTv: zeros.
    # FacTu: torch Linear(d, r) default, U(+-1/sqrt(d)).
    assert 0.7 / math.sqrt(d) < np.abs(u).max() <= 1 / math.sqrt(d)
  flat = flats[FactTT]
  for path, fan_in in ((ATTN.format(0, 'qkv'), r), (ATTN.format(0, 'out'), r),
                       (MLP.format(0, 'fc1'), r), (MLP.format(0, 'fc2'), 4 * r)):
    core = np.abs(np.asarray(flat[f'{path}/core']))
    assert 0.6 / math.sqrt(fan_in) < core.max() <= 1 / math.sqrt(fan_in), path
  flat = flats[FactTK]
  # torch xavier_uniform_: FacTc (r, r, r) fans r*r each; FacTp (r, 12 L) fans 12 L and r.
  core = np.abs(np.asarray(flat['adapter_shared/core']))
  assert 0.8 * math.sqrt(3) / r < core.max() <= math.sqrt(3) / r
  p = np.abs(np.concatenate([np.asarray(value) for key, value in flat.items()
                             if key.endswith('/p')], axis=1))
  assert p.shape == (r, 12 * TINY_SIZE['layers'])
  bound = math.sqrt(6 / (r + 12 * TINY_SIZE['layers']))
  assert 0.8 * bound < p.max() <= bound


@pytest.mark.parametrize('method, mlp_dim', [
    (FactTT(rank=RANK, scale=1.5), SIZE['mlp']), (FactTK(rank=RANK, scale=0.7), SIZE['mlp']),
    # mlp_dim 64: the MLP counts as 2 chunks of d.
    (FactTT(rank=RANK, targets=('qkv', 'fc2'), layers=(1,)), 64),
    (FactTK(rank=RANK, targets=('fc1', 'fc2', 'out'), layers=(0, 2)), 64)])
def test_merged_model_equals_adapted_model(method, mlp_dim):
  model = tiny_model(method, mlp_dim=mlp_dim)
  assert_merge_matches(model, randomize(init(model)))


@pytest.mark.parametrize('cls', [FactTT, FactTK])
def test_dropout_acts_only_in_training(cls):
  params = randomize(init(fact_model(cls(rank=RANK))))
  x = images(4)

  def run(dropout, train, seed=0):
    return np.asarray(fact_model(cls(rank=RANK, dropout=dropout)).apply(
        {'params': params}, x, train=train, rngs={'dropout': jax.random.key(seed)}))

  evaluated = run(0.1, False)
  np.testing.assert_allclose(run(0.0, True), evaluated, rtol=1e-5, atol=1e-6)
  assert np.abs(run(0.1, True) - evaluated).max() > 1e-4
  assert np.abs(run(0.1, True) - run(0.1, True, seed=1)).max() > 1e-4
  np.testing.assert_array_equal(run(0.1, True), run(0.1, True))


def test_training_steps_update_every_factor():
  # FacT-TK (FacT-TT's gradients are checked against PyTorch above; the plumbing is one).
  model = tiny_model(FactTK(rank=RANK), mlp_dim=SIZE['mlp'], num_layers=1)  # Quick to compile.
  # Zero head and zero V: the head moves first, then V, then U and the cores.
  before, after, _ = train_steps(model, 3)
  assert moved(before, after) == {k for k in before if param_role(k) != 'backbone'}


@pytest.mark.parametrize('cls, kwargs, message', [
    (FactTT, dict(rank=0), 'rank must be an integer >= 1'),
    (FactTK, dict(rank=2.0), 'rank must be an integer >= 1'),
    (FactTT, dict(scale=float('inf')), 'scale must be a finite number'),
    (FactTK, dict(scale='1'), 'scale must be a finite number'),
    (FactTT, dict(dropout=1.0), r'dropout must lie in \[0, 1\)'),
    (FactTK, dict(dropout=-0.1), r'dropout must lie in \[0, 1\)'),
    (FactTT, dict(targets=()), 'targets is empty'),
    (FactTK, dict(targets=('qkv', 'ln1')), r"targets \['ln1'\] are not sites"),
    (FactTT, dict(targets=('query',)), r"targets \['query'\] are not sites"),
])
def test_bad_configs_are_refused_with_a_reason(cls, kwargs, message):
  with pytest.raises(ValueError, match=message):
    cls(**kwargs)


def test_mlp_that_is_not_whole_chunks_is_refused():
  with pytest.raises(ValueError, match='mlp_dim 48 is not a multiple of hidden_size 32'):
    jax.eval_shape(lambda: init(tiny_model(FactTT(rank=2), mlp_dim=48)))
  jax.eval_shape(lambda: init(tiny_model(FactTT(rank=2, targets=('qkv', 'out')), mlp_dim=48)))


def test_defaults_and_recipe():
  for cls in (FactTT, FactTK):
    method = cls()
    assert (method.rank, method.scale, method.dropout) == (8, 1.0, 0.1)  # set_FacT, nn.Dropout.
    assert method.targets == ('qkv', 'out', 'fc1', 'fc2') and cls.MERGEABLE
    assert method.recipe('tfds') == {'learning_rate': 1e-3, 'weight_decay': 1e-4, 'epochs': 100}
  assert (FactTT.NAME, FactTK.NAME) == ('fact_tt', 'fact_tk')
