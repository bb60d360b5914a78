"""Lily against a PyTorch transcription of the reference (yibozhong/lily,
visual-adaptation-benchmark/vit/lily.py) inserted into timm's ViT; its ViT-B/16 count,
init, padding rows, the per-example router, data parallelism and a training step."""

import math
import os
import subprocess
import sys
import types

import torch  # Before jax (see conftest.py).
from torch import nn
import torch.nn.functional as F

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

from fake_checkpoint import write_original_npz
from mlae_jax.adapters.lily import Lily, routing_weights
from mlae_jax.checkpoints import load_pretrained
from mlae_jax.checkpoints.layout import flatten
from mlae_jax.partition import param_role
from tiny import (images, init, moved, randomize, relative_error, tiny_model, train_steps,
                  vit_b16_counts)
from torch_reference import TINY_SIZE, nchw, tensor, timm_vit

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
TOLERANCE = 1e-4
# Tiny: 3 blocks, LPs shared by blocks (0, 1) and (2,); 3 experts.
DIM, EXPERTS, STRIDE, SCALE = 4, 3, 2, 1.7
ATTN = 'Transformer/encoderblock_{}/MultiHeadDotProductAttention_0/adapter_{}/router'
MLP = 'Transformer/encoderblock_{}/MlpBlock_0/adapter_ffn/router'


def lily(**kwargs) -> Lily:
  return Lily(**{'dim': DIM, 'experts': EXPERTS, 'lp_stride': STRIDE, 'scale': SCALE,
                 **kwargs})


# --- The PyTorch side: lily.py's adapters, forwards and `set_lily_kv` for timm 1.0's
# Attention and Mlp (the reference's `self.drop` is now drop1/drop2 with a `norm`
# (Identity) between; timm 1.0 passes attn_mask=None, is_causal=False: unused), with
# d = embed_dim instead of 768 and the stride passed in (the reference: 12 // ne).

class LilyAdapter(nn.Module):
  def __init__(self, hidden_dim, ne, lp, hps, mlp=False):
    super().__init__()
    self.hps, self.ne, self.lp = hps, ne, lp
    self.router = nn.Linear(hidden_dim, ne, bias=False)
    self.non_linear = nn.ReLU() if mlp else nn.Identity()

  def forward(self, x):
    hidden = self.non_linear(self.lp(x))
    router_probability = F.softmax(self.router(hidden), dim=-1)
    expert_probabilities = router_probability.mean(dim=(0, 1))
    combined_hp = torch.einsum('e,eio->io', expert_probabilities, self.hps)
    return torch.matmul(hidden, combined_hp)


class LilyAdapterMonoscale(nn.Module):
  def __init__(self, hidden_dim, ne, lp, hps, mlp=False):
    super().__init__()
    self.hps, self.ne, self.lp, self.scale = hps, ne, lp, 1 / ne
    self.non_linear = nn.ReLU() if mlp else nn.Identity()

  def forward(self, x):
    hidden = self.non_linear(self.lp(x))
    return torch.matmul(hidden, torch.sum(self.hps, 0) * self.scale)


def forward_attn_lily_kv(self, x, attn_mask=None, is_causal=False):
  B, N, C = x.shape
  qkv = self.qkv(x).reshape(B, N, 3, self.num_heads, C // self.num_heads).permute(2, 0, 3, 1, 4)
  delta_k = self.lily_k(x).reshape(B, N, 1, self.num_heads, C // self.num_heads).permute(
      2, 0, 3, 1, 4) * self.s
  delta_v = self.lily_v(x).reshape(B, N, 1, self.num_heads, C // self.num_heads).permute(
      2, 0, 3, 1, 4) * self.s
  q, k, v = qkv[0], qkv[1], qkv[2]
  k, v = k + delta_k[0], v + delta_v[0]
  attn = ((q @ k.transpose(-2, -1)) * self.scale).softmax(dim=-1)
  attn = self.attn_drop(attn)
  x = (attn @ v).transpose(1, 2).reshape(B, N, C)
  return self.proj_drop(self.proj(x))


def forward_mlp_lily(self, x):
  delta_mlp = self.lily_mlp(x)
  x = self.drop1(self.act(self.fc1(x)))
  x = self.fc2(self.norm(x))
  return self.drop2(x) + delta_mlp * self.s


def set_lily_kv(model, dim, s, ne, stride, monoscale=False):
  """`set_lily_kv` / `set_lily_kv_monoscale`; returns the LPs of each group
  [(k, v, mlp)] and the HPs (k, v, mlp)."""
  d = model.embed_dim
  adapter = LilyAdapterMonoscale if monoscale else LilyAdapter
  hps = tuple(nn.Parameter(torch.zeros(ne, width, d)) for width in (dim, dim, 2 * dim))
  groups = []
  for idx, block in enumerate(model.blocks):
    if idx % stride == 0:
      groups.append((nn.Linear(d, dim, bias=False), nn.Linear(d, dim, bias=False),
                     nn.Linear(d, 2 * dim, bias=False)))
    lp_k, lp_v, lp_mlp = groups[-1]
    attn, mlp = block.attn, block.mlp
    attn.lily_k = adapter(dim, ne, lp_k, hps[0])
    attn.lily_v = adapter(dim, ne, lp_v, hps[1])
    mlp.lily_mlp = adapter(2 * dim, ne, lp_mlp, hps[2], mlp=True)
    attn.s = mlp.s = s
    attn.forward = types.MethodType(forward_attn_lily_kv, attn)
    mlp.forward = types.MethodType(forward_mlp_lily, mlp)
  return groups, hps


def copy_ours_to_torch(vit, groups, hps, flat, monoscale):
  """Our parameters into the reference's; returns [(our path, torch tensors, getter of
  their values in our layout)] to compare gradients."""
  pairs = [('head/kernel', (vit.head.weight,), lambda t: t[0].T),
           ('head/bias', (vit.head.bias,), lambda t: t[0])]
  for j, site in enumerate(('key', 'value', 'ffn')):
    pairs.append((f'adapter_shared/hp_{site}', (hps[j],), lambda t: t[0]))
    pairs.append((f'adapter_shared/lp_{site}', tuple(g[j].weight for g in groups),
                  lambda ts: torch.stack([t.T for t in ts])))
  if not monoscale:
    for i, block in enumerate(vit.blocks):
      pairs += [(ATTN.format(i, 'key'), (block.attn.lily_k.router.weight,), lambda t: t[0].T),
                (ATTN.format(i, 'value'), (block.attn.lily_v.router.weight,),
                 lambda t: t[0].T),
                (MLP.format(i), (block.mlp.lily_mlp.router.weight,), lambda t: t[0].T)]
  with torch.no_grad():
    for path, theirs, _ in pairs:
      value = tensor(flat[path])
      if path.startswith('adapter_shared/lp_'):
        for g, t in enumerate(theirs):
          t.copy_(value[g].T)
      elif path == 'head/kernel' or path.endswith('/router'):
        theirs[0].copy_(value.T)
      else:
        theirs[0].copy_(value)
  for _, theirs, _ in pairs:
    for t in theirs:
      t.requires_grad_(True)
  return pairs


@pytest.mark.parametrize('router', ['batch', 'none'])
def test_logits_and_gradients_match_pytorch(tmp_path, router):
  path = tmp_path / 'tiny.npz'
  write_original_npz(path, **TINY_SIZE)
  model = tiny_model(lily(router=router))
  params = randomize(load_pretrained(path, model, rng=jax.random.key(0), image_size=32))
  x, labels = images(4), np.array([0, 3, 1, 4])

  def loss_fn(p, train):
    logits = model.apply({'params': p}, x, train=train)
    return optax.softmax_cross_entropy_with_integer_labels(logits, labels).mean(), logits

  grads, logits = jax.jit(jax.grad(loss_fn, has_aux=True), static_argnums=1)(params, True)
  eval_logits = loss_fn(params, False)[1]  # Op by op: quicker than compiling for one call.
  flat_params, flat_grads = flatten(params), flatten(grads)

  reference = timm_vit(path)
  groups, hps = set_lily_kv(reference, DIM, SCALE, EXPERTS, STRIDE, router == 'none')
  assert len(groups) == 2  # Blocks (0, 1) share the first LPs, block 2 has its own.
  pairs = copy_ours_to_torch(reference, groups, hps, flat_params, router == 'none')
  reference.train()
  torch_logits = reference(nchw(x))
  F.cross_entropy(torch_logits, torch.from_numpy(labels)).backward()
  reference.eval()
  with torch.no_grad():
    torch_eval = reference(nchw(x)).numpy()

  errors = {'logits': relative_error(logits, torch_logits.detach().numpy()),
            'eval logits': relative_error(eval_logits, torch_eval)}
  for name, theirs, view in pairs:
    expected = view(tuple(t.grad for t in theirs)).numpy()
    assert np.abs(expected).max() > 0, name
    assert np.abs(np.asarray(flat_grads[name])).max() > 0, name  # jax.grad reaches it.
    errors[name] = relative_error(flat_grads[name], expected)
  print(f'lily router={router} max relative error:', max(errors.values()), errors)
  assert all(error <= TOLERANCE for error in errors.values()), errors
  # Every method parameter was compared.
  assert {k for k in flat_params if param_role(k) in ('adapter', 'head')} == {
      name for name, _, _ in pairs}


def test_padding_rows_change_nothing_with_the_batch_router():
  model = tiny_model(lily())
  params = randomize(init(model))
  real, padding = images(4), images(2, seed=5)
  padded = np.concatenate([real, padding])
  weights = np.array([1, 1, 1, 1, 0, 0], np.float32)

  def run(x, w=None, train=False):
    return np.asarray(model.apply({'params': params}, x, train=train, example_weights=w))

  expected = run(real)
  np.testing.assert_allclose(run(padded, weights, train=True)[:4], expected, rtol=1e-5,
                             atol=1e-6)
  # Counted as real, the padding rows would change the real rows' logits.
  assert np.abs(run(padded, train=True)[:4] - expected).max() > 1e-4


def test_routing_weights():
  probs = jax.nn.softmax(jax.random.normal(jax.random.key(0), (3, 5, 4)), axis=-1)
  np.testing.assert_allclose(routing_weights(probs, 'batch', None), probs.mean(axis=(0, 1)),
                             rtol=1e-6)
  weights = jnp.array([1.0, 0.0, 1.0])
  np.testing.assert_allclose(routing_weights(probs, 'batch', weights),
                             probs[jnp.array([0, 2])].mean(axis=(0, 1)), rtol=1e-6)
  np.testing.assert_allclose(routing_weights(probs, 'example', weights), probs.mean(axis=1),
                             rtol=1e-6)
  # A batch of padding alone: finite (zero) weights, no NaN.
  assert not np.asarray(routing_weights(probs, 'batch', jnp.zeros(3))).any()


def test_per_example_router_is_independent_of_the_batch():
  batch_model, example_model = tiny_model(lily()), tiny_model(lily(router='example'))
  params = randomize(init(example_model))
  x = images(3)

  def run(model, x):
    return np.asarray(model.apply({'params': params}, x))

  together = run(example_model, x)
  for i in range(3):  # Each row alone is what the batch router gives a batch of one.
    np.testing.assert_allclose(together[i:i + 1], run(example_model, x[i:i + 1]), rtol=1e-5,
                               atol=1e-6)
    np.testing.assert_allclose(together[i:i + 1], run(batch_model, x[i:i + 1]), rtol=1e-5,
                               atol=1e-6)
  # The batch router mixes the rows; the per-example one does not.
  assert np.abs(run(batch_model, x) - together).max() > 1e-4
  other = np.concatenate([x[:1], images(2, seed=7)])
  np.testing.assert_allclose(run(example_model, other)[0], together[0], rtol=1e-5, atol=1e-6)


# Run in a process of its own with four CPU devices (this one may have one): the batch
# router under jit with the batch sharded over the devices gives the logits of the
# unsharded computation (the mean over the batch axis is the global one), padding rows
# excluded.
DATA_PARALLEL_CHECK = """
import jax, jax.numpy as jnp, numpy as np
from jax.sharding import Mesh, NamedSharding, PartitionSpec
from mlae_jax.adapters.lily import Lily
from tiny import images, randomize, relative_error, tiny_model

devices = jax.devices()
assert len(devices) >= 2, devices
model = tiny_model(Lily(dim=4, experts=3, lp_stride=2, scale=1.7))
params = randomize(jax.jit(model.init)(jax.random.key(0), jnp.zeros((1, 32, 32, 3)))['params'])
rows = 2 * len(devices)
x = images(rows)
weights = np.ones(rows, np.float32)
weights[-2:] = 0.0  # The last device holds padding alone.
forward = jax.jit(lambda p, x, w: model.apply({'params': p}, x, train=True, example_weights=w))
logits = np.asarray(forward(params, x, weights))
sharding = NamedSharding(Mesh(np.asarray(devices), ('data',)), PartitionSpec('data'))
xs, ws = jax.device_put(x, sharding), jax.device_put(weights, sharding)
assert len(xs.sharding.device_set) == len(devices)
sharded = forward(params, xs, ws)
assert relative_error(sharded, logits) < 1e-5, relative_error(sharded, logits)
# The real rows alone, unpadded: the same logits (the mean is over every device's real rows).
real = forward(params, x[:-2], np.ones(rows - 2, np.float32))
assert relative_error(np.asarray(sharded)[:-2], real) < 1e-5
# A per-device mean would differ: a device's rows alone give other logits.
alone = forward(params, x[:2], np.ones(2, np.float32))
assert np.abs(np.asarray(alone) - np.asarray(real)[:2]).max() > 1e-4
print('data parallel OK over', len(devices), 'devices')
"""


def test_batch_router_under_data_parallelism():
  tests = os.path.dirname(os.path.abspath(__file__))
  env = dict(os.environ, JAX_PLATFORMS='cpu',
             XLA_FLAGS='--xla_force_host_platform_device_count=4',
             PYTHONPATH=os.pathsep.join([tests, REPO]))
  result = subprocess.run([sys.executable, '-c', DATA_PARALLEL_CHECK], cwd=tests, env=env,
                          capture_output=True, text=True, timeout=300)
  assert result.returncode == 0, result.stderr[-3000:]
  assert 'data parallel OK over 4 devices' in result.stdout


def vit_b16_adapter_count(method) -> int:
  """counts['adapter'] + counts['tuned'] of ViT-B/16 with `method` (Lily keeps no state)."""
  counts = vit_b16_counts(method)
  assert counts['state'] == 0
  return counts['adapter'] + counts['tuned']


def test_trainable_parameter_counts_of_vit_b16():
  # main.py's `param` (every parameter named with 'lily', shared tensors once, as
  # named_parameters deduplicates) after set_lily_kv(vit, dim=32, s=1, ne=4):
  # HPs 4*32*768*2 + 4*64*768 = 393,216; LPs (stride 12 // 4 = 3: 4 groups)
  # 4 * (768*32*2 + 768*64) = 393,216; routers 12 * (32*4*2 + 64*4) = 6,144.
  assert vit_b16_adapter_count(Lily()) == 393_216 + 393_216 + 6_144 == 792_576
  # set_lily_kv_monoscale: no routers.
  assert vit_b16_adapter_count(Lily(router='none')) == 786_432
  # Other expert counts: 12 // ne groups of LPs.
  for ne, groups in ((2, 2), (8, 12)):
    expected = ne * 4 * 32 * 768 + groups * 4 * 768 * 32 + 12 * 4 * 32 * ne
    assert vit_b16_adapter_count(Lily(experts=ne)) == expected


def test_init_follows_the_reference():
  d = TINY_SIZE['hidden']
  flat = flatten(init(tiny_model(lily()), seed=2))
  for site, width in (('key', DIM), ('value', DIM), ('ffn', 2 * DIM)):
    lp, hp = np.asarray(flat[f'adapter_shared/lp_{site}']), np.asarray(
        flat[f'adapter_shared/hp_{site}'])
    assert lp.shape == (2, d, width) and hp.shape == (EXPERTS, width, d)
    assert not hp.any()  # torch.zeros.
    # nn.Linear(d, width) default: U(+-1/sqrt(d)), each group drawn apart.
    assert 0.7 / math.sqrt(d) < np.abs(lp).max() <= 1 / math.sqrt(d)
    assert not np.allclose(lp[0], lp[1])
  router = np.abs(np.asarray(flat[MLP.format(0)]))
  assert router.shape == (2 * DIM, EXPERTS)
  assert 0.5 / math.sqrt(2 * DIM) < router.max() <= 1 / math.sqrt(2 * DIM)


def test_groups_and_subsets_of_targets_and_layers():
  assert Lily().stride(12) == 3 and Lily().groups(12) == (0, 1, 2, 3)
  assert Lily(experts=5).groups(12) == (0, 1, 2, 3, 4, 5)  # 12 // 5 = 2.
  assert Lily(experts=16).stride(12) == 1
  assert Lily(lp_stride=4, layers=(5, 6, 11)).groups(12) == (1, 2)
  model = tiny_model(lily(targets=('value',), layers=(2,)))
  flat = flatten(randomize(init(model)))
  adapter = {k for k in flat if param_role(k) == 'adapter'}
  assert adapter == {'adapter_shared/lp_value', 'adapter_shared/hp_value',
                     ATTN.format(2, 'value')}
  assert flat['adapter_shared/lp_value'].shape == (1, TINY_SIZE['hidden'], DIM)
  np.testing.assert_equal(np.isfinite(np.asarray(model.apply(
      {'params': randomize(init(model))}, images(2)))), True)


def test_training_step_moves_every_lily_parameter():
  model = tiny_model(lily(), num_layers=1)  # Quick to compile.
  before, after, _ = train_steps(model, 1, params=randomize(init(model)))
  assert moved(before, after) == {k for k in before if param_role(k) != 'backbone'}


@pytest.mark.parametrize('kwargs, message', [
    (dict(dim=0), 'dim must be an integer >= 1'),
    (dict(experts=2.0), 'experts must be an integer >= 1'),
    (dict(scale=float('nan')), 'scale must be a finite number'),
    (dict(lp_stride=0), 'lp_stride must be an integer >= 1'),
    (dict(router='token'), "router 'token' is not one of"),
    (dict(targets=()), 'targets is empty'),
    (dict(targets=('qkv',)), r"targets \['qkv'\] are not sites"),
])
def test_bad_configs_are_refused_with_a_reason(kwargs, message):
  with pytest.raises(ValueError, match=message):
    Lily(**kwargs)


def test_defaults_and_recipe():
  method = Lily()
  assert (method.dim, method.experts, method.scale, method.lp_stride, method.router) == (
      32, 4, 1.0, None, 'batch')  # main.py's --dim, --ne, --scale; not --monoscale.
  assert method.targets == ('key', 'value', 'ffn') and Lily.NAME == 'lily'
  assert not Lily.MERGEABLE and Lily.MIXES_TOKENS
  assert method.recipe('tfds') == {'learning_rate': 1e-3, 'weight_decay': 1e-4, 'epochs': 100}
