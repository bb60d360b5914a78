"""RepAdapter: against a PyTorch RepAdapter written from luogen1996/RepAdapter inside
timm's ViT (and its re-parameterisation), its count at ViT-B/16, merging, initialisation
and one training step."""

import types

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
import torch

from mlae_jax.adapters.merge import merge_adapters
from mlae_jax.adapters.repadapter import RepAdapter, RepAdapterLayer, dense_b
from mlae_jax.adapters.sites import Site, adapter_scope
from mlae_jax.checkpoints import load_pretrained
from mlae_jax.checkpoints.layout import flatten
from mlae_jax.model import create_model
from mlae_jax.partition import count_params, param_role
from tiny import (assert_merge_matches, images, init, moved, randomize, relative_error,
                  tiny_model, train_steps, with_random_biases)
from torch_reference import nchw, tensor, timm_vit, tiny_checkpoint

TOLERANCE = 1e-4
DIM, GROUPS, SCALE = 8, 2, 0.7


# --- The PyTorch side, following repadapter.py of luogen1996/RepAdapter. ---

class TorchRepAdapter(torch.nn.Module):
  """conv_B(dropout(conv_A(x))) * scale + x over (batch, tokens, channels)."""

  def __init__(self, in_features=768, hidden_dim=8, groups=2, scale=1, dropout=0.1):
    super().__init__()
    self.conv_A = torch.nn.Conv1d(in_features, hidden_dim, 1, groups=1, bias=True)
    self.conv_B = torch.nn.Conv1d(hidden_dim, in_features, 1, groups=groups, bias=True)
    self.dropout = torch.nn.Dropout(dropout)
    self.groups = groups
    self.scale = scale
    torch.nn.init.xavier_uniform_(self.conv_A.weight)
    torch.nn.init.zeros_(self.conv_A.bias)
    torch.nn.init.zeros_(self.conv_B.weight)
    torch.nn.init.zeros_(self.conv_B.bias)

  def forward(self, x):
    x = x.transpose(1, 2)
    x = self.conv_B(self.dropout(self.conv_A(x))) * self.scale + x
    return x.transpose(1, 2).contiguous()


def forward_vit_block_adapter(self, x, attn_mask=None, is_causal=False):
  # The reference's block forward (it reuses drop_path1 for the MLP branch; timm's two
  # drop paths have one rate, and both are 0 here).
  x = x + self.drop_path1(self.attn(self.adapter_attn(self.norm1(x))))
  x = x + self.drop_path2(self.mlp(self.adapter_mlp(self.norm2(x))))
  return x


def sparse2dense(weight, groups):
  d, cg = weight.shape
  dg = d // groups
  weight = weight.view(groups, dg, cg).transpose(1, 2)
  new_weight = torch.zeros(cg * groups, d, dtype=weight.dtype)
  for i in range(groups):
    new_weight[i * cg:(i + 1) * cg, i * dg:(i + 1) * dg] = weight[i]
  return new_weight.T


def reparameterize(wa, wb, ba, bb, scale=1, do_residual=False):
  bias = 0
  identity = 0
  if ba is not None:
    bias = ba @ wb
  if bb is not None:
    bias = bias + bb
  if do_residual:
    identity = torch.eye(wa.shape[0], wb.shape[1])
  weight = wa @ wb * scale + identity
  return weight.T, bias * scale if isinstance(bias, torch.Tensor) else None


@torch.no_grad()
def set_rep_weight(model):
  """The reference's set_RepWeight('repblock'): adapters folded into qkv and fc1."""
  for block in model.blocks:
    for adapter, linear in ((block.adapter_attn, block.attn.qkv),
                            (block.adapter_mlp, block.mlp.fc1)):
      weight_b = sparse2dense(adapter.conv_B.weight.squeeze(), adapter.groups)
      weight, bias = reparameterize(adapter.conv_A.weight.squeeze().T, weight_b.T,
                                    adapter.conv_A.bias, adapter.conv_B.bias, adapter.scale,
                                    do_residual=True)
      weight, bias = reparameterize(weight.T, linear.weight.T, bias, linear.bias)
      linear.weight.copy_(weight)
      linear.bias.copy_(bias)
    del block.adapter_attn, block.adapter_mlp, block.forward  # The plain timm block.


def timm_with_repadapter(checkpoint, dim=DIM, scale=SCALE, dropout=0.0):
  model = timm_vit(checkpoint)
  model.head.requires_grad_(True)
  for block in model.blocks:
    block.adapter_attn = TorchRepAdapter(model.embed_dim, dim, GROUPS, scale, dropout)
    block.adapter_mlp = TorchRepAdapter(model.embed_dim, dim, GROUPS, scale, dropout)
    block.forward = types.MethodType(forward_vit_block_adapter, block)
  return model


def adapters(model):
  """(our site, torch adapter) pairs."""
  return [pair for i, block in enumerate(model.blocks)
          for pair in ((Site('qkv', i), block.adapter_attn), (Site('fc1', i), block.adapter_mlp))]


def to_torch_b(b):
  """Our (groups, dim/groups, d/groups) B as conv_B's (d, dim/groups) weight."""
  groups, rows, cols = b.shape
  return np.asarray(b).transpose(0, 2, 1).reshape(groups * cols, rows)


def from_torch_b(weight, groups):
  d, rows = weight.shape
  return weight.reshape(groups, d // groups, rows).transpose(0, 2, 1)


def load_into_torch(reference, flat_params):
  with torch.no_grad():
    reference.head.weight.copy_(tensor(flat_params['head/kernel']).T)
    reference.head.bias.copy_(tensor(flat_params['head/bias']))
    for site, adapter in adapters(reference):
      scope = adapter_scope(site)
      adapter.conv_A.weight.copy_(tensor(flat_params[f'{scope}/A']).T[:, :, None])
      adapter.conv_A.bias.copy_(tensor(flat_params[f'{scope}/A_bias']))
      adapter.conv_B.weight.copy_(tensor(to_torch_b(flat_params[f'{scope}/B']))[:, :, None])
      adapter.conv_B.bias.copy_(tensor(flat_params[f'{scope}/B_bias']))


@pytest.mark.parametrize('train, dropout', [(True, 0.0), (False, 0.1)])
def test_logits_and_gradients_match_pytorch(tmp_path, train, dropout):
  path = tiny_checkpoint(tmp_path / 'tiny.npz')
  model = tiny_model(RepAdapter(dim=DIM, groups=GROUPS, scale=SCALE, dropout=dropout))
  params = randomize(load_pretrained(path, model, rng=jax.random.key(0), image_size=32))
  x, labels = images(4), np.array([0, 3, 1, 4])

  def loss_fn(p):
    logits = model.apply({'params': p}, x, train=train, rngs={'dropout': jax.random.key(5)})
    return optax.softmax_cross_entropy_with_integer_labels(logits, labels).mean(), logits

  grads, logits = jax.grad(loss_fn, has_aux=True)(params)
  flat_params, flat_grads = flatten(params), flatten(grads)

  reference = timm_with_repadapter(path, dropout=dropout)
  load_into_torch(reference, flat_params)
  reference.train(train)
  torch_logits = reference(nchw(x))
  torch.nn.functional.cross_entropy(torch_logits, torch.from_numpy(labels)).backward()

  assert np.abs(np.asarray(logits)).max() > 1e-2
  errors = {'logits': relative_error(logits, torch_logits.detach().numpy()),
            'head': max(relative_error(flat_grads['head/kernel'],
                                       reference.head.weight.grad.numpy().T),
                        relative_error(flat_grads['head/bias'], reference.head.bias.grad.numpy()))}
  for site, adapter in adapters(reference):
    scope = adapter_scope(site)
    theirs = {'A': adapter.conv_A.weight.grad.numpy()[:, :, 0].T,
              'A_bias': adapter.conv_A.bias.grad.numpy(),
              'B': from_torch_b(adapter.conv_B.weight.grad.numpy()[:, :, 0], GROUPS),
              'B_bias': adapter.conv_B.bias.grad.numpy()}
    for name, value in theirs.items():
      assert np.abs(value).max() > 0, (site, name)
      errors[f'{site.name}{site.layer}/{name}'] = relative_error(
          flat_grads[f'{scope}/{name}'], value)
  print('relative error: logits', errors['logits'], 'worst', max(errors, key=errors.get),
        max(errors.values()))
  assert max(errors.values()) <= TOLERANCE, errors


def test_merge_matches_the_reference_reparameterisation(tmp_path):
  path = tiny_checkpoint(tmp_path / 'tiny.npz')
  model = tiny_model(RepAdapter(dim=DIM, groups=GROUPS, scale=SCALE))
  params = randomize(load_pretrained(path, model, rng=jax.random.key(0), image_size=32))
  x = images(3)
  plain_model, plain_params = merge_adapters(model, params)
  merged = np.asarray(plain_model.apply({'params': plain_params}, x))
  adapted = np.asarray(model.apply({'params': params}, x))

  reference = timm_with_repadapter(path)
  load_into_torch(reference, flatten(params))
  reference.eval()
  with torch.no_grad():
    torch_adapted = reference(nchw(x)).numpy()
    set_rep_weight(reference)
    torch_merged = reference(nchw(x)).numpy()
  assert relative_error(torch_merged, torch_adapted) <= TOLERANCE  # The reference's claim.
  assert relative_error(merged, torch_merged) <= TOLERANCE
  assert relative_error(merged, adapted) <= TOLERANCE
  # The merged fused qkv weights are the reference's, column for column.
  flat = flatten(plain_params)
  attention = 'Transformer/encoderblock_1/MultiHeadDotProductAttention_0'
  ours = np.concatenate([np.asarray(flat[f'{attention}/{n}/kernel']).reshape(32, 32)
                         for n in ('query', 'key', 'value')], axis=1)
  assert relative_error(ours, reference.blocks[1].attn.qkv.weight.numpy().T) <= TOLERANCE


def param_counts(method, classes=100):
  model = create_model('ViT-B_16', classes, adapter=method)
  shapes = jax.eval_shape(lambda: model.init(jax.random.key(0), jnp.zeros((1, 224, 224, 3))))
  return count_params(shapes['params'], method.trained_patterns(12)), flatten(shapes['params'])


def test_trainable_parameter_count_of_vit_b16():
  counts, shapes = param_counts(RepAdapter())
  # repadapter.py: conv_A 768 -> 8 (768 x 8 weights, 8 biases) and conv_B 8 -> 768 in
  # 2 groups ((8 / 2) x 768 weights, 768 biases); one adapter before attention and one
  # before the MLP of each of the 12 blocks (set_RepAdapter, 'repblock').
  assert counts['adapter'] + counts['tuned'] == 12 * 2 * (768 * 8 + 8 + 4 * 768 + 768) == 239_808
  assert counts['tuned'] == 0
  # The paper's 0.22 M counts the weights only.
  weights = sum(int(np.prod(v.shape)) for k, v in shapes.items()
                if param_role(k) == 'adapter' and k.rsplit('/', 1)[1] in ('A', 'B'))
  assert weights == 12 * 2 * (768 * 8 + 4 * 768) == 221_184
  assert round(weights / 1e6, 2) == 0.22


def test_initialisation_follows_the_reference():
  layer = RepAdapterLayer(768, 8, 2, 1.0, 0.1)
  params = layer.init(jax.random.key(0), jnp.zeros((1, 768)), train=False)['params']
  bound = np.sqrt(6 / (768 + 8))  # xavier_uniform_ of conv_A's (8, 768, 1) weight.
  a = np.asarray(params['A'])
  assert a.shape == (768, 8) and np.abs(a).max() <= bound and np.abs(a).max() > 0.95 * bound
  assert abs(a.std() - bound / np.sqrt(3)) < 0.02 * bound
  assert params['B'].shape == (2, 4, 384)
  for name in ('A_bias', 'B', 'B_bias'):
    assert not np.any(np.asarray(params[name])), name


def test_block_diagonal_b_is_the_grouped_map():
  b = jnp.asarray(np.random.default_rng(0).standard_normal((2, 4, 6)), jnp.float32)
  h = np.random.default_rng(1).standard_normal((5, 8)).astype(np.float32)
  conv = torch.nn.Conv1d(8, 12, 1, groups=2, bias=False)
  with torch.no_grad():
    conv.weight.copy_(tensor(to_torch_b(b))[:, :, None])
    expected = conv(tensor(h).T[None])[0].T.numpy()
  np.testing.assert_allclose(h @ np.asarray(dense_b(b)), expected, rtol=1e-5, atol=1e-5)
  np.testing.assert_allclose(np.asarray(dense_b(b)), sparse2dense(
      tensor(to_torch_b(b)), 2).T.numpy(), rtol=0, atol=0)


def test_dropout_acts_in_training_only():
  model = tiny_model(RepAdapter(dropout=0.5))
  params = randomize(init(model))
  x = images(2)
  evals = [np.asarray(model.apply({'params': params}, x)) for _ in range(2)]
  np.testing.assert_array_equal(evals[0], evals[1])
  trains = [np.asarray(model.apply({'params': params}, x, train=True,
                                   rngs={'dropout': jax.random.key(k)})) for k in (1, 2)]
  assert np.abs(trains[0] - evals[0]).max() > 1e-3
  assert np.abs(trains[0] - trains[1]).max() > 1e-3
  no_dropout = tiny_model(RepAdapter(dropout=0.0))
  np.testing.assert_allclose(
      np.asarray(no_dropout.apply({'params': params}, x, train=True)), evals[0],
      rtol=1e-6, atol=1e-6)


@pytest.mark.parametrize('fields', [
    dict(),
    dict(targets=('query', 'value', 'out', 'fc2'), dim=4, groups=4, scale=3.0),
    dict(targets=('qkv',), layers=(1,), groups=1),
])
def test_merged_model_equals_adapted_model_in_eval(fields):
  model = tiny_model(RepAdapter(**fields))
  assert_merge_matches(model, with_random_biases(randomize(init(model))))


def test_one_training_step_moves_every_adapter_parameter():
  # The head and B start at zero: step 1 moves the head, step 2 B and its bias, step 3 A
  # and its bias (dropout 0.1 in training, from the step's 'dropout' stream).
  before, after, _ = train_steps(tiny_model(RepAdapter()), 3)
  assert moved(before, after) == {k for k in before if param_role(k) in ('adapter', 'head')}


@pytest.mark.parametrize('fields, message', [
    (dict(targets=('ln1',)), r"targets \['ln1'\] are not sites"),
    (dict(targets=()), 'targets is empty'),
    (dict(dim=0), 'dim must be an integer >= 1'),
    (dict(groups=3), 'groups 3 must divide dim 8'),
    (dict(scale=float('inf')), 'scale must be a finite number'),
    (dict(dropout=1.0), r'dropout must lie in \[0, 1\)'),
])
def test_bad_configs_are_refused_with_a_reason(fields, message):
  with pytest.raises(ValueError, match=message):
    RepAdapter(**fields)


def test_groups_must_divide_the_input_width():
  model = tiny_model(RepAdapter(targets=('fc2',), dim=6, groups=6))
  with pytest.raises(ValueError, match='groups 6 must divide the input width 64'):
    init(model)


def test_recipe_is_the_reference_vtab_one():
  assert RepAdapter().recipe('tfds') == {'learning_rate': 1e-3, 'weight_decay': 1e-4,
                                         'epochs': 100}
