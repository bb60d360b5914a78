"""The MLAE expert layer, its masks and its configuration."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from mlae_jax.adapters import LayerExperts, Lora, LowRankExperts, Mlae, create
from mlae_jax.adapters import patterns
from mlae_jax.checkpoints.layout import flatten
from mlae_jax.model import create_model
from mlae_jax.partition import count_params
from tiny import images, init, randomize, tiny_model


def layer(experts=8, drop_rate=0.0, coeff=1.5, adaptive=True, per_example=False, features=12):
  settings = LayerExperts(experts, drop_rate, coeff, adaptive, per_example, 0.0)
  module = LowRankExperts(settings, features)
  x = jnp.asarray(np.random.default_rng(0).standard_normal((3, 5, 10)), jnp.float32)
  params = module.init(jax.random.key(0), x, train=False)['params']
  params['B'] = jnp.asarray(np.random.default_rng(1).standard_normal(params['B'].shape),
                            jnp.float32)
  return module, params, x


def run(module, params, x, key=None):
  rngs = {'expert_mask': key} if key is not None else {}
  out, state = module.apply({'params': params}, x, train=key is not None, rngs=rngs,
                            mutable=['intermediates'])
  mask = state.get('intermediates', {}).get('expert_mask')
  return np.asarray(out), None if mask is None else np.asarray(mask[0])


def reference(params, x, coeff):
  return np.einsum('bti,ri,r,ro->bto', x, params['A'], coeff, params['B'])


def test_initialisation_follows_the_reference_layer():
  module, params, x = layer(experts=8, coeff=1.5)
  params = module.init(jax.random.key(3), x, train=False)['params']
  bound = 1 / np.sqrt(x.shape[-1])
  assert params['A'].shape == (8, 10) and params['B'].shape == (8, 12)
  assert np.abs(params['A']).max() <= bound and np.abs(params['A']).max() > 0.5 * bound
  assert not np.any(params['B'])
  np.testing.assert_array_equal(params['coeff'], np.full(8, 1.5, np.float32))


def test_eval_uses_every_expert_unscaled_and_needs_no_rng():
  module, params, x = layer(drop_rate=0.5)
  out, mask = run(module, params, x)
  assert mask is None
  np.testing.assert_allclose(out, reference(params, x, params['coeff']), rtol=1e-5, atol=1e-5)
  np.testing.assert_array_equal(out, run(module, params, x)[0])


def test_training_scales_kept_experts_by_inverse_keep_rate():
  module, params, x = layer(drop_rate=0.3)
  out, mask = run(module, params, x, jax.random.key(5))
  assert mask.shape == (8,) and mask.dtype == bool
  expected = reference(params, x, np.where(mask, params['coeff'] / 0.7, 0.0))
  np.testing.assert_allclose(out, expected, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize('p', [0.1, 0.5, 0.7])
def test_keep_rate_over_many_steps(p):
  module, params, x = layer(experts=8, drop_rate=p)
  keys = jax.random.split(jax.random.key(11), 2000)
  masks = jax.vmap(lambda k: run_mask(module, params, x, k))(keys)
  assert abs(float(masks.mean()) - (1 - p)) < 0.02
  # Each expert is dropped at the same rate: no expert is favoured.
  assert np.abs(np.asarray(masks.mean(0)) - (1 - p)).max() < 0.05


def run_mask(module, params, x, key):
  _, state = module.apply({'params': params}, x, train=True, rngs={'expert_mask': key},
                          mutable=['intermediates'])
  return state['intermediates']['expert_mask'][0]


def test_p_zero_equals_no_mask():
  module, params, x = layer(drop_rate=0.0)
  train_out, mask = run(module, params, x, jax.random.key(1))
  assert mask is None
  np.testing.assert_array_equal(train_out, run(module, params, x)[0])


def test_masks_depend_on_the_key_and_only_on_it():
  module, params, x = layer(drop_rate=0.5)
  masks = [run(module, params, x, jax.random.key(k))[1] for k in range(20)]
  assert len({m.tobytes() for m in masks}) > 5
  np.testing.assert_array_equal(masks[3], run(module, params, x, jax.random.key(3))[1])


def test_per_example_masks():
  module, params, x = layer(drop_rate=0.5, per_example=True)
  out, mask = run(module, params, x, jax.random.key(2))
  assert mask.shape == (3, 1, 8)
  assert len({m.tobytes() for m in mask}) > 1
  coeff = np.where(mask, params['coeff'] / 0.5, 0.0)  # (batch, 1, r)
  expected = np.einsum('bti,ri,btr,ro->bto', x, params['A'], np.broadcast_to(coeff, (3, 5, 8)),
                       params['B'])
  np.testing.assert_allclose(out, expected, rtol=1e-5, atol=1e-5)


def test_dropped_experts_get_no_gradient():
  module, params, x = layer(drop_rate=0.5)
  key = jax.random.key(4)
  mask = run(module, params, x, key)[1]
  assert 0 < mask.sum() < 8

  def loss(p):
    return module.apply({'params': p}, x, train=True, rngs={'expert_mask': key}).sum()

  grads = jax.grad(loss)(params)
  for name in ('A', 'B', 'coeff'):
    assert not np.any(np.asarray(grads[name])[~mask])
    assert np.all(np.any(np.asarray(grads[name]).reshape(8, -1)[mask] != 0, axis=-1))


def test_each_layer_draws_its_own_mask():
  model = tiny_model(Mlae(rank=8, drop_rate=0.5), num_layers=3)
  params = init(model)
  _, state = model.apply({'params': params}, images(), train=True,
                         rngs={'expert_mask': jax.random.key(0)}, mutable=['intermediates'])
  masks = [np.asarray(v[0]) for k, v in flatten(state['intermediates']).items()
           if k.endswith('expert_mask')]
  assert len(masks) == 3
  assert len({m.tobytes() for m in masks}) > 1


def test_frozen_coefficient_ablation():
  module, params, x = layer(adaptive=False, coeff=0.25)
  assert 'coeff' not in params
  out, _ = run(module, params, x)
  np.testing.assert_allclose(out, reference(params, x, np.full(8, 0.25)), rtol=1e-5, atol=1e-5)


def test_fixed_masks_allocate_the_pattern_and_never_change():
  config = Mlae(mask='fixed', pattern='incremental')
  model = create_model('ViT-B_16', 10, adapter=config)
  assert [s.experts for s in model.adapter.layer_experts(model.num_layers)] == list(patterns.FIXED_PATTERNS['incremental'])
  assert all(s.drop_rate == 0 for s in model.adapter.layer_experts(model.num_layers))
  small = tiny_model(Mlae(mask='fixed', pattern='hourglass'), num_layers=12)
  params = randomize(init(small))
  shapes = [flatten(params)[f'Transformer/encoderblock_{i}/MultiHeadDotProductAttention_0/'
                            'adapter_qkv/A'].shape[0] for i in range(12)]
  assert shapes == list(patterns.FIXED_PATTERNS['hourglass'])
  # Training draws no mask: the same experts act in every step, as at eval.
  x = images()
  evaluated = small.apply({'params': params}, x)
  for seed in range(3):
    trained, state = small.apply({'params': params}, x, train=True,
                                 rngs={'expert_mask': jax.random.key(seed)},
                                 mutable=['intermediates'])
    np.testing.assert_array_equal(np.asarray(trained), np.asarray(evaluated))
    assert not any(k.endswith('expert_mask') for k in flatten(state.get('intermediates', {})))


def test_mixed_masks_combine_counts_and_dropout():
  config = Mlae(mask='mixed', pattern='decremental', drop_rate=0.5)
  settings = config.layer_experts(12)
  assert [s.experts for s in settings] == list(patterns.FIXED_PATTERNS['decremental'])
  assert {s.drop_rate for s in settings} == {0.5}


@pytest.mark.parametrize('name', ['incremental', 'decremental', 'hourglass', 'protruding'])
def test_stochastic_patterns(name):
  settings = Mlae(pattern=name, drop_rate=0.0).layer_experts(12)
  assert [s.drop_rate for s in settings] == list(patterns.STOCHASTIC_PATTERNS[name])
  assert {s.experts for s in settings} == {8}
  deep = Mlae(pattern=name).layer_experts(24)
  assert [s.drop_rate for s in deep[::2]] == list(patterns.STOCHASTIC_PATTERNS[name])


def test_uniform_and_per_layer_values():
  settings = Mlae(drop_rate=0.3, coeff_init=4.0).layer_experts(12)
  assert all(s == LayerExperts(8, 0.3, 4.0, True, False, 0.0) for s in settings)
  ranks = tuple(range(1, 13))
  assert [s.experts for s in Mlae(rank=ranks).layer_experts(12)] == list(ranks)
  with pytest.raises(ValueError, match='lists 12 values but the model has 6 layers'):
    Mlae(rank=ranks).layer_experts(6)


def test_random_pattern_keeps_the_budget():
  counts = Mlae(mask='fixed', pattern='random', pattern_seed=3).layer_experts(12)
  counts = [s.experts for s in counts]
  assert sum(counts) == 96 and min(counts) >= 1 and max(counts) <= 14
  again = [s.experts for s in Mlae(mask='fixed', pattern='random', pattern_seed=3)
           .layer_experts(12)]
  other = [s.experts for s in Mlae(mask='fixed', pattern='random', pattern_seed=4)
           .layer_experts(12)]
  assert counts == again and counts != other


def param_counts(adapter, classes=100):
  model = create_model('ViT-B_16', classes, adapter=adapter)
  shapes = jax.eval_shape(lambda: model.init(jax.random.key(0), jnp.zeros((1, 224, 224, 3))))
  return count_params(shapes['params'])


def test_trainable_parameter_counts_of_vit_b16():
  counts = param_counts(Mlae(rank=8))
  assert counts['adapter'] == 295_008
  assert counts['head'] == 768 * 100 + 100
  assert counts['backbone'] == 85_798_656
  assert counts['trainable'] == 295_008 + 76_900
  assert param_counts(Lora(rank=8))['adapter'] == 294_912
  assert param_counts(Mlae(adaptive_coeff=False))['adapter'] == 294_912
  # Fixed patterns keep the budget of 8 experts per block.
  assert param_counts(Mlae(mask='fixed', pattern='hourglass'))['adapter'] == 295_008
  assert param_counts(None)['adapter'] == 0


@pytest.mark.parametrize('kwargs, message', [
    (dict(rank=0), 'rank must be an integer >= 1'),
    (dict(rank=-2), 'rank must be an integer >= 1'),
    (dict(rank=2.5), 'rank must be an integer >= 1'),
    (dict(rank=(8, 0)), 'rank must be an integer >= 1'),
    (dict(drop_rate=1.0), r'drop_rate must lie in \[0, 1\)'),
    (dict(drop_rate=-0.1), r'drop_rate must lie in \[0, 1\)'),
    (dict(drop_rate=(0.1, 1.5)), r'drop_rate must lie in \[0, 1\)'),
    (dict(input_dropout=1.0), r'input_dropout must lie in \[0, 1\)'),
    (dict(targets=('qkv', 'proj')), "targets \\['proj'\\] are not sites"),
    (dict(targets=()), 'targets is empty'),
    (dict(targets=('qkv', 'query')), "'qkv' already covers"),
    (dict(mask='sometimes'), "mask 'sometimes' is not one of"),
    (dict(pattern='zigzag'), "pattern 'zigzag' is not one of"),
    (dict(pattern='random'), "use mask='fixed' or 'mixed'"),
    (dict(mask='fixed', drop_rate=0.5), "use mask='mixed'"),
    (dict(mask='fixed', pattern='incremental', rank=4), 'assume rank 8'),
    (dict(expert_rank=3), 'expert_rank 3 must divide rank 8'),
    (dict(expert_rank=2, mask='mixed', drop_rate=0.5), 'expert_rank > 1'),
    (dict(layers=(0, 0)), 'name a block twice'),
    (dict(train=('(',)), 'is not a regular expression'),
])
def test_bad_configs_are_refused_with_a_reason(kwargs, message):
  with pytest.raises(ValueError, match=message):
    Mlae(**kwargs)


@pytest.mark.parametrize('name, fields, message', [
    ('dora', {}, "Unknown method 'dora'"),
    ('lora', {'drop_rate': 0.5}, r"Bad lora config: unknown fields \['drop_rate'\]"),
    ('lora', {'coeff_init': 2.0}, r"unknown fields \['coeff_init'\]"),
    ('mlae', {'alpha': 16}, r"Bad mlae config: unknown fields \['alpha'\]"),
])
def test_fields_of_another_method_are_refused(name, fields, message):
  with pytest.raises(ValueError, match=message):
    create(name, fields)


def test_lists_from_configs_become_tuples():
  config = Mlae(targets=['qkv', 'fc1'], rank=[8] * 12)
  assert config.targets == ('qkv', 'fc1') and isinstance(config.rank, tuple)
  hash(config)


def test_input_dropout_only_in_training():
  settings = LayerExperts(4, 0.0, 1.0, True, False, 0.5)
  module = LowRankExperts(settings, 6)
  x = jnp.ones((2, 3, 5))
  params = module.init(jax.random.key(0), x, train=False)['params']
  params['B'] = jnp.ones_like(params['B'])
  evaluated = module.apply({'params': params}, x, train=False)
  trained = module.apply({'params': params}, x, train=True, rngs={'dropout': jax.random.key(1)})
  np.testing.assert_allclose(evaluated, reference(params, np.asarray(x), params['coeff']),
                             rtol=1e-5)
  assert not np.allclose(trained, evaluated)


def test_summary_table_reports_the_budget():
  from mlae_jax.summary import describe
  text = describe(create_model('ViT-B_16', 10, adapter=Mlae(mask='fixed',
                                                                     pattern='protruding')), 224)
  rows = [line.split() for line in text.splitlines()[2:14]]
  assert [int(row[1]) for row in rows] == list(patterns.FIXED_PATTERNS['protruding'])
  assert 'adapter 295,008, head 7,690, trainable 302,698' in text
