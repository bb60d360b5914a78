"""SSF: against a PyTorch SSF written from dongzelian/SSF inside timm's ViT, its count
at ViT-B/16, merging, initialisation and one training step."""

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
import torch

from mlae_jax.adapters.sites import Site, adapter_scope, torch_module
from mlae_jax.adapters.ssf import REFERENCE_TARGETS, ScaleShift, Ssf
from mlae_jax.checkpoints import load_pretrained
from mlae_jax.checkpoints.layout import flatten, unflatten
from mlae_jax.model import create_model
from mlae_jax.partition import count_params, param_role
from tiny import (assert_merge_matches, images, init, moved, randomize, relative_error,
                  tiny_model, train_steps, with_random_biases)
from torch_reference import nchw, tensor, timm_vit, tiny_checkpoint

TOLERANCE = 1e-4


# --- The PyTorch side, following models/vision_transformer.py of dongzelian/SSF. ---

def init_ssf_scale_shift(dim):
  scale = torch.nn.Parameter(torch.ones(dim))
  shift = torch.nn.Parameter(torch.zeros(dim))
  torch.nn.init.normal_(scale, mean=1, std=.02)
  torch.nn.init.normal_(shift, std=.02)
  return scale, shift


def ssf_ada(x, scale, shift):
  assert scale.shape == shift.shape
  if x.shape[-1] == scale.shape[0]:
    return x * scale + shift
  if x.shape[1] == scale.shape[0]:
    return x * scale.view(1, -1, 1, 1) + shift.view(1, -1, 1, 1)
  raise ValueError('the input tensor shape does not match the shape of the scale factor.')


class SSFAfter(torch.nn.Module):
  """`module` followed by ssf_ada, as the reference follows each adapted op."""

  def __init__(self, module, dim):
    super().__init__()
    self.module = module
    self.ssf_scale, self.ssf_shift = init_ssf_scale_shift(dim)

  def forward(self, x, *args, **kwargs):
    return ssf_ada(self.module(x, *args, **kwargs), self.ssf_scale, self.ssf_shift)


def reference_module_name(site: Site) -> str:
  # The reference scales the patch tokens after flattening (PatchEmbed.forward): timm's
  # `patch_embed.norm` (an Identity in the ViT) receives exactly those.
  return 'patch_embed.norm' if site.name == 'embedding' else torch_module(site)


def timm_with_ssf(checkpoint, method: Ssf, num_layers: int = 3):
  model = timm_vit(checkpoint)
  model.head.requires_grad_(True)
  wrapped = {}
  for site in method.sites(num_layers):
    name = reference_module_name(site)
    parent, _, leaf = name.rpartition('.')
    parent = model.get_submodule(parent) if parent else model
    module = getattr(parent, leaf)
    dim = getattr(module, 'out_features', None) or model.embed_dim  # Linear, else d.
    setattr(parent, leaf, SSFAfter(module, dim))
    wrapped[site] = getattr(parent, leaf)
  return model, wrapped


def ssf_params(params, seed=3):
  """Adapter scales around 1 and shifts around 0 (as if trained), a random head."""
  flat = flatten(randomize(params, seed=seed))
  for key, value in flat.items():
    if param_role(key) == 'adapter' and key.endswith('/scale'):
      flat[key] = value + 1.0
  return unflatten(flat)


@pytest.mark.parametrize('train', [True, False])
def test_logits_and_gradients_match_pytorch(tmp_path, train):
  path = tiny_checkpoint(tmp_path / 'tiny.npz')
  method = Ssf()
  model = tiny_model(method)
  params = ssf_params(load_pretrained(path, model, rng=jax.random.key(0), image_size=32))
  x, labels = images(4), np.array([0, 3, 1, 4])

  def loss_fn(p):
    logits = model.apply({'params': p}, x, train=train)
    return optax.softmax_cross_entropy_with_integer_labels(logits, labels).mean(), logits

  grads, logits = jax.grad(loss_fn, has_aux=True)(params)
  flat_params, flat_grads = flatten(params), flatten(grads)

  reference, wrapped = timm_with_ssf(path, method)
  assert len(wrapped) == 3 * 6 + 2
  with torch.no_grad():
    reference.head.weight.copy_(tensor(flat_params['head/kernel']).T)
    reference.head.bias.copy_(tensor(flat_params['head/bias']))
    for site, module in wrapped.items():
      module.ssf_scale.copy_(tensor(flat_params[f'{adapter_scope(site)}/scale']))
      module.ssf_shift.copy_(tensor(flat_params[f'{adapter_scope(site)}/shift']))
  reference.train(train)
  torch_logits = reference(nchw(x))
  torch.nn.functional.cross_entropy(torch_logits, torch.from_numpy(labels)).backward()

  assert np.abs(np.asarray(logits)).max() > 1e-2
  errors = {'logits': relative_error(logits, torch_logits.detach().numpy()),
            'head': max(relative_error(flat_grads['head/kernel'],
                                       reference.head.weight.grad.numpy().T),
                        relative_error(flat_grads['head/bias'], reference.head.bias.grad.numpy()))}
  for site, module in wrapped.items():
    for ours, theirs in (('scale', module.ssf_scale), ('shift', module.ssf_shift)):
      assert np.abs(theirs.grad.numpy()).max() > 0, (site, ours)
      errors[f'{site.name}{site.layer}/{ours}'] = relative_error(
          flat_grads[f'{adapter_scope(site)}/{ours}'], theirs.grad.numpy())
  print('relative error: logits', errors['logits'], 'worst', max(errors, key=errors.get),
        max(errors.values()))
  assert max(errors.values()) <= TOLERANCE, errors


def param_counts(method, classes=100):
  model = create_model('ViT-B_16', classes, adapter=method)
  shapes = jax.eval_shape(lambda: model.init(jax.random.key(0), jnp.zeros((1, 224, 224, 3))))
  return count_params(shapes['params'], method.trained_patterns(12))


def test_trainable_parameter_count_of_vit_b16():
  counts = param_counts(Ssf())
  # The reference's ViT-B/16 (models/vision_transformer.py, tuning_mode='ssf'): per block
  # a scale and shift after norm1 (768), qkv (2304), proj (768), norm2 (768), fc1 (3072)
  # and fc2 (768); one after the patch embedding and one after the final norm (768 each).
  ours = counts['adapter'] + counts['tuned']
  assert ours == 12 * 2 * (768 + 2304 + 768 + 768 + 3072 + 768) + 2 * 2 * 768 == 205_824
  assert counts['tuned'] == 0
  # The paper's VTAB-1k figure, 0.24 M, counts the head too, averaged over the 19 tasks:
  # 940 classes in all (the --num-classes of train_scripts/vit/vtab/*/train_ssf.sh).
  classes = (100 + 102 + 47 + 102 + 37 + 10 + 397 + 2 + 10 + 45 + 5
             + 8 + 6 + 6 + 4 + 16 + 16 + 18 + 9)
  assert classes == 940
  assert round((ours + 769 * classes / 19) / 1e6, 2) == 0.24


def test_initialisation_follows_the_reference():
  # init_ssf_scale_shift: scale ~ N(1, 0.02), shift ~ N(0, 0.02), per channel.
  layer = ScaleShift(20_000, 0.02)
  params = layer.init(jax.random.key(0), jnp.zeros((1, 20_000)))['params']
  for values, mean in ((params['scale'], 1.0), (params['shift'], 0.0)):
    values = np.asarray(values)
    assert abs(values.mean() - mean) < 0.001 and abs(values.std() - 0.02) < 0.001
  # Every site gets one scale and one shift of its output width.
  shapes = flatten(jax.eval_shape(lambda: init(tiny_model(Ssf()))))
  widths = {k: v.shape for k, v in shapes.items() if param_role(k) == 'adapter'}
  assert widths['adapter_embedding/scale'] == (32,)
  qkv = 'Transformer/encoderblock_1/MultiHeadDotProductAttention_0/adapter_qkv'
  assert widths[f'{qkv}/shift'] == (96,)
  assert widths['Transformer/encoderblock_2/MlpBlock_0/adapter_fc1/scale'] == (64,)
  assert widths['Transformer/encoderblock_0/adapter_ln2/scale'] == (32,)
  assert (sum(np.prod(v) for v in widths.values())
          == 2 * (3 * (32 + 96 + 32 + 32 + 64 + 32) + 2 * 32))


@pytest.mark.parametrize('targets', [
    REFERENCE_TARGETS,
    ('embedding', 'ln1', 'query', 'key', 'value', 'out', 'ln2', 'fc1', 'fc2', 'encoder_norm'),
    ('fc2',),
])
def test_merged_model_equals_adapted_model_in_eval(targets):
  model = tiny_model(Ssf(targets=targets, layers=(0, 2) if targets == ('fc2',) else ()))
  assert_merge_matches(model, with_random_biases(ssf_params(init(model))))


def test_one_training_step_moves_every_scale_and_shift():
  # The head starts at zero, so the first step moves the head alone; the second all.
  before, after, _ = train_steps(tiny_model(Ssf()), 2)
  assert moved(before, after) == {k for k in before if param_role(k) in ('adapter', 'head')}


@pytest.mark.parametrize('fields, message', [
    (dict(targets=('mlp',)), r"targets \['mlp'\] are not sites"),
    (dict(targets=()), 'targets is empty'),
    (dict(targets=('qkv', 'query')), "'qkv' already covers"),
    (dict(init_std=-0.1), 'init_std must be a number >= 0'),
    (dict(init_std=float('nan')), 'init_std must be a number >= 0'),
])
def test_bad_configs_are_refused_with_a_reason(fields, message):
  with pytest.raises(ValueError, match=message):
    Ssf(**fields)


def test_recipe_is_the_reference_vtab_one():
  assert Ssf().recipe('tfds') == {'learning_rate': 5e-3, 'weight_decay': 5e-5, 'epochs': 100}
