"""HEAT, a reconstruction (no official code is public, so no PyTorch parity): LoRA
exactly until its phase, the head masks on the update, the Taylor scores of each
strategy and the two rankings against numpy, masks untouched by the optimizer, merging
after a phase, the ViT-B/16 counts, and a run through mlae_jax.training."""

import functools
import os

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from flax import linen as nn

from mlae_jax.adapters.heat import MASK, Heat
from mlae_jax.adapters.low_rank import Lora
from mlae_jax.adapters.method import ModelInfo, SiteCall
from mlae_jax.adapters.sites import Site, adapter_scope, base_biases, base_kernels
from mlae_jax.checkpoints import read_npz
from mlae_jax.checkpoints.layout import flatten, unflatten
from mlae_jax.model import create_model
from mlae_jax.partition import combine, count_params, param_role, split_trainable
from mlae_jax.training.optimizer import keep_state, make_optimizer
from mlae_jax.training.phases import loss_gradients
from mlae_jax.training.steps import StepConfig, create_train_state, epoch_order, train_step
from mlae_jax.training.train import train_and_evaluate
from tiny import (TINY, TINY_IMAGE, assert_merge_matches, images, init, randomize, tiny_model,
                  with_random_biases)
from training_setup import tiny_config

HEADS, HEAD_DIM, LAYERS = TINY['num_heads'], TINY['hidden_size'] // TINY['num_heads'], 3
TARGETS = [('qkv',), ('query', 'value')]


def masks(params) -> dict[str, np.ndarray]:
  return {k: np.asarray(v) for k, v in flatten(params).items() if k.endswith('/' + MASK)}


def without_masks(params) -> dict:
  return unflatten({k: v for k, v in flatten(params).items() if not k.endswith('/' + MASK)})


def data(count: int, seed: int = 0):
  rng = np.random.default_rng(seed)
  return (rng.integers(0, 255, (count, TINY_IMAGE, TINY_IMAGE, 3)).astype(np.uint8),
          rng.integers(0, 5, count).astype(np.int32))


def gradients_from(model, batch: int = 4):
  """A phase's `gradients(params, batches)`, as training's: per-batch gradients of the
  mean loss with respect to every parameter, eval mode, fixed batches."""
  grad_fn = loss_gradients(model, (0.5,) * 3, (0.5,) * 3)

  def gradients(params, batches):
    x, y = data(batch * batches)
    return [grad_fn(params, x[i * batch:(i + 1) * batch], y[i * batch:(i + 1) * batch])
            for i in range(batches)]

  return gradients


# --- (1) Before its phase, HEAT is LoRA; a mask switches off exactly its head's columns. ---

@pytest.mark.parametrize('targets', TARGETS)
def test_before_its_phase_heat_is_lora(targets):
  heat, lora = Heat(targets=targets, rank=4, alpha=8.0), Lora(targets=targets, rank=4, alpha=8.0)
  heat_model, lora_model = tiny_model(heat), tiny_model(lora)
  initial = init(heat_model)
  # The same initial update as LoRA's, plus the masks (ones): state, not adapter.
  lora_initial = flatten(init(lora_model))
  assert set(flatten(without_masks(initial))) == set(lora_initial)
  for key, value in flatten(without_masks(initial)).items():
    np.testing.assert_array_equal(value, lora_initial[key], err_msg=key)
  assert len(masks(initial)) == LAYERS * len(targets)
  assert all(param_role(k) == 'state' and np.array_equal(v, np.ones(HEADS))
             for k, v in masks(initial).items())
  params = randomize(initial)  # Trained-looking A, B and head; the masks stay ones.
  x = images(3)
  for train in (False, True):
    ours = heat_model.apply({'params': params}, x, train=train)
    theirs = lora_model.apply({'params': without_masks(params)}, x, train=train)
    assert np.abs(np.asarray(theirs)).max() > 1e-2
    np.testing.assert_array_equal(ours, theirs)


class OneSite(nn.Module):
  """The method at one site of a one-block model, on a given input and output."""
  method: Heat
  site: Site

  @nn.compact
  def __call__(self, x, y):
    info = ModelInfo(TINY['hidden_size'], TINY['mlp_dim'], HEADS, 1, TINY['patch_size'],
                     jnp.float32, jnp.float32)
    return self.method.adapt(self.site, SiteCall(x, y), None, info, train=False,
                             name='adapter')


@pytest.mark.parametrize('site_name', ['qkv', 'query', 'value'])
def test_a_head_mask_zeroes_exactly_that_heads_columns_of_the_update(site_name):
  method = Heat(targets=(site_name,), rank=4, alpha=6.0)
  site, parts = Site(site_name, 0), 3 if site_name == 'qkv' else 1
  d, d_out = TINY['hidden_size'], TINY['hidden_size'] * parts
  rng = np.random.default_rng(0)
  x = rng.standard_normal((2, 5, d)).astype(np.float32)
  module = OneSite(method, site)
  a = rng.standard_normal((4, d)).astype(np.float32)
  b = rng.standard_normal((4, d_out)).astype(np.float32)
  mask = np.array([1.0, 1.0, 0.0, 1.0], np.float32)  # Head 2 switched off.
  params = {'adapter': {'A': a, 'B': b, MASK: mask}}
  assert jax.tree.map(np.shape, module.init(jax.random.key(0), x, np.zeros((2, 5, d_out))))[
      'params'] == jax.tree.map(np.shape, params)
  out = np.asarray(module.apply({'params': params}, x, np.zeros((2, 5, d_out))))

  full = np.einsum('bti,ri,ro->bto', x, a * 6.0 / 4, b)  # alpha / rank = 1.5.
  head2 = np.zeros(d_out, bool)
  for part in range(parts):  # q|k|v side by side, each (heads, head_dim).
    head2[part * d + 2 * HEAD_DIM:part * d + 3 * HEAD_DIM] = True
  assert np.all(out[..., head2] == 0)
  np.testing.assert_allclose(out[..., ~head2], full[..., ~head2], rtol=1e-5, atol=1e-5)
  assert np.abs(full[..., head2]).min() > 0  # What the mask removed was not zero.
  # Merging folds the same masked update into the kernel.
  kernel, bias = method.merge(site, params['adapter'], None, np.zeros((d, d_out), np.float32),
                              np.zeros(d_out, np.float32))
  expected = (a * 1.5).T @ b
  expected[:, head2] = 0
  np.testing.assert_allclose(kernel, expected, rtol=1e-5, atol=1e-5)
  assert np.all(np.asarray(bias) == 0)


# --- (2) The scores, the rankings and the phase. ---

def hand_made(method: Heat, batches: int = 2):
  """Tiny-model params (visible biases) and `batches` random gradient trees."""
  params = with_random_biases(init(tiny_model(method)))
  rng = np.random.default_rng(5)
  grads = [jax.tree.map(lambda v: rng.standard_normal(np.shape(v)).astype(np.float32), params)
           for _ in range(batches)]
  return params, grads


def numpy_scores(params, grads, layers) -> tuple[np.ndarray, np.ndarray]:
  """(|qkv sums|, |out sums|) per (block, head), averaged over the gradient batches."""
  flat = flatten(params)
  qkv, out = [], []
  for grad in grads:
    g = flatten(grad)
    qkv_rows, out_rows = [], []
    for layer in layers:
      row = np.zeros(HEADS)
      for name in ('query', 'key', 'value'):
        (kernel,), (bias,) = base_kernels(Site(name, layer)), base_biases(Site(name, layer))
        k, gk = np.asarray(flat[kernel]), np.asarray(g[kernel])  # (hidden, heads, head_dim)
        b, gb = np.asarray(flat[bias]), np.asarray(g[bias])  # (heads, head_dim)
        for h in range(HEADS):
          row[h] += (k[:, h, :] * gk[:, h, :]).sum() + (b[h] * gb[h]).sum()
      (kernel,) = base_kernels(Site('out', layer))
      w, gw = np.asarray(flat[kernel]), np.asarray(g[kernel])  # (heads, head_dim, hidden)
      qkv_rows.append(np.abs(row))
      out_rows.append(np.abs([(w[h] * gw[h]).sum() for h in range(HEADS)]))
    qkv.append(qkv_rows)
    out.append(out_rows)
  return np.mean(qkv, axis=0), np.mean(out, axis=0)


def test_each_strategys_head_scores_match_numpy():
  layers = (0, 2)  # Only the adapted blocks are scored.
  params, grads = hand_made(Heat(layers=layers))
  qkv, out = numpy_scores(params, grads, layers)
  for strategy, expected in (('qkv', qkv), ('out', out), ('both', qkv + out)):
    scores = Heat(layers=layers, strategy=strategy).head_scores(params, grads, LAYERS)
    assert scores.shape == (2, HEADS)
    np.testing.assert_allclose(scores, expected, rtol=1e-4, err_msg=strategy)
  normalized = Heat(layers=layers, normalize=True).head_scores(params, grads, LAYERS)
  np.testing.assert_allclose(normalized, out / np.linalg.norm(out, axis=1, keepdims=True),
                             rtol=1e-4)
  assert not np.allclose(qkv, out)  # The strategies do differ.


def test_global_and_layer_rankings_switch_off_the_right_heads():
  scores = np.array([[5.0, 1.0, 7.0, 8.0],
                     [0.5, 9.0, 9.0, 0.2],
                     [6.0, 6.0, 3.0, 4.0]])
  off = lambda **fields: {tuple(i) for i in np.argwhere(Heat(**fields).switched_off(scores))}
  # A quarter of 12 heads: the three lowest over the model (block 1 loses two).
  assert off() == {(1, 3), (1, 0), (0, 1)}
  # A quarter of each block's 4 heads: its lowest one.
  assert off(ranking='layer') == {(0, 1), (1, 3), (2, 2)}
  assert off(ranking='layer', heads_off=0.5) == {(0, 0), (0, 1), (1, 0), (1, 3), (2, 2), (2, 3)}
  assert len(off(heads_off=0.125)) == 2  # 1.5 heads: halves round up.
  assert off(heads_off=0.0) == off(ranking='layer', heads_off=0.1) == set()
  ties = np.zeros((2, 4))  # Ties: the earlier block and head first.
  assert {tuple(i) for i in np.argwhere(Heat(heads_off=0.25).switched_off(ties))} == {(0, 0),
                                                                                    (0, 1)}


@pytest.mark.parametrize('targets', TARGETS)
def test_the_phase_writes_every_adapted_sites_mask(targets):
  method = Heat(targets=targets, layers=(0, 2), strategy='qkv', score_batches=2)
  params, grads = hand_made(method)
  calls = []

  def gradients(p, batches):
    calls.append(batches)
    return grads

  assert method.phase_epochs(10) == (1,)
  updated = method.run_phase(1, 10, params, gradients)
  assert calls == [2] and isinstance(updated, dict)
  keep = ~method.switched_off(method.head_scores(params, grads, LAYERS))
  assert keep.sum() == 8 - 2  # A quarter of 2 x 4 heads.
  got = masks(updated)
  assert set(got) == {f'{adapter_scope(Site(t, layer))}/{MASK}' for t in targets
                      for layer in (0, 2)}
  for layer, row in zip((0, 2), keep):
    for target in targets:
      np.testing.assert_array_equal(got[f'{adapter_scope(Site(target, layer))}/{MASK}'],
                                    row.astype(np.float32))
  before = flatten(params)
  assert all(np.array_equal(before[k], v) for k, v in flatten(updated).items()
             if not k.endswith(MASK))


def test_when_the_phase_runs_and_bad_fields_are_named():
  assert Heat().phase_epochs(100) == (10,)  # After the shared recipe's 10-epoch warm-up.
  assert Heat().phase_epochs(5) == (1,)
  assert Heat().phase_epochs(1) == ()  # Never after the last epoch: then it is LoRA.
  assert Heat(score_epoch=3).phase_epochs(4) == (3,)
  assert Heat(score_epoch=3).phase_epochs(3) == ()
  bad = {'strategy': ('value', 'strategy'), 'ranking': ('model', 'ranking'),
         'score_epoch': (0, 'score_epoch must be an integer >= 1'),
         'score_batches': (0, 'score_batches must be an integer >= 1'),
         'heads_off': (1.0, r'heads_off must lie in \[0, 1\)'),
         'normalize': (1, 'normalize must be True or False'),
         'targets': (('out',), "targets \\['out'\\] are not sites"),
         'alpha': (-1.0, 'alpha must be')}
  for field, (value, message) in bad.items():
    with pytest.raises(ValueError, match='Bad heat config: .*' + message):
      Heat(**{field: value})


# --- (3) The optimizer never changes the masks. ---

def test_training_changes_lora_but_never_the_masks():
  method = Heat(rank=4)
  model = tiny_model(method)
  params = randomize(init(model))
  keep = np.ones((LAYERS, HEADS), bool)
  keep[0, 1] = keep[2, 3] = keep[2, 0] = False
  params = method.with_masks(params, keep, LAYERS)
  trainable, frozen = split_trainable(params, method.trained_patterns(LAYERS))
  assert set(masks(trainable)) == set(masks(params))  # Masks travel with the trainable tree.
  x, y = data(8)

  def run(tx):
    cfg = StepConfig(model, tx, 8, (0.5,) * 3, (0.5,) * 3)
    state = create_train_state(trainable, tx)
    step = jax.jit(functools.partial(train_step, cfg=cfg))
    for index in range(2):
      state, _ = step(state, frozen, x, y, epoch_order(jax.random.key(index), 8, 8),
                      np.int32(0), jax.random.key(9))
    return flatten(combine(state.trainable, frozen))

  # Weight decay on every leaf (decay_mask None: without keep_state the masks would
  # decay), so keep_state alone protects them.
  optimizer = make_optimizer(optax.constant_schedule(1e-2), weight_decay=0.5,
                             grad_clip_norm=1.0)
  after, before = run(keep_state(optimizer, trainable)), flatten(params)
  for key, value in masks(params).items():
    np.testing.assert_array_equal(after[key], value, err_msg=key)
  adapters = [k for k in before if param_role(k) == 'adapter']
  assert adapters and all(not np.array_equal(after[k], before[k]) for k in adapters)

  # The switched-off heads' columns of B get no gradient; the masks none either.
  def loss(p):
    logits = model.apply({'params': p}, x.astype(np.float32) / 127.5 - 1)
    return optax.softmax_cross_entropy_with_integer_labels(logits, y).mean()

  grads = flatten(jax.jit(jax.grad(loss))(params))
  b = np.asarray(grads[f'{adapter_scope(Site("qkv", 0))}/B']).reshape(4, 3, HEADS, HEAD_DIM)
  assert np.all(b[:, :, 1] == 0) and np.all(np.abs(b[:, :, 0]).max() > 0)
  assert all(np.all(np.asarray(grads[k]) == 0) for k in masks(params))


# --- (4) Merging after a phase. ---

@pytest.mark.parametrize('targets', TARGETS)
def test_merged_equals_adapted_after_the_phase_switched_heads_off(targets):
  method = Heat(targets=targets, rank=4, heads_off=0.5, score_batches=2)
  model = tiny_model(method)
  params = with_random_biases(randomize(init(model)))
  updated = method.run_phase(1, 10, params, gradients_from(model))
  got = masks(updated)
  assert sum(int((v == 0).sum()) for v in got.values()) == 6 * len(targets)
  x, apply = images(3), model.apply
  assert np.abs(np.asarray(apply({'params': updated}, x))
                - np.asarray(apply({'params': params}, x))).max() > 1e-3
  assert_merge_matches(model, updated)


# --- (5) Trainable parameters at ViT-B/16: LoRA's; the masks are state. ---

@pytest.mark.parametrize('targets, state', [(('qkv',), 144), (('query', 'value'), 288)])
def test_trainable_parameters_at_vit_b16(targets, state):
  method = Heat(targets=targets)
  model = create_model('ViT-B_16', 10, adapter=method)
  shapes = jax.eval_shape(model.init, jax.random.key(0), jnp.zeros((1, 224, 224, 3)))['params']
  counts = count_params(shapes, method.trained_patterns(12))
  # LoRA at rank 8: 12 x 8 x (768 + 2304) = 12 x 8 x (2 x (768 + 768)) (the LoRA figure
  # of tests/test_methods.py; HEAT's paper gives no count of its own). The masks are one
  # (12,) leaf per adapter: 12 blocks x 12 heads per adapted site, not trainable.
  assert counts['adapter'] + counts['tuned'] == 12 * 8 * (768 + 2304) == 294_912
  assert counts['state'] == state
  assert counts['trainable'] == 294_912 + 768 * 10 + 10


# --- (6) A run through mlae_jax.training. ---

def test_a_run_switches_heads_off_after_its_score_epoch(tmp_path):
  config = tiny_config(**{'adapter.method': 'heat', 'adapter.heat.rank': 4,
                          'adapter.heat.score_epoch': 1, 'adapter.heat.score_batches': 2,
                          'epochs': 3})
  results = train_and_evaluate(config, str(tmp_path))
  exported = read_npz(os.path.join(tmp_path, 'export', 'adapter.npz'))
  got = {k: v for k, v in exported.items() if k.endswith('/' + MASK)}
  assert len(got) == 2  # Two blocks, 'qkv'.
  # A quarter of the 2 x 4 heads switched off, ranked over the model.
  assert sum(int((v == 0).sum()) for v in got.values()) == 2
  assert all(set(np.unique(v)) <= {0.0, 1.0} for v in got.values())
  assert results['adapter_params'] == 2 * 4 * (32 + 96)  # The masks are not counted.
  assert os.path.isfile(os.path.join(tmp_path, 'export', 'merged.npz'))
