"""NEAT against a PyTorch version written after the reference (yibozhong/neat,
image-classification/neat.py) inserted into timm's ViT; its ViT-B/16 counts, init,
merging, a training step and its config checks."""

import math

import torch  # Before jax (see conftest.py).
from torch import nn
from torch.nn import functional as F

import jax
import numpy as np
import optax
import pytest

from fake_checkpoint import write_original_npz
from mlae_jax.adapters.method import PEFT_RECIPE
from mlae_jax.adapters.neat import Neat
from mlae_jax.checkpoints import load_pretrained
from mlae_jax.checkpoints.layout import flatten
from mlae_jax.partition import param_role
from tiny import (assert_merge_matches, images, init, moved, randomize, relative_error,
                  tiny_model, train_steps, vit_b16_adapter_count)
from torch_reference import TINY_SIZE, nchw, tensor, timm_vit

TOLERANCE = 1e-4
ATTN = 'Transformer/encoderblock_{}/MultiHeadDotProductAttention_0/adapter_{}'
MLP = 'Transformer/encoderblock_{}/MlpBlock_0/adapter_{}'
MODE_1 = ('query', 'value')
MODE_2 = ('query', 'value', 'fc1', 'fc2')
SIZE = {**TINY_SIZE, 'layers': 2}  # Quicker to compile; block 1 still ends the model.


# --- The PyTorch side: the reference's two networks, and its two forwards as wrappers
# of timm's fused qkv (q and v thirds, K0 = those rows of qkv.weight, transposed) and
# of mlp.fc1 / mlp.fc2 (HF ViT's separate query / value and `dense` layers there).

class NeatVanilla(nn.Module):
  """neat.py `neat_vanilla`: x @ relu(W0 A^T), then B (zero)."""

  def __init__(self, dim, out_dim):
    super().__init__()
    self.non_linear = nn.ReLU()
    self.A = nn.Linear(out_dim, dim, bias=False)
    self.B = nn.Linear(dim, out_dim, bias=False)
    nn.init.zeros_(self.B.weight)

  def forward(self, x, weight):
    return self.B(x @ self.non_linear(weight @ self.A.weight.t()))


class NeatMultilayers(nn.Module):
  """neat.py `neat_multilayers`: encoders save their inputs, decoders add them back
  in reverse order; x @ B(chain)."""

  def __init__(self, dim, out_dim, depth):
    super().__init__()
    assert (depth - 2) % 2 == 0
    self.non_linear = nn.ReLU()
    self.res_num = (depth - 2) // 2
    self.A = nn.Linear(out_dim, dim, bias=False)
    self.encoders = nn.ModuleList([nn.Linear(dim, dim, bias=False) for _ in range(self.res_num)])
    self.decoders = nn.ModuleList([nn.Linear(dim, dim, bias=False) for _ in range(self.res_num)])
    self.B = nn.Linear(dim, out_dim, bias=False)
    nn.init.zeros_(self.B.weight)

  def forward(self, x, weight):
    delta_w = self.non_linear(weight @ self.A.weight.t())
    residuals = []
    for i in range(self.res_num):
      residuals.append(delta_w.clone())
      delta_w = self.non_linear(self.encoders[i](delta_w))
    for i in range(self.res_num):
      delta_w = self.non_linear(self.decoders[i](delta_w))
      delta_w = delta_w + residuals[self.res_num - 1 - i]
    return x @ self.B(delta_w)


class NeatQKV(nn.Module):
  """`forward_attn` on timm's fused qkv: query + 1.0 * q_adapter(x, Wq^T), value +
  1.0 * v_adapter(x, Wv^T), key unchanged."""

  def __init__(self, qkv, q_adapter, v_adapter):
    super().__init__()
    self.qkv, self.q_adapter, self.v_adapter = qkv, q_adapter, v_adapter

  def forward(self, x):
    d = self.qkv.weight.shape[1]
    w = self.qkv.weight
    q = 1.0 * self.q_adapter(x, w[:d].t())
    v = 1.0 * self.v_adapter(x, w[2 * d:].t())
    return self.qkv(x) + torch.cat([q, torch.zeros_like(q), v], dim=-1)


class NeatDense(nn.Module):
  """`forward_ffn`: F.linear(x, W, b) + 1.0 * adapter(x, W^T)."""

  def __init__(self, base, adapter):
    super().__init__()
    self.base, self.adapter = base, adapter

  def forward(self, x):
    base = F.linear(x, self.base.weight, self.base.bias)
    return base + 1.0 * self.adapter(x, self.base.weight.t())


def network(dim, out_dim, depth):
  """`set_neat_vanilla` builds neat_vanilla, `set_neat_multilayers` neat_multilayers."""
  return NeatVanilla(dim, out_dim) if depth == 2 else NeatMultilayers(dim, out_dim, depth)


def set_neat(vit, mode, mhsa_dim, ffn_dim, depth, ffn_depth):
  """The reference's setters on timm's ViT. `ffn_depth` is explicit: the reference's
  `set_neat_multilayers` uses 4 there whatever `depth` is."""
  d = vit.embed_dim
  for block in vit.blocks:
    block.attn.qkv = NeatQKV(block.attn.qkv, network(mhsa_dim, d, depth),
                             network(mhsa_dim, d, depth))
    if mode == 2:
      for name in ('fc1', 'fc2'):
        base = getattr(block.mlp, name)
        setattr(block.mlp, name, NeatDense(base, network(ffn_dim, base.weight.shape[0], ffn_depth)))
  return vit


def torch_networks(vit, mode):
  """[(our adapter scope, torch network)] of every adapted map."""
  pairs = []
  for i, block in enumerate(vit.blocks):
    pairs += [(ATTN.format(i, 'query'), block.attn.qkv.q_adapter),
              (ATTN.format(i, 'value'), block.attn.qkv.v_adapter)]
    if mode == 2:
      pairs += [(MLP.format(i, name), getattr(block.mlp, name).adapter) for name in ('fc1', 'fc2')]
  return pairs


def copy_ours_to_torch(vit, mode, flat):
  """Our parameters into the reference's; [(our path, torch weight)], each ours being
  the torch weight transposed ((in, out) kernels)."""
  pairs = [('head/kernel', vit.head.weight), ('head/bias', vit.head.bias)]
  for scope, net in torch_networks(vit, mode):
    pairs += [(f'{scope}/A', net.A.weight), (f'{scope}/B', net.B.weight)]
    for kind in ('encoder', 'decoder'):
      for j, layer in enumerate(getattr(net, f'{kind}s', ())):
        pairs.append((f'{scope}/{kind}_{j}', layer.weight))
  with torch.no_grad():
    for path, theirs in pairs:
      value = tensor(flat[path])
      theirs.copy_(value if path == 'head/bias' else value.T)
  return pairs


@pytest.mark.parametrize('mode, depth, mlp_depth, mlp_rank', [
    # neat_mode 1 with set_neat_vanilla (the defaults' placement and depth).
    (1, 2, None, None),
    # --multilayer --depth 2 --neat_mode 2: A, B on q, v; the reference's depth 4 on the
    # MLP.
    (2, 2, 4, None),
    # Depth 4 on q, v, vanilla on the MLP with its own width (ffn_dim): together with the
    # case above, both depths at both kinds of site.
    (2, 4, 2, 3)])
def test_logits_and_gradients_match_pytorch(tmp_path, mode, depth, mlp_depth, mlp_rank):
  path = tmp_path / 'tiny.npz'
  write_original_npz(path, **SIZE)
  rank = 4
  method = Neat(targets=MODE_1 if mode == 1 else MODE_2, rank=rank, depth=depth,
                mlp_depth=mlp_depth, mlp_rank=mlp_rank)
  model = tiny_model(method, num_layers=SIZE['layers'])
  params = randomize(load_pretrained(path, model, rng=jax.random.key(0), image_size=32))
  x, labels = images(4), np.array([0, 3, 1, 4])

  def loss_fn(p, train):
    logits = model.apply({'params': p}, x, train=train)
    return optax.softmax_cross_entropy_with_integer_labels(logits, labels).mean(), logits

  # Training mode (NEAT has no dropout: eval is the same map, checked by the merge test).
  grads, logits = jax.jit(jax.grad(loss_fn, has_aux=True), static_argnums=1)(params, True)
  flat_params, flat_grads = flatten(params), flatten(grads)

  reference = set_neat(timm_vit(path, SIZE), mode, rank, mlp_rank or rank, depth,
                       mlp_depth or depth)
  reference.head.weight.requires_grad_(True)
  reference.head.bias.requires_grad_(True)
  pairs = copy_ours_to_torch(reference, mode, flat_params)
  reference.train()
  torch_logits = reference(nchw(x))
  F.cross_entropy(torch_logits, torch.from_numpy(labels)).backward()

  errors = {'logits': relative_error(logits, torch_logits.detach().numpy())}
  for key, theirs in pairs:
    expected = theirs.grad.numpy()
    expected = expected if key == 'head/bias' else expected.T
    assert np.abs(expected).max() > 0, key  # Ours equal it: jax.grad is not zero either.
    errors[key] = relative_error(flat_grads[key], expected)
  print(f'mode {mode} depth {depth} mlp_depth {mlp_depth} max relative errors: '
        f'logits {errors["logits"]:.2e}, '
        f'gradients {max(v for k, v in errors.items() if k != "logits"):.2e}')
  assert all(error <= TOLERANCE for error in errors.values()), errors
  # Every method parameter was compared, and the backbone is the reference's (only
  # adapters and the head train there, main.py `get_model`).
  assert {k for k in flat_params if param_role(k) in ('adapter', 'head')} == {
      k for k, _ in pairs}
  assert {n for n, p in reference.named_parameters() if p.requires_grad} == {
      n for n in dict(reference.named_parameters())
      if 'adapter' in n or n.startswith('head.')}


def test_trainable_parameter_counts_of_vit_b16():
  # Mode 1 (q, v), rank 8: 2 sites x 12 blocks x (768*8 (A) + 8*768 (B)) = 294,912, the
  # budget of LoRA rank 8 on q, v.
  assert vit_b16_adapter_count(Neat()) == 2 * 12 * (768 * 8 + 8 * 768) == 294_912
  # Mode 2, rank 8, by hand: per block q, v 2 x 12,288; fc1 (d_out 3072) 3072*8 + 8*3072
  # = 49,152; fc2 (d_out 768) 768*8 + 8*768 = 12,288: 86,016 x 12 = 1,032,192.
  assert vit_b16_adapter_count(Neat(targets=MODE_2)) == 1_032_192
  # The reference's runs (run.sh: mhsa_dim 7, neat_mode 1): 24 x 2 x 768 x 7 = 258,048
  # (what its `print_trainable_parameters` counts less the classifier); README.md's
  # --multilayer --depth 6 adds 4 layers of 7 x 7 per map: 258,048 + 24 x 196 = 262,752.
  assert vit_b16_adapter_count(Neat(rank=7)) == 258_048
  assert vit_b16_adapter_count(Neat(rank=7, depth=6)) == 262_752


def test_init_follows_the_reference():
  r, d, mlp = 4, TINY_SIZE['hidden'], TINY_SIZE['mlp']
  model = tiny_model(Neat(targets=MODE_2, rank=r, depth=4))
  flat = flatten(jax.jit(model.init)(jax.random.key(2), images(1))['params'])
  for scope, d_out in ((ATTN.format(0, 'query'), d), (ATTN.format(1, 'value'), d),
                       (MLP.format(0, 'fc1'), mlp), (MLP.format(2, 'fc2'), d)):
    a = np.asarray(flat[f'{scope}/A'])
    assert a.shape == (d_out, r)
    # nn.Linear(d_out, r).weight: U(+-1/sqrt(d_out)).
    assert 0.8 / math.sqrt(d_out) < np.abs(a).max() <= 1 / math.sqrt(d_out), scope
    assert np.asarray(flat[f'{scope}/B']).shape == (r, d_out)
    assert not np.asarray(flat[f'{scope}/B']).any()  # nn.init.zeros_.
    for name in ('encoder_0', 'decoder_0'):
      w = np.abs(np.asarray(flat[f'{scope}/{name}']))  # nn.Linear(r, r): U(+-1/sqrt(r)).
      assert w.shape == (r, r) and 0.5 / math.sqrt(r) < w.max() <= 1 / math.sqrt(r)
  assert not any(k.endswith('encoder_1') for k in flat)


def test_merged_model_equals_adapted_model():
  # Every site, depths 4 and 6 (two residuals), two widths, a scale, some blocks.
  method = Neat(targets=('query', 'key', 'value', 'out', 'fc1', 'fc2'), rank=3, depth=4,
                mlp_rank=5, mlp_depth=6, scale=0.7, layers=(0, 2))
  model = tiny_model(method)
  assert_merge_matches(model, randomize(init(model)))


def test_training_steps_update_every_network_parameter():
  model = tiny_model(Neat(targets=MODE_2, rank=3, depth=4), num_layers=1)  # Quick to compile.
  # Zero head and zero B: the head moves first, then B, then A and the r x r layers.
  before, after, _ = train_steps(model, 3)
  assert moved(before, after) == {k for k in before if param_role(k) != 'backbone'}


@pytest.mark.parametrize('kwargs, message', [
    (dict(rank=0), 'rank must be an integer >= 1'),
    (dict(rank=2.0), 'rank must be an integer >= 1'),
    (dict(mlp_rank=0), 'mlp_rank must be an integer >= 1'),
    (dict(depth=3), 'depth must be an even integer >= 2'),
    (dict(depth=0), 'depth must be an even integer >= 2'),
    (dict(depth=True), 'depth must be an even integer >= 2'),
    (dict(mlp_depth=5), 'mlp_depth must be an even integer >= 2'),
    (dict(scale=float('nan')), 'scale must be a finite number'),
    (dict(scale='1'), 'scale must be a finite number'),
    (dict(targets=()), 'targets is empty'),
    (dict(targets=('qkv',)), r"targets \['qkv'\] are not sites"),
    (dict(targets=('query', 'ln1')), r"targets \['ln1'\] are not sites"),
])
def test_bad_configs_are_refused_with_a_reason(kwargs, message):
  with pytest.raises(ValueError, match=message):
    Neat(**kwargs)


def test_defaults_and_recipe():
  method = Neat()
  assert (method.rank, method.mlp_rank, method.depth, method.mlp_depth, method.scale) == (
      8, None, 2, None, 1.0)
  assert method.targets == MODE_1 and Neat.MERGEABLE and Neat.NAME == 'neat'
  assert method.site_shape('fc1') == (8, 2) == method.site_shape('value')
  assert Neat(mlp_rank=5, mlp_depth=4).site_shape('fc2') == (5, 4)
  assert method.recipe('tfds') == PEFT_RECIPE
