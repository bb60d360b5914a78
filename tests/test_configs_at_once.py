"""K configurations trained at once (one vmapped step) against K separate runs."""

import json
import os
import shutil

import numpy as np
import pytest

from training_setup import TINY_MODEL, tiny_config

from mlae_jax.data.build import build_task_data
from mlae_jax.sweeps import grid_search, layout
from mlae_jax.checkpoints.npz import read_npz
from mlae_jax.training.train import train_and_evaluate, train_configs_on_task

POINTS = [(0.5, 1.0), (0.0, 0.25), (0.7, 4.0)]  # (drop_rate, coeff_init)


def _adam_atol(learning_rate: float) -> float:
  """Tolerance for weights that two differently compiled programs trained alike.

  Adam normalises each update, so a weight whose gradient is near zero moves by a
  size-independent amount that rounding differences between the programs can change
  (seen: 2.6e-6 at lr 3e-3 on an AVX-512 CPU). 1% of one step's learning rate still
  fails on any real mix-up: other configurations' weights differ by whole steps.
  """
  return 0.01 * learning_rate


def _configs(**overrides):
  return [tiny_config(**{'adapter.mlae.drop_rate': p, 'adapter.mlae.coeff_init': c, 'epochs': 3,
                         'eval_every_epochs': 1, **overrides}) for p, c in POINTS]


def _losses(workdir):
  with open(os.path.join(workdir, 'metrics.jsonl')) as f:
    return [(r['kind'], r['epoch'], r['loss'], r.get('accuracy')) for r in map(json.loads, f)]


def test_configs_at_once_train_as_their_separate_runs(tmp_path):
  configs = _configs()
  together = [str(tmp_path / f'together_{k}') for k in range(len(configs))]
  results = train_configs_on_task(configs, together, build_task_data(configs[0].data))
  for k, config in enumerate(configs):
    alone = str(tmp_path / f'alone_{k}')
    expected = train_and_evaluate(config, alone)
    got, want = _losses(together[k]), _losses(alone)
    assert [r[:2] for r in got] == [r[:2] for r in want]
    np.testing.assert_allclose([r[2] for r in got], [r[2] for r in want], rtol=2e-5)
    np.testing.assert_allclose([r[3] for r in got], [r[3] for r in want], atol=1e-6)
    assert results[k]['final_epoch_accuracy'] == pytest.approx(expected['final_epoch_accuracy'])
    assert results[k]['configs_at_once'] == len(configs)
    # Each workdir's export is that config's own: its settings, its trained weights.
    mine, theirs = (os.path.join(w, 'export') for w in (together[k], alone))
    for name in ('adapter_config.json',):
      with open(os.path.join(mine, name)) as f, open(os.path.join(theirs, name)) as g:
        assert json.load(f) == json.load(g)
    with open(os.path.join(mine, 'adapter_config.json')) as f:
      assert json.load(f)['adapter']['drop_rate'] == POINTS[k][0]
    trained, reference = read_npz(os.path.join(mine, 'adapter.npz')), read_npz(
        os.path.join(theirs, 'adapter.npz'))
    assert trained.keys() == reference.keys()
    for leaf in trained:
      np.testing.assert_allclose(trained[leaf], reference[leaf], rtol=1e-4,
                                 atol=_adam_atol(config.learning_rate))
  # The points really trained differently.
  assert len({r['final_epoch_accuracy'] for r in results} | {
      tuple(l[2] for l in _losses(w)) for w in together}) > 1


def test_configs_at_once_resume_from_their_checkpoints(tmp_path):
  configs = _configs()
  workdirs = [str(tmp_path / f'run_{k}') for k in range(len(configs))]
  data = build_task_data(configs[0].data)
  train_configs_on_task(configs, workdirs, data)
  uninterrupted = [_losses(w) for w in workdirs]
  for w in workdirs:  # As if killed during the last epoch: its checkpoint never written.
    shutil.rmtree(os.path.join(w, 'checkpoints', '3'))
    os.remove(os.path.join(w, 'results.json'))
  train_configs_on_task(configs, workdirs, data)
  for w, before in zip(workdirs, uninterrupted):
    assert sorted(_losses(w)) == sorted(before)


def test_configs_checkpointed_at_different_epochs_are_refused(tmp_path):
  configs = _configs()
  workdirs = [str(tmp_path / f'run_{k}') for k in range(len(configs))]
  data = build_task_data(configs[0].data)
  train_configs_on_task(configs, workdirs, data)
  shutil.rmtree(os.path.join(workdirs[1], 'checkpoints', '3'))
  for w in workdirs:  # Unfinished again (a finished run returns its results untouched).
    os.remove(os.path.join(w, 'results.json'))
  with pytest.raises(ValueError, match='different epochs'):
    train_configs_on_task(configs, workdirs, data)


@pytest.mark.parametrize('override, message', [
    ({'learning_rate': 1e-2}, 'may differ only in'),
    ({'mlae.adaptive_coeff': False}, 'adaptive_coeff'),
])
def test_configs_that_cannot_train_at_once_are_refused(override, message, tmp_path):
  configs = _configs()
  if 'learning_rate' in override:
    configs[1].learning_rate = override['learning_rate']
  else:
    for config in configs:
      config.adapter.mlae.adaptive_coeff = False
  with pytest.raises(ValueError, match=message):
    train_configs_on_task(configs, [str(tmp_path / str(k)) for k in range(3)],
                          build_task_data(configs[0].data))


def _tiny_overrides():
  config = tiny_config(epochs=2)
  overrides = {f'model.{k}': v for k, v in TINY_MODEL.items()}
  overrides.update({'model.name': 'ViT-Ti_16', 'pretrained': '', 'export_merged': False,
                    'adapter.mlae.rank': config.adapter.mlae.rank})
  overrides.update({f'data.{k}': config.data[k] for k in
                    ('source', 'image_size', 'num_classes', 'num_train', 'num_eval')})
  overrides.update({k: config[k] for k in (
      'epochs', 'batch_size', 'eval_batch_size', 'learning_rate', 'warmup_epochs',
      'eval_every_epochs', 'checkpoint_every_epochs', 'progress_bar')})
  return overrides


def test_grid_search_trains_points_at_once_as_one_at_a_time(tmp_path):
  points = grid_search.grid((0.0, 0.5), (0.5, 2.0))
  records = {}
  for at_once in (1, 3):
    records[at_once] = grid_search.run_grid_search(
        'vtab', 'svhn', str(tmp_path / str(at_once)), overrides=_tiny_overrides(),
        points=points, stages=['search'], configs_at_once=at_once)
  assert records[3]['complete'] and len(records[3]['grid']) == 4
  assert ([p['val_final_epoch_correct'] for p in records[3]['grid']]
          == [p['val_final_epoch_correct'] for p in records[1]['grid']])
  at_once = []
  for point in points:
    workdir = layout.grid_workdir(str(tmp_path / '3'), 'vtab', 'svhn', point.drop_rate,
                                  point.coeff_init, 0)
    with open(os.path.join(workdir, 'results.json')) as f:
      at_once.append(json.load(f)['configs_at_once'])
  assert sorted(at_once) == [1, 3, 3, 3]  # Four points of one seed: a group of 3, then 1.


def test_side_by_side_and_one_by_one_passes_agree():
  # The K-configuration step vmaps `per_pass` configurations at a time: all of them
  # (accelerators) or one (CPU) must train alike.
  import jax
  import jax.numpy as jnp
  import optax

  from mlae_jax.adapters import Mlae
  from mlae_jax.adapters.experts import drop_rate_variables
  from mlae_jax.partition import split_trainable
  from mlae_jax.training import parallel
  from mlae_jax.training.optimizer import make_optimizer
  from mlae_jax.training.steps import StepConfig, TrainState, jit_train_step
  from tiny import init, tiny_model

  model = tiny_model(Mlae(rank=4, drop_rate=0.5))
  trainable, frozen = split_trainable(init(model))
  learning_rate = 1e-2
  tx = make_optimizer(optax.constant_schedule(learning_rate), weight_decay=1e-4,
                      grad_clip_norm=None)
  cfg = StepConfig(model, tx, 8, (0.5,) * 3, (0.5,) * 3)
  rates = jax.tree.map(lambda *r: jnp.stack(r), *[drop_rate_variables(
      Mlae(rank=4, drop_rate=p).layer_experts(model.num_layers), trainable)
      for p in (0.0, 0.3, 0.6)])
  rng = np.random.default_rng(0)
  images = rng.integers(0, 255, (16, 32, 32, 3)).astype(np.uint8)
  labels = rng.integers(0, 5, 16).astype(np.int32)
  replicated = parallel.replicated(parallel.make_mesh())
  results = {}
  for per_pass in (1, 3):
    state = TrainState(jnp.zeros((3,), jnp.int32),
                       *jax.tree.map(lambda x: jnp.stack([x] * 3),
                                     (trainable, tx.init(trainable))))
    step = jit_train_step(cfg, replicated, configs=3, per_pass=per_pass)
    losses = []
    for index in range(2):
      state, metrics = step(state, frozen, images, labels, jnp.arange(16), np.int32(index),
                            jax.random.key(0), rates)
      losses.append(np.asarray(metrics['loss_sum']))
    results[per_pass] = (np.stack(losses), jax.device_get(state.trainable))
  np.testing.assert_allclose(results[1][0], results[3][0], rtol=1e-5)
  block = results[1][1]['Transformer']['encoderblock_0']['MultiHeadDotProductAttention_0']
  b = np.asarray(block['adapter_qkv']['B'])
  # Three drop rates, three different masks and updates: far apart at the tolerance below.
  atol = _adam_atol(learning_rate)
  assert np.max(np.abs(b[0] - b[2])) > 10 * atol
  jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, rtol=1e-4, atol=atol),
               results[1][1], results[3][1])
