"""Methods' state and phases: state leaves are never trained, and a run killed during or
after a phase (HEAT's scoring, Pear's pruning, DMLoRA's schedule) resumes to the result of
the uninterrupted run."""

import os
import shutil

import jax.numpy as jnp
import numpy as np
import optax
import pytest

from mlae_jax.checkpoints import read_npz
from mlae_jax.partition import count_params, param_role, split_trainable
from mlae_jax.training.metrics import read_metrics
from mlae_jax.training.optimizer import keep_state, make_optimizer
from mlae_jax.training.train import train_and_evaluate
from training_setup import tiny_config

TREE = {'Transformer': {'encoderblock_0': {'adapter_qkv': {
    'A': jnp.ones((2, 3)), 'state_head_mask': jnp.ones((3,))}}},
        'head': {'kernel': jnp.ones((3, 2)), 'bias': jnp.ones((2,))}}


def test_state_leaves_travel_with_the_trainable_subtree_but_are_not_trained():
  assert param_role('Transformer/encoderblock_0/adapter_qkv/state_head_mask') == 'state'
  assert param_role('Transformer/encoderblock_0/adapter_qkv/A') == 'adapter'
  trainable, frozen = split_trainable(TREE)
  assert 'state_head_mask' in trainable['Transformer']['encoderblock_0']['adapter_qkv']
  counts = count_params(TREE)
  assert (counts['state'], counts['trainable'], counts['total']) == (3, 6 + 8, 17)
  tx = keep_state(make_optimizer(optax.constant_schedule(0.1), weight_decay=0.5,
                                 grad_clip_norm=1.0), trainable)
  grads = {'Transformer': {'encoderblock_0': {'adapter_qkv': {
      'A': jnp.ones((2, 3)), 'state_head_mask': jnp.ones((3,))}}},
           'head': {'kernel': jnp.ones((3, 2)), 'bias': jnp.ones((2,))}}
  opt_state = tx.init(trainable)
  for _ in range(3):
    updates, opt_state = tx.update(grads, opt_state, trainable)
    trainable = optax.apply_updates(trainable, updates)
  block = trainable['Transformer']['encoderblock_0']['adapter_qkv']
  np.testing.assert_array_equal(block['state_head_mask'], np.ones(3))
  assert not np.allclose(block['A'], 1.0)
  # Without state leaves the optimizer is the plain one (checkpoints of earlier runs fit).
  plain = make_optimizer(optax.constant_schedule(0.1), weight_decay=0.5, grad_clip_norm=1.0)
  assert keep_state(plain, {'head': TREE['head']}) is plain


PHASED = [('heat', {'score_epoch': 2, 'score_batches': 2}),
          ('pear', {'prune_epoch': 2, 'score_batches': 2}),
          ('dmlora', {})]


@pytest.mark.parametrize('name, fields', PHASED, ids=[p[0] for p in PHASED])
def test_a_run_killed_during_or_after_a_phase_resumes_to_the_same_result(tmp_path, name,
                                                                         fields):
  overrides = {'adapter.method': name, 'keep_checkpoints': 10, 'epochs': 4,
               'model.drop_path_rate': 0.1}
  overrides.update({f'adapter.{name}.{field}': value for field, value in fields.items()})
  config = tiny_config(**overrides)
  straight = tmp_path / 'straight'
  train_and_evaluate(config, str(straight))
  reference = read_npz(straight / 'export' / 'adapter.npz')
  losses = [r['loss'] for r in read_metrics(str(straight))]
  # Killed after the phase (its checkpoint written) or during it (only the one before).
  for kept in (2, 1):
    workdir = tmp_path / f'kept_{kept}'
    shutil.copytree(straight, workdir)
    os.remove(workdir / 'results.json')
    shutil.rmtree(workdir / 'export')
    for step in os.listdir(workdir / 'checkpoints'):
      if step.isdigit() and int(step) > kept:
        shutil.rmtree(workdir / 'checkpoints' / step)
    train_and_evaluate(config, str(workdir))
    resumed = read_npz(workdir / 'export' / 'adapter.npz')
    assert set(resumed) == set(reference)
    for key in reference:
      np.testing.assert_array_equal(resumed[key], reference[key], err_msg=key)
    assert [r['loss'] for r in read_metrics(str(workdir))] == losses
  # The phase happened: some state differs from its initial value.
  state = {k: v for k, v in reference.items() if k.rsplit('/', 1)[-1].startswith('state_')}
  assert state, 'the export holds the method state'


def test_summary_reports_state_apart_from_the_trained_parameters():
  from mlae_jax.adapters import create
  from mlae_jax.model import create_model
  from mlae_jax.summary import describe
  text = describe(create_model('ViT-B_16', 10, adapter=create('heat')), 224)
  assert 'adapter 294,912, head 7,690, trainable 302,602, state 144, backbone' in text
