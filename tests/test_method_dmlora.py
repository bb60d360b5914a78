"""DMLoRA, a reconstruction from the abstract (no official code is public): against a
PyTorch transcription of the reconstructed formula inside timm's ViT (branches held
apart, keep vectors injected), against LoRA in its one-branch limit, its schedule and
phases, its state under the optimizer, merging, its count at ViT-B/16 and a full run."""

import functools
import os

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
import torch

from mlae_jax.adapters import Lora
from mlae_jax.adapters.dmlora import DROP_RATE, STAGE, DmLora
from mlae_jax.adapters.registry import get_method
from mlae_jax.adapters.sites import SHARED_SCOPE
from mlae_jax.checkpoints import load_pretrained, read_npz
from mlae_jax.checkpoints.layout import flatten, unflatten
from mlae_jax.model import create_model
from mlae_jax.partition import count_params, param_role, split_trainable
from mlae_jax.training.optimizer import keep_state, make_optimizer, weight_decay_mask
from mlae_jax.training.steps import StepConfig, create_train_state, epoch_order, train_step
from mlae_jax.training.train import train_and_evaluate
from tiny import (TINY_IMAGE, assert_merge_matches, images, init, randomize, relative_error,
                  tiny_model)
from torch_reference import nchw, tensor, timm_vit, tiny_checkpoint
from training_setup import tiny_config

TOLERANCE = 1e-4
RANK, BRANCHES = 2, 3
QKV = 'Transformer/encoderblock_{}/MultiHeadDotProductAttention_0/adapter_qkv'


def with_state(params: dict, drop_rate: float, stage: float) -> dict:
  flat = flatten(params)
  flat[f'{SHARED_SCOPE}/{DROP_RATE}'] = jnp.float32(drop_rate)
  flat[f'{SHARED_SCOPE}/{STAGE}'] = jnp.float32(stage)
  return unflatten(flat)


# --- The transcription: y + s * (1/B) * sum_i m_i (x A_i^T) B_i, m_i = keep_i / (1 - p)
# in training and 1 at eval, s held (detached) in stage 1; one branch per tensor. ---

class TorchDmLoraLinear(torch.nn.Module):

  def __init__(self, base, branches, rank, drop_rate, stage):
    super().__init__()
    self.base = base
    self.A = torch.nn.ParameterList(
        [torch.nn.Parameter(torch.zeros(rank, base.in_features)) for _ in range(branches)])
    self.B = torch.nn.ParameterList(
        [torch.nn.Parameter(torch.zeros(rank, base.out_features)) for _ in range(branches)])
    self.scale = torch.nn.Parameter(torch.ones(1))
    self.drop_rate, self.stage = drop_rate, stage
    self.keep = None  # Set from outside: bool (branches,).

  def forward(self, x):
    scale = self.scale if self.stage else self.scale.detach()
    update = 0
    for i, (a, b) in enumerate(zip(self.A, self.B)):
      m = float(self.keep[i]) / (1 - self.drop_rate) if self.training else 1.0
      update = update + m * (x @ a.T) @ b
    return self.base(x) + scale * update / len(self.A)


@pytest.mark.parametrize('drop_rate, stage, train', [
    (0.0, 0.0, True), (0.4, 0.0, True), (0.4, 1.0, True), (0.4, 1.0, False)])
def test_logits_and_gradients_match_the_transcription(tmp_path, drop_rate, stage, train):
  path = tiny_checkpoint(tmp_path / 'tiny.npz')
  model = tiny_model(DmLora(rank=RANK, branches=BRANCHES))
  params = randomize(load_pretrained(path, model, rng=jax.random.key(0), image_size=32))
  params = with_state(params, drop_rate, stage)
  x, labels = images(4), np.array([0, 3, 1, 4])

  def loss_fn(p):
    logits, state = model.apply({'params': p}, x, train=train,
                                rngs={'expert_mask': jax.random.key(3)}, mutable=['intermediates'])
    loss = optax.softmax_cross_entropy_with_integer_labels(logits, labels).mean()
    return loss, (logits, state.get('intermediates', {}))

  grads, (logits, intermediates) = jax.grad(loss_fn, has_aux=True)(params)
  flat_params, flat_grads, flat_inter = flatten(params), flatten(grads), flatten(intermediates)
  assert not np.any(np.asarray(flat_grads[f'{SHARED_SCOPE}/{DROP_RATE}']))
  assert not np.any(np.asarray(flat_grads[f'{SHARED_SCOPE}/{STAGE}']))

  reference = timm_vit(path)
  reference.head.requires_grad_(True)
  keeps = []
  with torch.no_grad():
    reference.head.weight.copy_(tensor(flat_params['head/kernel']).T)
    reference.head.bias.copy_(tensor(flat_params['head/bias']))
    for i, block in enumerate(reference.blocks):
      scope = QKV.format(i)
      layer = TorchDmLoraLinear(block.attn.qkv, BRANCHES, RANK, drop_rate, stage)
      block.attn.qkv = layer
      a, b = np.asarray(flat_params[f'{scope}/A']), np.asarray(flat_params[f'{scope}/B'])
      for j in range(BRANCHES):
        layer.A[j].copy_(tensor(a[j * RANK:(j + 1) * RANK]))
        layer.B[j].copy_(tensor(b[j * RANK:(j + 1) * RANK]))
      layer.scale.copy_(tensor(flat_params[f'{scope}/scale']))
      if train:
        keep = np.asarray(flat_inter[f'{scope}/branch_keep'][0])
        keeps.append(keep)
        layer.keep = keep
        dropped = np.repeat(~keep, RANK)  # A dropped branch gets no gradient this step.
        assert not np.any(np.asarray(flat_grads[f'{scope}/A'])[dropped])
        assert not np.any(np.asarray(flat_grads[f'{scope}/B'])[dropped])
  if train:
    kept, total = np.concatenate(keeps).sum(), len(keeps) * BRANCHES
    if drop_rate == 0:
      assert kept == total, 'p = 0 keeps every branch'
    else:
      assert 0 < kept < total, 'some dropped, some kept'
  else:
    assert not any(k.endswith('branch_keep') for k in flat_inter)  # No mask at eval.
  reference.train(train)
  torch_logits = reference(nchw(x))
  torch.nn.functional.cross_entropy(torch_logits, torch.from_numpy(labels)).backward()

  assert relative_error(logits, torch_logits.detach().numpy()) <= TOLERANCE
  head_grad = reference.head.weight.grad.numpy().T
  assert relative_error(flat_grads['head/kernel'], head_grad) <= TOLERANCE
  for i, block in enumerate(reference.blocks):
    scope, layer = QKV.format(i), block.attn.qkv
    for ours, theirs in (('A', layer.A), ('B', layer.B)):
      assert relative_error(flat_grads[f'{scope}/{ours}'],
                            np.concatenate([t.grad.numpy() for t in theirs])) <= TOLERANCE
    scale_grad = np.asarray(flat_grads[f'{scope}/scale'])
    if stage:
      assert np.abs(scale_grad).max() > 0
      assert relative_error(scale_grad, layer.scale.grad.numpy()) <= TOLERANCE
    else:  # Stage 1: the scalar is held, its gradient exactly 0.
      assert layer.scale.grad is None and not np.any(scale_grad)


def test_one_branch_without_dropout_at_scale_one_is_lora():
  """Lora(alpha=None) has coefficient alpha / r = r / r = 1: its update is (x A^T) B, which is
  DMLoRA's s * (1/1) * (x A^T) B at s = 1."""
  method = DmLora(rank=4, branches=1, drop_start=0.0, drop_end=0.0, scalar_stage=0.0)
  model, lora_model = tiny_model(method), tiny_model(Lora(rank=4))
  params = flatten(randomize(init(model)))
  for i in range(3):
    params[f'{QKV.format(i)}/scale'] = jnp.ones((1,), jnp.float32)
  lora_params = {k: v for k, v in params.items() if param_role(k) != 'state'
                 and not (param_role(k) == 'adapter' and k.endswith('/scale'))}
  params, lora_params = unflatten(params), unflatten(lora_params)
  x, labels = images(3), np.array([0, 1, 2])
  assert set(flatten(lora_params)) == set(flatten(jax.eval_shape(lambda: init(lora_model))))

  def loss(m, p):
    logits = m.apply({'params': p}, x, train=True)  # No draws: it never drops.
    return optax.softmax_cross_entropy_with_integer_labels(logits, labels).mean(), logits

  (ours_grads, ours), (lora_grads, theirs) = (
      jax.jit(jax.grad(functools.partial(loss, m), has_aux=True))(p)
      for m, p in ((model, params), (lora_model, lora_params)))
  assert relative_error(ours, theirs) <= 1e-6
  for key, value in flatten(lora_grads).items():
    assert relative_error(flatten(ours_grads)[key], value) <= 1e-6, key


# --- The schedule. ---

def expected_rate(method, epoch, epochs):
  return method.drop_start + (method.drop_end - method.drop_start) * min(
      1.0, epoch / (method.drop_ramp * (epochs - 1)))


def test_schedule_follows_the_stated_formula_through_phases():
  method = DmLora(rank=2, branches=2, drop_start=0.1, drop_end=0.5, drop_ramp=0.5,
                  scalar_stage=0.3)
  epochs = 11
  # Rate: 0.1 + 0.08 e up to e = 5, then 0.5; stage 2 from epoch ceil(0.3 * 11) = 4.
  assert method.phase_epochs(epochs) == (1, 2, 3, 4, 5)
  params = init(tiny_model(method))
  shared = params[SHARED_SCOPE]
  assert float(shared[DROP_RATE]) == pytest.approx(0.1) and float(shared[STAGE]) == 0.0
  seen = []
  for epoch in range(epochs):  # The state during each 0-based epoch.
    if epoch in method.phase_epochs(epochs):
      before = flatten(params)
      params = method.run_phase(epoch, epochs, params, None)
      after = flatten(params)
      changed = {k for k in before if not np.array_equal(before[k], after[k])}
      assert changed <= {f'{SHARED_SCOPE}/{DROP_RATE}', f'{SHARED_SCOPE}/{STAGE}'}
      assert method.run_phase(epoch, epochs, params, None)[SHARED_SCOPE] == params[SHARED_SCOPE]
    shared = params[SHARED_SCOPE]
    seen.append((float(shared[DROP_RATE]), float(shared[STAGE])))
  expected = [(expected_rate(method, e, epochs), 1.0 if e >= 4 else 0.0) for e in range(epochs)]
  np.testing.assert_allclose(seen, expected, rtol=1e-6)
  assert seen[5][0] == pytest.approx(0.5) and seen[-1] == pytest.approx((0.5, 1.0))

  default = DmLora()  # 3 epochs: rates 0, 0.25, 0.5; stage 2 from ceil(1.5) = 2.
  assert [default.drop_rate(e, 3) for e in range(3)] == [0.0, 0.25, 0.5]
  assert [default.stage(e, 3) for e in range(3)] == [0.0, 0.0, 1.0]
  assert default.phase_epochs(3) == (1, 2)
  assert default.phase_epochs(100) == tuple(range(1, 100))
  assert default.stage2_start(100) == 50
  assert DmLora(scalar_stage=0.3).stage2_start(10) == 3  # Not 4 (0.3 * 10 > 3 in floats).
  # A constant rate: a phase only where stage 2 starts.
  assert DmLora(drop_start=0.2, drop_end=0.2).phase_epochs(10) == (5,)
  # Stage 2 from the start (initialised so), or never; no phases.
  constant = dict(drop_start=0.0, drop_end=0.0)
  assert DmLora(scalar_stage=0.0, **constant).phase_epochs(10) == ()
  assert float(init(tiny_model(DmLora(scalar_stage=0.0)))[SHARED_SCOPE][STAGE]) == 1.0
  assert DmLora(scalar_stage=1.0, **constant).phase_epochs(10) == ()
  assert DmLora(scalar_stage=1.0).stage(9, 10) == 0.0


@pytest.mark.parametrize('fields, message', [
    (dict(rank=0), 'rank must be an integer >= 1'),
    (dict(branches=1.5), 'branches must be an integer >= 1'),
    (dict(drop_end=1.0), r'drop_end must lie in \[0, 1\)'),
    (dict(drop_start=-0.1), r'drop_start must lie in \[0, 1\)'),
    (dict(drop_ramp=0.0), r'drop_ramp must lie in \(0, 1\]'),
    (dict(scalar_stage=1.5), r'scalar_stage must lie in \[0, 1\]'),
    (dict(scale_init=float('nan')), 'scale_init must be a finite number'),
    (dict(input_dropout=1.0), r'input_dropout must lie in \[0, 1\)'),
    (dict(targets=('ln1',)), "targets \\['ln1'\\] are not sites"),
])
def test_bad_fields_are_refused(fields, message):
  with pytest.raises(ValueError, match=message):
    DmLora(**fields)


# --- Training: the optimizer leaves the state alone; the scalar trains only in stage 2. ---

def one_step(model, params):
  trainable, frozen = split_trainable(params)
  tx = keep_state(make_optimizer(optax.constant_schedule(1e-2), weight_decay=0.1,
                                 grad_clip_norm=1.0,
                                 decay_mask=weight_decay_mask(trainable, 'spt')), trainable)
  cfg = StepConfig(model, tx, 8, (0.5,) * 3, (0.5,) * 3)
  rng = np.random.default_rng(0)
  data = rng.integers(0, 255, (8, TINY_IMAGE, TINY_IMAGE, 3)).astype(np.uint8)
  labels = rng.integers(0, model.num_classes, 8).astype(np.int32)
  state, _ = jax.jit(functools.partial(train_step, cfg=cfg))(
      create_train_state(trainable, tx), frozen, data, labels, epoch_order(jax.random.key(0), 8, 8),
      np.int32(0), jax.random.key(9))
  return flatten(state.trainable)


@pytest.mark.parametrize('stage', [0.0, 1.0])
def test_a_train_step_keeps_the_state_and_holds_the_scalar_in_stage_one(stage):
  model = tiny_model(DmLora(rank=2, branches=4))
  # p = 0.1 of 4 branches: some branch of every site is kept (with these fixed keys), so
  # every scalar has a gradient in stage 2.
  params = with_state(randomize(init(model)), 0.1, stage)
  before = flatten(params)
  after = one_step(model, params)
  for key in (f'{SHARED_SCOPE}/{DROP_RATE}', f'{SHARED_SCOPE}/{STAGE}'):
    assert np.array_equal(after[key], before[key]), key
  scales = [k for k in after if k.endswith('/scale') and param_role(k) == 'adapter']
  assert len(scales) == 3
  for key in scales:
    assert np.array_equal(after[key], before[key]) == (stage == 0.0), key
  for key in after:
    if key.endswith('/B'):
      assert not np.array_equal(after[key], before[key]), key


# --- Merging and the count. ---

@pytest.mark.parametrize('targets', [('qkv',), ('value', 'out', 'fc1', 'fc2')])
def test_merged_model_gives_the_adapted_eval_logits(targets):
  model = tiny_model(DmLora(targets=targets, rank=2, branches=3))
  params = with_state(randomize(init(model)), 0.4, 1.0)
  assert_merge_matches(model, params)


def test_trainable_count_of_vit_b16():
  """12 blocks x 4 branches x rank 8 x (768 in + 2304 out) + 12 scalars (the defaults:
  the paper's count is unknown; its tables are not available to us)."""
  model = create_model('ViT-B_16', 100, adapter=DmLora())
  shapes = jax.eval_shape(lambda: model.init(jax.random.key(0), jnp.zeros((1, 224, 224, 3))))
  counts = count_params(shapes['params'], DmLora().trained_patterns(12))
  assert counts['adapter'] + counts['tuned'] == 12 * 4 * 8 * (768 + 2304) + 12 == 1_179_660
  assert counts['state'] == 2


# --- A full run. ---

def test_a_run_trains_through_the_phases(tmp_path):
  assert get_method('dmlora') is DmLora
  config = tiny_config(**{'adapter.method': 'dmlora', 'epochs': 3, 'adapter.dmlora.rank': 2})
  results = train_and_evaluate(config, str(tmp_path))
  assert results['trainable_params'] == 2 * 4 * 2 * (32 + 96) + 2 + 32 * 4 + 4
  exported = read_npz(os.path.join(tmp_path, 'export', 'adapter.npz'))
  # Epoch 2 (0-based, the last) trained in stage 2 at the ramp's end.
  assert float(exported[f'{SHARED_SCOPE}/{STAGE}']) == 1.0
  assert float(exported[f'{SHARED_SCOPE}/{DROP_RATE}']) == pytest.approx(0.5)
  scales = [v for k, v in exported.items() if k.endswith('adapter_qkv/scale')]
  assert len(scales) == 2 and all(float(s[0]) != 1.0 for s in scales)  # Trained in stage 2.
  assert np.isfinite(results['final_epoch_accuracy'])
