"""Our MLAE against a PyTorch MLAE layer written from the paper, on timm's fused qkv."""

import jax
import numpy as np
import optax
import pytest
import torch

from mlae_jax.adapters import Mlae
from mlae_jax.checkpoints import load_pretrained
from mlae_jax.checkpoints.layout import flatten
from tiny import images, randomize, tiny_model
from torch_reference import nchw, tensor, timm_with_mlae, tiny_checkpoint

TOLERANCE = 1e-4
EXPERTS = 6


def relative_error(ours, theirs):
  theirs = np.asarray(theirs)
  return np.abs(np.asarray(ours) - theirs).max() / max(np.abs(theirs).max(), 1e-12)


@pytest.mark.parametrize('drop_rate', [0.0, 0.5])
def test_logits_and_gradients_match_pytorch(tmp_path, drop_rate):
  path = tiny_checkpoint(tmp_path / 'tiny.npz')
  model = tiny_model(Mlae(rank=EXPERTS, drop_rate=drop_rate, coeff_init=2.0))
  params = randomize(load_pretrained(path, model, rng=jax.random.key(0), image_size=32))
  x, labels = images(4), np.array([0, 3, 1, 4])

  def loss_fn(p):
    logits, state = model.apply({'params': p}, x, train=True,
                                rngs={'expert_mask': jax.random.key(7)}, mutable=['intermediates'])
    loss = optax.softmax_cross_entropy_with_integer_labels(logits, labels).mean()
    return loss, (logits, state['intermediates'])

  grads, (logits, intermediates) = jax.grad(loss_fn, has_aux=True)(params)
  flat_params, flat_grads, flat_inter = flatten(params), flatten(grads), flatten(intermediates)

  reference = timm_with_mlae(path, EXPERTS, drop_rate)
  masks = []
  with torch.no_grad():
    reference.head.weight.copy_(tensor(flat_params['head/kernel']).T)
    reference.head.bias.copy_(tensor(flat_params['head/bias']))
    for i, block in enumerate(reference.blocks):
      scope = f'Transformer/encoderblock_{i}/MultiHeadDotProductAttention_0/adapter_qkv'
      layer = block.attn.qkv
      layer.lora_A.copy_(tensor(flat_params[f'{scope}/A']))
      layer.lora_B.copy_(tensor(flat_params[f'{scope}/B']))
      layer.lora_lamda.copy_(tensor(flat_params[f'{scope}/coeff']))
      if drop_rate > 0:
        mask = np.asarray(flat_inter[f'{scope}/expert_mask'][0])
        masks.append(mask)
        layer.mask = tensor(mask.astype(np.float32))
        # A dropped expert gets no gradient this step.
        assert not np.any(np.asarray(flat_grads[f'{scope}/A'])[~mask])
  if drop_rate > 0:
    assert 0 < np.concatenate(masks).sum() < len(masks) * EXPERTS, 'some dropped, some kept'
  reference.train()
  torch_logits = reference(nchw(x))
  torch.nn.functional.cross_entropy(torch_logits, torch.from_numpy(labels)).backward()

  assert relative_error(logits, torch_logits.detach().numpy()) <= TOLERANCE
  for i, block in enumerate(reference.blocks):
    scope = f'Transformer/encoderblock_{i}/MultiHeadDotProductAttention_0/adapter_qkv'
    layer = block.attn.qkv
    for ours, theirs in (('A', layer.lora_A), ('B', layer.lora_B), ('coeff', layer.lora_lamda)):
      assert np.abs(theirs.grad.numpy()).max() > 0
      assert relative_error(flat_grads[f'{scope}/{ours}'], theirs.grad.numpy()) <= TOLERANCE
