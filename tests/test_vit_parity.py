"""Our ViT against timm's, both reading the same original-layout checkpoint."""

import jax
import numpy as np
import pytest
import timm
import torch

from fake_checkpoint import B16, original_vit_shapes, write_original_npz
from mlae_jax.checkpoints import load_pretrained, read_npz
from mlae_jax.checkpoints.layout import flatten, to_linen
from mlae_jax.model import create_model

TOLERANCE = 1e-4


def pre_logits(model, params, x):
  _, state = model.apply({'params': params}, x, mutable=['intermediates'])
  return np.asarray(state['intermediates']['pre_logits'][0])


def timm_pre_logits(path, x, **kwargs):
  model = timm.create_model('vit_base_patch16_224', pretrained=False, num_classes=7, **kwargs)
  model.load_pretrained(str(path))
  model.eval()
  with torch.no_grad():
    tokens = model.forward_features(torch.from_numpy(x).permute(0, 3, 1, 2))
    return model.forward_head(tokens, pre_logits=True).numpy()


def pixels(batch, seed=0):
  return np.random.default_rng(seed).uniform(-1, 1, (batch, 224, 224, 3)).astype(np.float32)


@pytest.fixture(scope='module')
def b16_npz(tmp_path_factory):
  path = tmp_path_factory.mktemp('ckpt') / 'ViT-B_16.npz'
  write_original_npz(path, **B16)
  return path


@pytest.fixture(scope='module')
def shallow_b16_npz(tmp_path_factory):
  path = tmp_path_factory.mktemp('ckpt') / 'ViT-B_16_depth2.npz'
  write_original_npz(path, seed=3, **dict(B16, layers=2))
  return path


def test_full_b16_file_has_the_released_layout_and_loads(b16_npz):
  arrays = read_npz(b16_npz)
  assert set(arrays) == set(original_vit_shapes(**B16))
  assert arrays['head/kernel'].shape == (768, 21843)
  backbone = sum(v.size for k, v in arrays.items() if not k.startswith(('pre_logits', 'head')))
  assert backbone == 85_798_656

  model = create_model('ViT-B_16', num_classes=7)
  params = load_pretrained(b16_npz, model, rng=jax.random.key(0))
  flat = flatten(params)
  renamed = to_linen(arrays)
  for key, value in flat.items():
    if key.startswith('head'):
      assert not np.any(np.asarray(value)), 'the new head starts at zero'
      assert value.shape[-1] == 7
    else:
      np.testing.assert_array_equal(np.asarray(value), renamed[key])
  assert not any(k.startswith('pre_logits') for k in flat)
  logits = model.apply({'params': params}, pixels(1))
  assert logits.shape == (1, 7)


def test_full_b16_features_match_timm(b16_npz):
  model = create_model('ViT-B_16', num_classes=7)
  params = load_pretrained(b16_npz, model, rng=jax.random.key(0))
  x = pixels(2)
  ours, theirs = pre_logits(model, params, x), timm_pre_logits(b16_npz, x)
  assert np.abs(ours - theirs).max() <= TOLERANCE
  assert np.abs(theirs).max() > 0.5  # The comparison is not between near-zero vectors.


@pytest.mark.parametrize('gelu_approximate, act_layer', [(False, None), (True, 'gelu_tanh')])
def test_shallow_b16_features_match_timm(shallow_b16_npz, gelu_approximate, act_layer):
  model = create_model('ViT-B_16', num_classes=7, num_layers=2, gelu_approximate=gelu_approximate)
  params = load_pretrained(shallow_b16_npz, model, rng=jax.random.key(0))
  x = pixels(3, seed=1)
  kwargs = {'depth': 2} | ({'act_layer': act_layer} if act_layer else {})
  ours, theirs = pre_logits(model, params, x), timm_pre_logits(shallow_b16_npz, x, **kwargs)
  assert np.abs(ours - theirs).max() <= TOLERANCE


def test_gelu_variant_matters(shallow_b16_npz):
  """The switch is live: the two GELUs give measurably different features."""
  x = pixels(1, seed=2)
  outs = []
  for approximate in (False, True):
    model = create_model('ViT-B_16', num_classes=7, num_layers=2, gelu_approximate=approximate)
    outs.append(pre_logits(model, load_pretrained(shallow_b16_npz, model, rng=jax.random.key(0)), x))
  assert np.abs(outs[0] - outs[1]).max() > TOLERANCE
