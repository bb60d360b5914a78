"""Stochastic depth against timm's DropPath: per-block rates, keep statistics, and the
whole model's training-mode output with the same keep patterns on both sides."""

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
import torch
from timm.layers import calculate_drop_path_rates

from mlae_jax.adapters import Mlae
from mlae_jax.checkpoints import load_pretrained
from mlae_jax.checkpoints.layout import flatten
from mlae_jax.model.drop_path import DROP_PATH_RNG, DropPath, block_drop_path_rates
from tiny import images, randomize, tiny_model
from torch_reference import (InjectedDropPath, nchw, set_drop_path_keeps, tensor, timm_with_mlae,
                             tiny_checkpoint)


@pytest.mark.parametrize('rate, depth', [(0.1, 12), (0.3, 3), (0.2, 2), (0.1, 1)])
def test_per_block_rates_are_timms(rate, depth):
  ours = block_drop_path_rates(rate, depth)
  theirs = calculate_drop_path_rates(rate, depth)
  assert len(ours) == depth and ours[0] == 0.0
  np.testing.assert_allclose(ours, theirs, rtol=1e-6, atol=1e-9)  # timm: float32 linspace.


def test_keep_rate_and_scaling_hold_statistically():
  rate, batch, tokens = 0.3, 20000, 3
  branch = jnp.broadcast_to(jnp.arange(1, tokens + 1, dtype=jnp.float32)[None, :, None],
                            (batch, tokens, 2))
  out, state = DropPath(rate).apply({}, branch, train=True,
                                    rngs={DROP_PATH_RNG: jax.random.key(0)},
                                    mutable=['intermediates'])
  keep = np.asarray(state['intermediates']['keep'][0])
  out = np.asarray(out)
  # One draw per example: every token and channel of an example shares it.
  np.testing.assert_array_equal(out[keep], np.asarray(branch)[keep] / (1 - rate))
  assert not out[~keep].any()
  kept = keep.mean()
  sigma = np.sqrt(rate * (1 - rate) / batch)
  assert abs(kept - (1 - rate)) < 4 * sigma, kept
  # Expectation preserved: mean over examples ~ the branch (within 4 sigma of the mean).
  assert abs(out[:, 0, 0].mean() - 1.0) < 4 * np.sqrt(rate / (1 - rate) / batch)
  # Different keys, different patterns.
  _, other = DropPath(rate).apply({}, branch, train=True,
                                  rngs={DROP_PATH_RNG: jax.random.key(1)},
                                  mutable=['intermediates'])
  assert (np.asarray(other['intermediates']['keep'][0]) != keep).any()


@pytest.mark.parametrize('dtype', ['float32', 'bfloat16'])
def test_scaling_rounds_as_timm_in_the_branch_dtype(dtype):
  rate = 0.2 / 11  # ViT-B/16 block 2 at 0.1: rounding keep_prob to bf16 first would give 1.0234.
  branch = jax.random.normal(jax.random.key(0), (512, 3, 8)).astype(dtype)
  ours, state = DropPath(rate).apply({}, branch, train=True,
                                     rngs={DROP_PATH_RNG: jax.random.key(1)},
                                     mutable=['intermediates'])
  keep = np.asarray(state['intermediates']['keep'][0])
  assert not keep.all()
  theirs_module = InjectedDropPath(rate)
  theirs_module.keep = torch.from_numpy(keep.copy())
  torch_dtype = getattr(torch, dtype)
  theirs = theirs_module(torch.from_numpy(np.array(branch, np.float32)).to(torch_dtype))
  np.testing.assert_array_equal(np.asarray(ours, np.float32), theirs.float().numpy())


def test_evaluation_and_rate_zero_pass_the_branch_unchanged():
  branch = jnp.ones((4, 3, 2))
  assert DropPath(0.5).apply({}, branch, train=False) is branch  # No PRNG needed.
  assert DropPath(0.0).apply({}, branch, train=True) is branch


@pytest.mark.parametrize('drop_rate', [0.0, 0.5])
def test_training_output_and_gradients_equal_timm_with_the_same_keep_patterns(tmp_path,
                                                                             drop_rate):
  path = tiny_checkpoint(tmp_path / 'tiny.npz')  # 3 blocks: rates 0, 0.25, 0.5.
  experts = 4
  model = tiny_model(Mlae(rank=experts, drop_rate=drop_rate), drop_path_rate=0.5)
  params = randomize(load_pretrained(path, model, rng=jax.random.key(0), image_size=32))
  x, labels = images(8), np.array([0, 3, 1, 4, 2, 2, 0, 1])
  rngs = {'expert_mask': jax.random.key(3), DROP_PATH_RNG: jax.random.key(5)}

  def loss_fn(p):
    logits, state = model.apply({'params': p}, x, train=True, rngs=rngs,
                                mutable=['intermediates'])
    loss = optax.softmax_cross_entropy_with_integer_labels(logits, labels).mean()
    return loss, (logits, flatten(state['intermediates']))

  grads, (logits, intermediates) = jax.grad(loss_fn, has_aux=True)(params)
  keeps = [np.asarray(v[0]) for k, v in intermediates.items() if k.endswith('/keep')]
  assert len(keeps) == 4, 'blocks 1 and 2, attention and MLP branches (block 0 has rate 0)'
  all_keeps = np.concatenate(keeps)
  assert all_keeps.any() and not all_keeps.all(), 'some branches dropped, some kept'

  reference = timm_with_mlae(path, experts, drop_rate, drop_path_rate=0.5)
  assert set_drop_path_keeps(reference, intermediates) == 4
  flat = flatten(params)
  with torch.no_grad():
    reference.head.weight.copy_(tensor(flat['head/kernel']).T)
    reference.head.bias.copy_(tensor(flat['head/bias']))
    for i, block in enumerate(reference.blocks):
      scope = f'Transformer/encoderblock_{i}/MultiHeadDotProductAttention_0/adapter_qkv'
      block.attn.qkv.lora_A.copy_(tensor(flat[f'{scope}/A']))
      block.attn.qkv.lora_B.copy_(tensor(flat[f'{scope}/B']))
      block.attn.qkv.lora_lamda.copy_(tensor(flat[f'{scope}/coeff']))
      if drop_rate > 0:
        block.attn.qkv.mask = tensor(intermediates[f'{scope}/expert_mask'][0].astype(np.float32))
  reference.train()
  theirs = reference(nchw(x))
  torch.nn.functional.cross_entropy(theirs, torch.from_numpy(labels)).backward()

  scale = np.abs(theirs.detach().numpy()).max()
  logit_error = np.abs(np.asarray(logits) - theirs.detach().numpy()).max() / scale
  assert logit_error <= 1e-4
  flat_grads = flatten(grads)
  gradient_errors = []
  for i, block in enumerate(reference.blocks):
    scope = f'Transformer/encoderblock_{i}/MultiHeadDotProductAttention_0/adapter_qkv'
    for ours, tensor_ in (('A', block.attn.qkv.lora_A), ('B', block.attn.qkv.lora_B)):
      expected = tensor_.grad.numpy()
      error = np.abs(np.asarray(flat_grads[f'{scope}/{ours}']) - expected).max()
      gradient_errors.append(error / max(np.abs(expected).max(), 1e-8))
  print(f'\nexpert p={drop_rate}: logits {logit_error:.1e}, adapter gradients '
        f'{max(gradient_errors):.1e} (max abs difference / max abs value)')
  assert max(gradient_errors) <= 1e-4

  # Without the keep patterns (all kept), timm's output is different: the check can fail.
  for i, block in enumerate(reference.blocks):
    for name in ('drop_path1', 'drop_path2'):
      getattr(block, name).keep = torch.ones(8, dtype=torch.bool)
  with torch.no_grad():
    undropped = reference(nchw(x)).numpy()
  assert np.abs(np.asarray(logits) - undropped).max() > 1e-2 * scale
