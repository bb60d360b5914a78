"""The bottleneck adapters (Adapter, AdaptFormer) against PyTorch versions written from
their reference code and inserted into timm's ViT blocks, their parameter counts at
ViT-B/16, and their training."""

import functools
import types

import torch  # Before jax: see conftest.py.

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from mlae_jax.adapters.bottleneck import AdaptFormer, Adapter
from mlae_jax.adapters.merge import merge_adapters
from mlae_jax.adapters.method import NotMergeable
from mlae_jax.checkpoints import load_pretrained
from mlae_jax.checkpoints.layout import flatten, unflatten
from mlae_jax.partition import param_role
from tiny import (images, loss_and_grads, moved, randomize, relative_error, tiny_model,
                  train_steps, vit_b16_adapter_count)
from torch_reference import (TINY_SIZE, nchw, set_drop_path_keeps, tensor, timm_vit,
                             tiny_checkpoint)

TOLERANCE = 1e-4
LABELS = np.array([0, 3, 1, 4])


# --- PyTorch versions, following the reference code ---------------------------------

class QuickGELU(torch.nn.Module):
  def forward(self, x):
    return x * torch.sigmoid(1.702 * x)


class NoahAdapter(torch.nn.Module):
  """NOAH's AdapterSuper at its full width: h + ln2(dropout(QuickGELU(ln1(h))))
  (ZhangYuanhan-AI/NOAH model/module/adapter_super.py)."""

  def __init__(self, dim, bottleneck, dropout):
    super().__init__()
    self.ln1 = torch.nn.Linear(dim, bottleneck)
    self.activate = QuickGELU()
    self.dropout = torch.nn.Dropout(dropout)
    self.ln2 = torch.nn.Linear(bottleneck, dim)

  def delta(self, x):
    return self.ln2(self.dropout(self.activate(self.ln1(x))))

  def forward(self, x):
    return x + self.delta(x)


class AdaptFormerBranch(torch.nn.Module):
  """adapter_up(dropout(ReLU(adapter_down(x)))), without residual or scale
  (JieShibo/PETL-ViT binary_adapter/adaptformer.py at bit 32; with `bias`, the layers of
  ShoufaChen/AdaptFormer models/adapter.py)."""

  def __init__(self, dim, bottleneck, dropout, bias):
    super().__init__()
    self.adapter_down = torch.nn.Linear(dim, bottleneck, bias=bias)
    self.act = torch.nn.ReLU()
    self.dropout = torch.nn.Dropout(dropout)
    self.adapter_up = torch.nn.Linear(bottleneck, dim, bias=bias)

  def forward(self, x):
    return self.adapter_up(self.dropout(self.act(self.adapter_down(x))))


def noah_block_forward(self, x):
  """NOAH's Block.forward: the adapter reads the MLP output after drop path."""
  x = x + self.drop_path1(self.ls1(self.attn(self.norm1(x))))
  return x + self.adapter(self.drop_path2(self.ls2(self.mlp(self.norm2(x)))))


def adaptformer_block_forward(self, x):
  """PETL-ViT's forward_block: the adapter reads the residual stream, outside drop path."""
  x = x + self.drop_path1(self.ls1(self.attn(self.norm1(x))))
  return x + self.drop_path2(self.ls2(self.mlp(self.norm2(x)))) + self.adapter_mlp(x) * self.s


def torch_model(method, checkpoint, *, drop_path_rate=0.0):
  """timm's ViT with the reference version of `method` in every block."""
  model = timm_vit(checkpoint, drop_path_rate=drop_path_rate)
  for block in model.blocks:
    if isinstance(method, Adapter):
      block.adapter = NoahAdapter(TINY_SIZE['hidden'], method.bottleneck, method.dropout)
      forward = noah_block_forward
    else:
      block.adapter_mlp = AdaptFormerBranch(TINY_SIZE['hidden'], method.bottleneck,
                                            method.dropout, method.bias)
      block.s = method.scale
      forward = adaptformer_block_forward
    block.forward = types.MethodType(forward, block)
  return model


def torch_layers(method, block):
  """(our name, torch Linear) of the adapter's two maps in a timm block."""
  if isinstance(method, Adapter):
    return (('down', block.adapter.ln1), ('up', block.adapter.ln2))
  return (('down', block.adapter_mlp.adapter_down), ('up', block.adapter_mlp.adapter_up))


def scope(layer):
  return f'Transformer/encoderblock_{layer}/adapter_mlp'


def copy_params(method, reference, flat_params):
  with torch.no_grad():
    reference.head.weight.copy_(tensor(flat_params['head/kernel']).T)
    reference.head.bias.copy_(tensor(flat_params['head/bias']))
    for i, block in enumerate(reference.blocks):
      for name, linear in torch_layers(method, block):
        linear.weight.copy_(tensor(flat_params[f'{scope(i)}/{name}/kernel']).T)
        if linear.bias is not None:
          linear.bias.copy_(tensor(flat_params[f'{scope(i)}/{name}/bias']))
  # The backbone is frozen (timm_vit); the adapter and head train.
  for p in list(reference.head.parameters()):
    p.requires_grad_(True)


@pytest.fixture(scope='module')
def checkpoint(tmp_path_factory):
  return tiny_checkpoint(tmp_path_factory.mktemp('bottleneck') / 'tiny.npz')


@functools.lru_cache(maxsize=None)
def fresh_params(cls, bias, path):
  """The checkpoint's backbone, the method's freshly initialised adapters and the zero
  head (the tree depends only on the class and `bias`, so tests share it)."""
  method = cls() if cls is Adapter else cls(bias=bias)
  return load_pretrained(path, tiny_model(method), rng=jax.random.key(0), image_size=32)


def setup(path, method, **model_fields):
  """A tiny model with `method`, and parameters whose adapters and head are random (as if
  trained)."""
  params = randomize(fresh_params(type(method), getattr(method, 'bias', True), path))
  return path, tiny_model(method, **model_fields), params


def compare(method, reference, logits, flat_grads, x, train):
  reference.train(train)
  torch_logits = reference(nchw(x))
  torch.nn.functional.cross_entropy(torch_logits, torch.from_numpy(LABELS)).backward()
  errors = {'logits': relative_error(logits, torch_logits.detach().numpy())}
  errors['head'] = relative_error(flat_grads['head/kernel'], reference.head.weight.grad.numpy().T)
  for i, block in enumerate(reference.blocks):
    for name, linear in torch_layers(method, block):
      assert np.abs(linear.weight.grad.numpy()).max() > 0, (i, name)
      errors[f'{i}/{name}/kernel'] = relative_error(flat_grads[f'{scope(i)}/{name}/kernel'],
                                                    linear.weight.grad.numpy().T)
      if linear.bias is not None:
        errors[f'{i}/{name}/bias'] = relative_error(flat_grads[f'{scope(i)}/{name}/bias'],
                                                    linear.bias.grad.numpy())
  return errors


METHODS = [
    Adapter(dropout=0.0),
    AdaptFormer(dropout=0.0, scale=0.7),
    AdaptFormer(dropout=0.0, scale=0.7, bias=False),
]


@pytest.mark.parametrize('method', METHODS, ids=['adapter', 'adaptformer', 'adaptformer-nobias'])
def test_logits_and_gradients_match_pytorch_in_training(checkpoint, method):
  path, model, params = setup(checkpoint, method)
  x = images(4)
  logits, flat_grads, _ = loss_and_grads(model, params, x, LABELS, train=True)
  reference = torch_model(method, path)
  copy_params(method, reference, flatten(params))
  errors = compare(method, reference, logits, flat_grads, x, train=True)
  worst = max(errors, key=errors.get)
  assert errors[worst] <= TOLERANCE, (worst, errors[worst])


@pytest.mark.parametrize('method', [Adapter(), AdaptFormer(scale=0.7)],
                         ids=['adapter', 'adaptformer'])
def test_eval_logits_match_pytorch_with_dropout_configured(checkpoint, method):
  # Dropout 0.1 (the default) acts in training only, on both sides.
  path, model, params = setup(checkpoint, method)
  x = images(4)
  logits = model.apply({'params': params}, x, train=False)
  reference = torch_model(method, path)
  copy_params(method, reference, flatten(params))
  reference.eval()
  with torch.no_grad():
    torch_logits = reference(nchw(x)).numpy()
  assert relative_error(logits, torch_logits) <= TOLERANCE


@pytest.mark.parametrize('method', [Adapter(dropout=0.0), AdaptFormer(dropout=0.0, scale=0.7)],
                         ids=['adapter', 'adaptformer'])
def test_logits_and_gradients_match_pytorch_with_drop_path(checkpoint, method):
  """Drop path 0.5 in training, our keep patterns carried over to timm: the reference's
  own order (NOAH: adapter(drop_path(mlp)); PETL-ViT: drop_path(mlp) + s adapter(x)).
  A site before drop path would differ here: NOAH's dropped examples still add the
  adapter of zero, and AdaptFormer's adapter term is never dropped."""
  path, model, params = setup(checkpoint, method, drop_path_rate=0.5)
  x = images(4)
  logits, flat_grads, intermediates = loss_and_grads(model, params, x, LABELS, train=True,
                                                         drop_path_key=jax.random.key(5))
  keeps = [np.asarray(v[0]) for k, v in intermediates.items() if k.endswith('drop_path_1/keep')]
  assert any(not keep.all() for keep in keeps), 'some MLP branch must be dropped'
  reference = torch_model(method, path, drop_path_rate=0.5)
  copy_params(method, reference, flatten(params))
  assert set_drop_path_keeps(reference, intermediates) > 0
  errors = compare(method, reference, logits, flat_grads, x, train=True)
  worst = max(errors, key=errors.get)
  assert errors[worst] <= TOLERANCE, (worst, errors[worst])


def test_adapter_init_is_noahs_reinitialisation(checkpoint):
  params = flatten(fresh_params(Adapter, True, checkpoint))
  kernels = np.concatenate([np.ravel(v) for k, v in params.items()
                            if param_role(k) == 'adapter' and k.endswith('kernel')])
  assert abs(kernels.std() - 0.02) < 0.004 and abs(kernels.mean()) < 0.004
  for key, value in params.items():
    if param_role(key) == 'adapter' and key.endswith('bias'):
      assert not np.any(np.asarray(value)), key


def test_adaptformer_starts_as_the_backbone(checkpoint):
  flat = flatten(fresh_params(AdaptFormer, True, checkpoint))
  assert not np.any(np.asarray(flat[f'{scope(0)}/up/kernel']))
  down = np.asarray(flat[f'{scope(0)}/down/kernel'])
  # torch's kaiming_uniform_(a=sqrt(5)): U(+-1/sqrt(d_in)), d_in = 32.
  assert 0.8 / np.sqrt(32) < np.abs(down).max() <= 1 / np.sqrt(32)
  head = {'head/kernel': jnp.ones_like(flat['head/kernel'])}  # So the logits are not 0.
  params = unflatten({**flat, **head})
  plain = unflatten({**{k: v for k, v in flat.items() if param_role(k) != 'adapter'}, **head})
  x = images(4)
  np.testing.assert_allclose(tiny_model(AdaptFormer()).apply({'params': params}, x),
                             tiny_model(None).apply({'params': plain}, x), rtol=0, atol=0)


def test_trainable_parameter_counts_of_vit_b16():
  # NOAH's AdapterSuper at width 8 (ln1 768->8, ln2 8->768, both with bias) in 12 blocks:
  # 12 x (768*8 + 8 + 8*768 + 768) = 156,768, the 0.16 M of the NOAH/SPT/MLAE tables.
  assert vit_b16_adapter_count(Adapter()) == 156_768
  # ShoufaChen/AdaptFormer's down_proj/up_proj (biased) at ffn_num 8: the same 156,768,
  # the 0.16 M printed for AdaptFormer; PETL-ViT's bias-free layers: 12 x 2 x 768*8.
  assert vit_b16_adapter_count(AdaptFormer()) == 156_768
  assert vit_b16_adapter_count(AdaptFormer(bias=False)) == 147_456
  assert vit_b16_adapter_count(Adapter(layers=(0, 11))) == 2 * 13_064


@pytest.mark.parametrize('method', [Adapter(), AdaptFormer()], ids=['adapter', 'adaptformer'])
def test_not_mergeable(checkpoint, method):
  _, model, params = setup(checkpoint, method)
  with pytest.raises(NotMergeable):
    merge_adapters(model, params)


@pytest.mark.parametrize('method', [Adapter(), AdaptFormer()], ids=['adapter', 'adaptformer'])
def test_dropout_acts_in_training_only(checkpoint, method):
  _, model, params = setup(checkpoint, method)
  x = images(4)

  def run(key):
    return np.asarray(model.apply({'params': params}, x, train=True,
                                  rngs={'dropout': jax.random.key(key)}))

  assert not np.allclose(run(0), run(1))
  no_dropout = tiny_model(type(method)(dropout=0.0))
  np.testing.assert_allclose(model.apply({'params': params}, x, train=False),
                             no_dropout.apply({'params': params}, x, train=True), rtol=1e-6)


def test_trains_through_the_training_step():
  # AdaptFormer: its zero up map makes the start the slowest to reach every leaf.
  model = tiny_model(AdaptFormer(), num_layers=1)  # One block: quick compiles.
  # Three steps: the zero-initialised head (and AdaptFormer's zero up map) pass no
  # gradient on at first; by the third step every adapter leaf has had one.
  before, after, _ = train_steps(model, 3)
  assert moved(before, after) == {k for k in before if param_role(k) != 'backbone'}


@pytest.mark.parametrize('cls, fields, message', [
    (Adapter, dict(bottleneck=0), 'bottleneck must be an integer >= 1'),
    (Adapter, dict(bottleneck=8.0), 'bottleneck must be an integer >= 1'),
    (Adapter, dict(dropout=1.0), r'dropout must lie in \[0, 1\)'),
    (Adapter, dict(targets=('qkv',)), "targets \\['qkv'\\] are not sites"),
    (Adapter, dict(targets=()), 'targets is empty'),
    (AdaptFormer, dict(scale=float('inf')), 'scale must be a finite number'),
    (AdaptFormer, dict(scale='0.1'), 'scale must be a finite number'),
    (AdaptFormer, dict(bias=1), 'bias must be True or False'),
])
def test_bad_configs_are_refused_with_a_reason(cls, fields, message):
  with pytest.raises(ValueError, match=message):
    cls(**fields)


def test_recipes_and_defaults_are_the_references():
  assert Adapter().recipe('tfds') == {'learning_rate': 5e-3, 'weight_decay': 1e-4, 'epochs': 100}
  assert AdaptFormer().recipe('tfds') == {'learning_rate': 1e-3, 'weight_decay': 1e-4,
                                          'epochs': 100}
  assert (Adapter().bottleneck, Adapter().dropout, Adapter().targets) == (8, 0.1, ('mlp',))
  assert (AdaptFormer().bottleneck, AdaptFormer().dropout, AdaptFormer().scale,
          AdaptFormer().bias) == (8, 0.1, 1.0, True)
  assert not Adapter.MERGEABLE and not AdaptFormer.MERGEABLE
  assert (Adapter.NAME, AdaptFormer.NAME) == ('adapter', 'adaptformer')
