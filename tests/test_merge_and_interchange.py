"""Merging adapters into the base weights, and moving them to and from PyTorch."""

import jax
import numpy as np
import pytest
import torch

from mlae_jax.adapters import Lora, Mlae
from mlae_jax.adapters.merge import merge_adapters
from mlae_jax.adapters.torch_layout import (export_torch_state, import_torch_state,
                                            load_torch_state, save_torch_state)
from mlae_jax.checkpoints import load_pretrained
from mlae_jax.checkpoints.layout import flatten
from mlae_jax.partition import param_role
from tiny import images, init, randomize, tiny_model
from torch_reference import nchw, tensor, timm_with_mlae, tiny_checkpoint

ADAPTERS = {
    'mlae_qkv': Mlae(rank=4, drop_rate=0.5, coeff_init=2.0),
    'mlae_everywhere': Mlae(
        targets=('query', 'key', 'value', 'out', 'fc1', 'fc2'), rank=3, drop_rate=0.3),
    'mlae_fixed_frozen_coeff': Mlae(mask='fixed', pattern='hourglass',
                                    adaptive_coeff=False, coeff_init=0.5),
    'mlae_per_layer': Mlae(rank=(1, 2, 3), drop_rate=(0.0, 0.1, 0.9)),
    'lora': Lora(rank=4, targets=('qkv', 'fc2'), alpha=8),
    'lora_qv': Lora(rank=4, targets=('query', 'value')),
    'mlae_rank2_experts': Mlae(rank=4, expert_rank=2, drop_rate=0.5),  # Table 12.
    'mlae_block_subset': Mlae(rank=2, layers=(0, 2), drop_rate=0.5),
}


@pytest.mark.parametrize('name', ADAPTERS)
def test_merged_model_equals_adapted_model_in_eval(name):
  adapter = ADAPTERS[name]
  layers = 12 if getattr(adapter, 'mask', '') == 'fixed' else 3
  model = tiny_model(adapter, num_layers=layers)
  params = randomize(init(model))
  plain_model, plain_params = merge_adapters(model, params)
  assert plain_model.adapter is None
  assert not any(param_role(k) == 'adapter' for k in flatten(plain_params))
  assert (set(flatten(plain_params)) ==
          {k for k in flatten(params) if param_role(k) != 'adapter'})
  x = images(3)
  adapted = np.asarray(model.apply({'params': params}, x))
  merged = np.asarray(plain_model.apply({'params': plain_params}, x))
  base = np.asarray(plain_model.apply({'params': {k: v for k, v in params.items()}}, x))
  assert np.abs(merged - adapted).max() <= 1e-5
  assert np.abs(base - adapted).max() > 1e-2  # The adapters do change the outputs.


def test_merging_untrained_adapters_changes_nothing():
  model = tiny_model(Mlae(rank=4))
  params = init(model)  # B = 0
  _, plain = merge_adapters(model, params)
  for key, value in flatten(plain).items():
    np.testing.assert_array_equal(value, flatten(params)[key])


@pytest.mark.parametrize('name', ['mlae_qkv', 'mlae_fixed_frozen_coeff', 'lora'])
def test_export_import_round_trip_is_exact(name, tmp_path):
  adapter = ADAPTERS[name]
  model = tiny_model(adapter, num_layers=12 if getattr(adapter, 'mask', '') == 'fixed' else 3)
  trained = randomize(init(model, seed=0), roles=('adapter',))
  state = export_torch_state(model, trained)
  for suffix in ('pt', 'npz'):
    save_torch_state(tmp_path / f'adapters.{suffix}', state)
    loaded = load_torch_state(tmp_path / f'adapters.{suffix}')
    restored = import_torch_state(model, init(model, seed=5), loaded)
    for key, value in flatten(trained).items():
      if param_role(key) == 'adapter':
        np.testing.assert_array_equal(np.asarray(flatten(restored)[key]), np.asarray(value))


def test_exported_layout_is_the_pytorch_layers():
  model = tiny_model(Mlae(rank=4))
  state = export_torch_state(model, init(model))
  assert set(state) == {f'blocks.{i}.attn.qkv.{n}' for i in range(3)
                        for n in ('lora_A', 'lora_B', 'lora_lamda')}
  assert state['blocks.0.attn.qkv.lora_A'].shape == (4, 32)
  assert state['blocks.0.attn.qkv.lora_B'].shape == (4, 96)
  assert state['blocks.0.attn.qkv.lora_lamda'].shape == (4,)
  lora_model = tiny_model(Lora(rank=4, targets=('out', 'fc1')))
  lora_state = export_torch_state(lora_model, init(lora_model))
  assert lora_state['blocks.2.attn.proj.lora_B'].shape == (32, 4)
  assert lora_state['blocks.2.mlp.fc1.lora_B'].shape == (64, 4)
  assert 'blocks.2.mlp.fc1.lora_lamda' not in lora_state


def test_weights_move_between_the_implementations_both_ways(tmp_path):
  path = tiny_checkpoint(tmp_path / 'tiny.npz')
  model = tiny_model(Mlae(rank=4, coeff_init=2.0))
  params = randomize(load_pretrained(path, model, rng=jax.random.key(0), image_size=32))
  x = images(2)
  reference = timm_with_mlae(path, 4).eval()
  with torch.no_grad():
    reference.head.weight.copy_(tensor(flatten(params)['head/kernel']).T)
    reference.head.bias.copy_(tensor(flatten(params)['head/bias']))

  # JAX -> PyTorch: load our exported adapters into the PyTorch layers.
  state = {k: torch.from_numpy(np.array(v)) for k, v in export_torch_state(model, params).items()}
  missing, unexpected = reference.load_state_dict(state, strict=False)
  assert not unexpected and not any('lora' in k for k in missing)
  with torch.no_grad():
    theirs = reference(nchw(x)).numpy()
  ours = np.asarray(model.apply({'params': params}, x))
  assert np.abs(ours - theirs).max() <= 1e-4 * np.abs(theirs).max()

  # PyTorch -> JAX: new adapter values set in PyTorch come back through the state dict.
  generator = torch.Generator().manual_seed(0)
  with torch.no_grad():
    for name, value in reference.named_parameters():
      if 'lora' in name:
        value.copy_(torch.randn(value.shape, generator=generator) * 0.3)
    theirs = reference(nchw(x)).numpy()
  imported = import_torch_state(model, params, reference.state_dict())
  ours = np.asarray(model.apply({'params': imported}, x))
  assert np.abs(ours - theirs).max() <= 1e-4 * np.abs(theirs).max()


def test_interchange_errors_say_what_is_wrong():
  separate = tiny_model(Mlae(targets=('query',)))
  with pytest.raises(ValueError, match="no separate layer for site 'query'"):
    export_torch_state(separate, init(separate))
  grouped = tiny_model(Mlae(rank=4, expert_rank=2))
  with pytest.raises(ValueError, match='MLAE \\(rank-1 experts\\) and LoRA'):
    export_torch_state(grouped, init(grouped))
  model = tiny_model(Mlae(rank=4))
  params = init(model)
  state = export_torch_state(model, params)
  del state['blocks.1.attn.qkv.lora_A']
  state['blocks.2.attn.qkv.lora_B'] = np.zeros((96, 4), np.float32)
  with pytest.raises(ValueError, match=r'missing blocks.1.attn.qkv.lora_A.*'
                                       r'blocks.2.attn.qkv.lora_B has shape \(96, 4\)'):
    import_torch_state(model, params, state)
  frozen = tiny_model(Mlae(rank=4, adaptive_coeff=False, coeff_init=0.5))
  state = export_torch_state(frozen, init(frozen))
  state['blocks.0.attn.qkv.lora_lamda'] = np.full(4, 3.0, np.float32)
  with pytest.raises(ValueError, match='differs from the frozen coefficient'):
    import_torch_state(frozen, init(frozen), state)
  with pytest.raises(ValueError, match='layout exists for MLAE .* has none'):
    export_torch_state(tiny_model(None), init(tiny_model(None)))
