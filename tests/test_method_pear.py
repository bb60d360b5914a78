"""Pear (a reconstruction, see mlae_jax/adapters/pear.py): before pruning, the reference
AdaptFormer adapter (yibozhong/lily visual-adaptation-benchmark/vit/adaptformer.py) in
PyTorch inside timm's ViT; the pruning phase on hand-made scores (which positions, which
sources, the knowledge checkpoint), the model after it against PyTorch with shared
modules; state leaves untouched by training; the ViT-B/16 count; a whole run."""

import functools
import json
import types

import torch  # Before jax: see conftest.py.

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from flax import linen as nn

from mlae_jax.adapters.merge import merge_adapters
from mlae_jax.adapters.method import PEFT_RECIPE, ModelInfo, NotMergeable, SiteCall
from mlae_jax.adapters.method import round_half_up
from mlae_jax.adapters.pear import Pear
from mlae_jax.adapters.registry import config_group, get_method
from mlae_jax.adapters.sites import Site
from mlae_jax.checkpoints import load_pretrained
from mlae_jax.checkpoints.layout import flatten, unflatten
from mlae_jax.checkpoints.npz import read_npz
from mlae_jax.partition import param_role, split_trainable
from mlae_jax.training.optimizer import keep_state, make_optimizer, weight_decay_mask
from mlae_jax.training.phases import loss_gradients
from mlae_jax.training.steps import StepConfig, create_train_state, epoch_order, train_step
from mlae_jax.training.train import train_and_evaluate
from tiny import (TINY_IMAGE, images, loss_and_grads, randomize, relative_error, tiny_model,
                  vit_b16_counts)
from torch_reference import (TINY_SIZE, nchw, set_drop_path_keeps, tensor, timm_vit,
                             tiny_checkpoint)
from training_setup import tiny_config

TOLERANCE = 1e-4
LABELS = np.array([0, 3, 1, 4])
DIM = 4  # Not the tiny hidden size (32), so a transposed kernel cannot pass.
SHARED = 'adapter_shared'


# --- The reference adapter in PyTorch ------------------------------------------------

class ReferenceAdapter(torch.nn.Module):
  """adapter_up(dropout(ReLU(adapter_down(x)))), both maps without bias, up zero-initialised
  (yibozhong/lily visual-adaptation-benchmark/vit/adaptformer.py `Adapter`)."""

  def __init__(self, hidden, dim, dropout):
    super().__init__()
    self.adapter_down = torch.nn.Linear(hidden, dim, bias=False)
    self.adapter_up = torch.nn.Linear(dim, hidden, bias=False)
    torch.nn.init.zeros_(self.adapter_up.weight)
    self.act = torch.nn.ReLU()
    self.dropout = torch.nn.Dropout(dropout)

  def forward(self, x):
    return self.adapter_up(self.dropout(self.act(self.adapter_down(x))))


class SharedWithKept(torch.nn.Module):
  """A pruned position: the source position's adapter (the same module object, so its
  gradients add up) plus, with the knowledge checkpoint, a frozen copy of the pruned one."""

  def __init__(self, source, kept):
    super().__init__()
    self.source = source
    self.kept = kept

  def forward(self, x):
    out = self.source(x)
    return out if self.kept is None else out + self.kept(x)


def reference_forward_block(self, x):
  """The reference's forward_block: the adapter reads the residual stream and is added
  outside drop path."""
  x = x + self.drop_path1(self.ls1(self.attn(self.norm1(x))))
  return x + self.drop_path2(self.ls2(self.mlp(self.norm2(x)))) + self.adapter_mlp(x) * self.s


def torch_model(method, checkpoint, flat_params, *, drop_path_rate=0.0):
  """timm's ViT with the reference adapter in every block, holding `flat_params`' head and
  adapters; routed as `flat_params`' Pear state says (identity before pruning)."""
  model = timm_vit(checkpoint, drop_path_rate=drop_path_rate)
  down, up = np.asarray(flat_params[f'{SHARED}/down']), np.asarray(flat_params[f'{SHARED}/up'])
  source = np.asarray(flat_params[f'{SHARED}/state_source'])
  pruned = np.asarray(flat_params[f'{SHARED}/state_pruned'])
  own = []
  with torch.no_grad():
    model.head.weight.copy_(tensor(flat_params['head/kernel']).T)
    model.head.bias.copy_(tensor(flat_params['head/bias']))
    for i in range(len(model.blocks)):
      adapter = ReferenceAdapter(TINY_SIZE['hidden'], method.dim, method.dropout)
      adapter.adapter_down.weight.copy_(tensor(down[i]).T)
      adapter.adapter_up.weight.copy_(tensor(up[i]).T)
      own.append(adapter)
  for p in model.head.parameters():
    p.requires_grad_(True)
  for i, block in enumerate(model.blocks):
    if pruned[i]:
      kept = None
      if method.checkpoint == 'keep':
        kept = ReferenceAdapter(TINY_SIZE['hidden'], method.dim, method.dropout)
        with torch.no_grad():
          kept.adapter_down.weight.copy_(
              tensor(flat_params[f'{SHARED}/state_kept_down'][i]).T)
          kept.adapter_up.weight.copy_(tensor(flat_params[f'{SHARED}/state_kept_up'][i]).T)
        kept.requires_grad_(False)
      block.adapter_mlp = SharedWithKept(own[int(np.argmax(source[i]))], kept)
    else:
      assert np.argmax(source[i]) == i
      block.adapter_mlp = own[i]
    block.s = method.scale
    block.forward = types.MethodType(reference_forward_block, block)
  return model, own


@pytest.fixture(scope='module')
def checkpoint(tmp_path_factory):
  return tiny_checkpoint(tmp_path_factory.mktemp('pear') / 'tiny.npz')


@functools.lru_cache(maxsize=None)
def fresh_params(path, checkpoint_option):
  method = Pear(dim=DIM, checkpoint=checkpoint_option)
  return load_pretrained(path, tiny_model(method), rng=jax.random.key(0),
                         image_size=TINY_IMAGE)


def compare(reference, own, logits, flat_grads, x):
  """Relative errors of the logits and of every adapter's and the head's gradients (our
  stacked slot i against the torch module of position i, which holds the gradients of
  every block that uses it)."""
  reference.train(True)
  torch_logits = reference(nchw(x))
  torch.nn.functional.cross_entropy(torch_logits, torch.from_numpy(LABELS)).backward()
  errors = {'logits': relative_error(logits, torch_logits.detach().numpy()),
            'head': relative_error(flat_grads['head/kernel'], reference.head.weight.grad.numpy().T)}
  for i, adapter in enumerate(own):
    for leaf, linear in (('down', adapter.adapter_down), ('up', adapter.adapter_up)):
      ours = np.asarray(flat_grads[f'{SHARED}/{leaf}'][i])
      if linear.weight.grad is None:  # A pruned slot no block uses.
        assert not np.any(ours), (i, leaf)
        continue
      assert np.abs(linear.weight.grad.numpy()).max() > 0, (i, leaf)
      errors[f'{i}/{leaf}'] = relative_error(ours, linear.weight.grad.numpy().T)
  return errors


# --- (1) Before pruning: the reference adapter --------------------------------------

@pytest.mark.parametrize('drop_path', [0.0, 0.5], ids=['plain', 'drop-path'])
def test_logits_and_gradients_match_the_reference_before_pruning(checkpoint, drop_path):
  """Training mode, dropout 0; with drop path 0.5 (keep patterns carried over) the
  'mlp' site matters: the reference adds the adapter outside drop path, reading x."""
  method = Pear(dim=DIM, dropout=0.0, scale=0.7)
  model = tiny_model(method, drop_path_rate=drop_path)
  params = randomize(fresh_params(checkpoint, 'keep'))  # State stays at its init.
  x = images(4)
  logits, flat_grads, intermediates = loss_and_grads(
      model, params, x, LABELS, train=True,
      drop_path_key=jax.random.key(5) if drop_path else None)
  reference, own = torch_model(method, checkpoint, flatten(params), drop_path_rate=drop_path)
  if drop_path:
    keeps = [np.asarray(v[0]) for k, v in intermediates.items()
             if k.endswith('drop_path_1/keep')]
    assert any(not keep.all() for keep in keeps), 'some MLP branch must be dropped'
    assert set_drop_path_keeps(reference, intermediates) > 0
  errors = compare(reference, own, logits, flat_grads, x)
  assert len(errors) == 2 + 2 * 3
  worst = max(errors, key=errors.get)
  assert errors[worst] <= TOLERANCE, (worst, errors[worst])
  for leaf in ('state_source', 'state_pruned', 'state_kept_down', 'state_kept_up'):
    assert not np.any(np.asarray(flat_grads[f'{SHARED}/{leaf}'])), leaf


def test_eval_logits_match_the_reference_with_dropout_configured(checkpoint):
  method = Pear(dim=DIM, scale=0.7)  # Dropout 0.1 acts in training only, on both sides.
  params = randomize(fresh_params(checkpoint, 'keep'))
  x = images(4)
  logits = tiny_model(method).apply({'params': params}, x, train=False)
  reference, _ = torch_model(method, checkpoint, flatten(params))
  reference.eval()
  with torch.no_grad():
    assert relative_error(logits, reference(nchw(x)).numpy()) <= TOLERANCE


def test_starts_as_the_backbone_with_torch_linear_init(checkpoint):
  flat = flatten(fresh_params(checkpoint, 'keep'))
  assert not np.any(np.asarray(flat[f'{SHARED}/up']))
  down = np.asarray(flat[f'{SHARED}/down'])
  assert down.shape == (3, 32, DIM)
  # torch's nn.Linear default, kaiming_uniform_(a=sqrt(5)): U(+-1/sqrt(d_in)), d_in = 32.
  assert 0.8 / np.sqrt(32) < np.abs(down).max() <= 1 / np.sqrt(32)
  assert not np.allclose(down[0], down[1])  # Each position its own draw.
  np.testing.assert_array_equal(flat[f'{SHARED}/state_source'], np.eye(3))
  for leaf in ('state_pruned', 'state_kept_down', 'state_kept_up'):
    assert not np.any(np.asarray(flat[f'{SHARED}/{leaf}'])), leaf
  # No per-block adapter parameters: everything lives in the stack.
  assert {k.rsplit('/', 1)[0] for k in flat if param_role(k) in ('adapter', 'state')} == {SHARED}
  head = {'head/kernel': jnp.ones_like(flat['head/kernel'])}
  params = unflatten({**flat, **head})
  plain = unflatten({**{k: v for k, v in flat.items() if param_role(k) == 'backbone'},
                     'head/bias': flat['head/bias'], **head})
  x = images(4)
  np.testing.assert_array_equal(tiny_model(Pear(dim=DIM)).apply({'params': params}, x),
                                tiny_model(None).apply({'params': plain}, x))


# --- (2) The pruning phase -------------------------------------------------------------

def scripted_gradients(params, weights, calls):
  """A phase's `gradients`: per batch, the gradient tree is zero except the stacked down
  kernels, g[p] = +-w_p down[p] / |down[p]|^2 (sign alternating by batch), so that
  position p's Taylor score, mean |sum theta g|, is |w_p|. Records the batch counts."""
  flat = flatten(params)
  down = np.asarray(flat[f'{SHARED}/down'])

  def gradients(given, batches):
    assert flatten(given).keys() == flat.keys()
    calls.append(batches)
    out = []
    for batch in range(batches):
      tree = {k: np.zeros(np.shape(v), np.float32) for k, v in flat.items()}
      tree[f'{SHARED}/down'] = np.stack([(-1) ** batch * w * d / np.sum(d * d)
                                         for w, d in zip(weights, down)]).astype(np.float32)
      out.append(unflatten(tree))
    return out

  return gradients


SIX_SCORES = (5.0, 1.0, 4.0, 2.0, 6.0, 3.0)  # Lowest three: positions 1, 3, 5.


def hand_made_params(method, num_layers=6):
  """A parameter tree of `method` on a tiny model of `num_layers` blocks, from shapes
  alone (no compiled init): zero backbone, random adapters and head, state at its init
  (identity routing, nothing pruned or kept)."""
  model = tiny_model(method, num_layers=num_layers)
  shapes = flatten(jax.eval_shape(model.init, jax.random.key(0),
                                  jnp.zeros((1, TINY_IMAGE, TINY_IMAGE, 3)))['params'])
  flat = {k: np.zeros(v.shape, v.dtype) for k, v in shapes.items()}
  flat[f'{SHARED}/state_source'] = np.eye(len(method.sites(num_layers)), dtype=np.float32)
  return randomize(unflatten(flat))


@pytest.mark.parametrize('share, sources', [('nearest', [0, 0, 2, 2, 4, 4]),
                                            ('best', [0, 4, 2, 4, 4, 4])])
@pytest.mark.parametrize('checkpoint_option', ['keep', 'none'])
def test_phase_prunes_the_lowest_scores_and_routes_them(share, sources, checkpoint_option):
  method = Pear(dim=DIM, share=share, checkpoint=checkpoint_option, score_batches=3)
  params = hand_made_params(method)
  before = flatten(params)
  calls = []
  assert method.phase_epochs(4) == (2,)
  after = flatten(method.run_phase(2, 4, params, scripted_gradients(params, SIX_SCORES, calls)))
  assert calls == [3]
  assert after.keys() == before.keys()
  np.testing.assert_array_equal(after[f'{SHARED}/state_pruned'], [0, 1, 0, 1, 0, 1])
  np.testing.assert_array_equal(after[f'{SHARED}/state_source'], np.eye(6)[sources])
  for key in before:  # Only the state changes.
    if not key.startswith(f'{SHARED}/state_'):
      np.testing.assert_array_equal(after[key], before[key])
  if checkpoint_option == 'keep':
    for leaf in ('down', 'up'):
      kept = np.asarray(after[f'{SHARED}/state_kept_{leaf}'])
      stacked = np.asarray(before[f'{SHARED}/{leaf}'])
      np.testing.assert_array_equal(kept[[1, 3, 5]], stacked[[1, 3, 5]])
      assert not np.any(kept[[0, 2, 4]])
  else:
    assert not any('kept' in key for key in after)
  storage = method.adapter_storage(unflatten(after))
  per = 2 * 32 * DIM
  assert storage == {'positions': 6, 'pruned': 3, 'per_adapter': per, 'before': 6 * per,
                     'after': 3 * per, 'kept': 3 * per if checkpoint_option == 'keep' else 0}


def test_nearest_is_by_depth_among_the_adapted_blocks():
  # Blocks 0, 3, 4, 5 adapted: positions 1 (block 3) and 2 (block 4) pruned. By depth
  # both go to block 5 (position 3); by position index, position 1 would go to 0.
  method = Pear(layers=(0, 3, 4, 5))
  sites = method.sites(6)
  assert sites == tuple(Site('mlp', layer) for layer in (0, 3, 4, 5))
  assert method.plan(sites, np.array([4.0, 1.0, 3.0, 5.0])) == ([1, 2], [0, 3, 3, 3])
  # Ties in depth go to the earlier block.
  assert Pear(prune_ratio=0.4).plan(Pear().sites(3), np.array([3.0, 1.0, 2.0])) == ([1], [0, 0, 2])


def test_prune_count_rounds_half_up_and_keeps_one_of_each_site():
  sites = Pear().sites(3)
  scores = np.array([3.0, 1.0, 2.0])
  assert Pear(prune_ratio=0.5).plan(sites, scores)[0] == [1, 2]  # round(1.5) = 2.
  assert Pear(prune_ratio=0.9).plan(sites, scores)[0] == [1, 2]  # 3, but one must stay.
  assert Pear(prune_ratio=0.0).plan(sites, scores) == ([], [0, 1, 2])
  assert Pear(prune_ratio=0.2).plan(sites, np.array([2.0, 1.0, 1.0]))[0] == [1]  # Tie: earlier.
  assert [round_half_up(v) for v in (0.5, 1.5, 2.5, 2.4)] == [1, 2, 3, 2]


def test_scores_on_real_gradients(checkpoint):
  """Through the training's own gradient function: a position's score is |sum theta g|
  over its down and up slices, and for the bias-free ReLU bottleneck the two sums are
  equal (both <delta, dL/d delta>), as the module docstring says."""
  method = Pear(dim=DIM)
  model = tiny_model(method)
  params = randomize(fresh_params(checkpoint, 'keep'))
  rng = np.random.default_rng(1)
  data = rng.integers(0, 255, (6, TINY_IMAGE, TINY_IMAGE, 3)).astype(np.uint8)
  labels = jnp.asarray(LABELS[[0, 1, 2, 3, 0, 1]])
  grads = loss_gradients(model, (0.5,) * 3, (0.5,) * 3)(params, data, labels)
  sums = {leaf: np.sum(np.asarray(params[SHARED][leaf]) * np.asarray(grads[SHARED][leaf]),
                       axis=(1, 2)) for leaf in ('down', 'up')}
  assert np.abs(sums['down']).min() > 1e-6
  np.testing.assert_allclose(sums['down'], sums['up'], rtol=1e-3)
  np.testing.assert_allclose(method.scores(params, [grads]), np.abs(sums['down'] + sums['up']),
                             rtol=1e-5)


def test_phase_epochs():
  assert Pear().phase_epochs(100) == (50,)
  assert Pear().phase_epochs(5) == (3,)  # Half of 5, rounded up.
  assert Pear().phase_epochs(2) == (1,)
  assert Pear().phase_epochs(1) == ()  # Scores need a trained adapter: never at epoch 0.
  assert Pear(prune_epoch=1).phase_epochs(3) == (1,)
  assert Pear(prune_epoch=3).phase_epochs(3) == ()  # Nothing left to adapt after it.
  with pytest.raises(ValueError, match='no phase after epoch 2'):
    Pear(prune_epoch=1).run_phase(2, 3, {}, None)


def test_phase_refuses_pruned_parameters():
  method = Pear(dim=DIM, prune_ratio=0.4)
  params = hand_made_params(method, 3)
  pruned = method.run_phase(2, 4, params, scripted_gradients(params, (3.0, 1.0, 2.0), []))
  with pytest.raises(ValueError, match='already pruned'):
    method.run_phase(2, 4, pruned, scripted_gradients(params, (3.0, 1.0, 2.0), []))


class OneSite(nn.Module):
  """The method's stack and its term at one site, alone (the site's y is zero)."""
  method: Pear
  info: ModelInfo
  site: Site

  @nn.compact
  def __call__(self, x):
    stack = self.method.shared(self.info, name=SHARED)
    return self.method.adapt(self.site, SiteCall(x, jnp.zeros_like(x)), stack, self.info,
                             train=False, name='adapter_mlp')


def numpy_adapter(x, down, up):
  return np.maximum(x @ down, 0) @ up


@pytest.mark.parametrize('checkpoint_option', ['keep', 'none'])
def test_pruned_position_uses_the_source_and_the_kept_copy(checkpoint_option):
  method = Pear(dim=DIM, scale=0.7, checkpoint=checkpoint_option)
  params = hand_made_params(method)
  old = {leaf: np.asarray(params[SHARED][leaf]) for leaf in ('down', 'up')}
  stack = method.run_phase(2, 4, params, scripted_gradients(params, SIX_SCORES, []))[SHARED]
  info = ModelInfo(32, 64, 4, 6, 8, jnp.float32, jnp.float32)
  x = np.random.default_rng(2).standard_normal((2, 5, 32)).astype(np.float32)

  def term(position, stack):
    return OneSite(method, info, Site('mlp', position)).apply({'params': {SHARED: stack}}, x)

  for position, source in ((0, 0), (1, 0), (4, 4), (5, 4)):
    expected = numpy_adapter(x, old['down'][source], old['up'][source])
    if position != source and checkpoint_option == 'keep':
      expected = expected + numpy_adapter(x, old['down'][position], old['up'][position])
    np.testing.assert_allclose(term(position, stack), 0.7 * expected, rtol=1e-5, atol=1e-6)

  # Gradients: position 1 trains its source (0), not its own dead slot, nor the state.
  grads = jax.grad(lambda s: jnp.sum(term(1, s) ** 2))(stack)
  assert np.abs(grads['down'][0]).max() > 0 and np.abs(grads['up'][0]).max() > 0
  assert not np.any(grads['down'][1]) and not np.any(grads['up'][1])
  assert not any(np.any(v) for k, v in grads.items() if k.startswith('state_'))
  both = jax.grad(lambda s: jnp.sum(term(0, s) ** 2) + jnp.sum(term(1, s) ** 2))(stack)
  alone = jax.grad(lambda s: jnp.sum(term(0, s) ** 2))(stack)
  np.testing.assert_allclose(both['down'][0], alone['down'][0] + grads['down'][0], rtol=1e-5)


@pytest.mark.parametrize('checkpoint_option', ['keep', 'none'])
def test_pruned_model_matches_the_reference_with_shared_modules(checkpoint, checkpoint_option):
  """After the phase (position 1 pruned, shared from 0): the whole model against timm with
  block 1 calling block 0's adapter module (plus a frozen copy of its own); the source's
  gradients are the sum over both blocks, the pruned slot's are zero."""
  method = Pear(dim=DIM, dropout=0.0, scale=0.7, prune_ratio=0.4, checkpoint=checkpoint_option)
  params = randomize(fresh_params(checkpoint, checkpoint_option))
  params = method.run_phase(2, 4, params, scripted_gradients(params, (3.0, 1.0, 2.0), []))
  flat = flatten(params)
  np.testing.assert_array_equal(flat[f'{SHARED}/state_pruned'], [0, 1, 0])
  x = images(4)
  logits, flat_grads, _ = loss_and_grads(tiny_model(method), params, x, LABELS, train=True)
  reference, own = torch_model(method, checkpoint, flat)
  errors = compare(reference, own, logits, flat_grads, x)
  assert sorted(errors) == ['0/down', '0/up', '2/down', '2/up', 'head', 'logits']
  worst = max(errors, key=errors.get)
  assert errors[worst] <= TOLERANCE, (worst, errors[worst])
  if checkpoint_option == 'keep':  # The kept copy does change the output.
    dropped = unflatten({**flat, f'{SHARED}/state_kept_up': np.zeros_like(
        flat[f'{SHARED}/state_kept_up'])})
    assert np.abs(tiny_model(method).apply({'params': dropped}, x) - logits).max() > 1e-3


# --- (3) Training leaves the state alone ----------------------------------------------

def test_training_steps_never_change_the_state(checkpoint):
  method = Pear(dim=DIM, prune_ratio=0.4)
  model = tiny_model(method)
  params = randomize(fresh_params(checkpoint, 'keep'))
  params = method.run_phase(2, 4, params, scripted_gradients(params, (3.0, 1.0, 2.0), []))
  trainable, frozen = split_trainable(params)
  rng = np.random.default_rng(0)
  data = rng.integers(0, 255, (8, TINY_IMAGE, TINY_IMAGE, 3)).astype(np.uint8)
  labels = rng.integers(0, 5, 8).astype(np.int32)

  before = flatten(trainable)
  tx = keep_state(make_optimizer(optax.constant_schedule(1e-2), weight_decay=0.1,
                                 grad_clip_norm=None,
                                 decay_mask=weight_decay_mask(trainable, 'spt')), trainable)
  cfg = StepConfig(model, tx, 8, (0.5,) * 3, (0.5,) * 3)
  state = create_train_state(trainable, tx)
  step = jax.jit(functools.partial(train_step, cfg=cfg))
  for index in range(3):
    state, _ = step(state, frozen, data, labels, epoch_order(jax.random.key(index), 8, 8),
                    np.int32(0), jax.random.key(9))
  after = flatten(state.trainable)
  state_keys = [k for k in before if param_role(k) == 'state']
  assert len(state_keys) == 4
  for key in state_keys:
    np.testing.assert_array_equal(after[key], before[key])
  for leaf in ('down', 'up'):  # The source slots train.
    assert not np.array_equal(after[f'{SHARED}/{leaf}'][0], before[f'{SHARED}/{leaf}'][0])
  # The check can fail: AdamW decaying every leaf would move the routing table even
  # with zero gradients.
  plain = make_optimizer(optax.constant_schedule(1e-2), weight_decay=0.1, grad_clip_norm=None)
  updates, _ = plain.update(jax.tree.map(jnp.zeros_like, trainable), plain.init(trainable),
                            trainable)
  assert np.abs(updates[SHARED]['state_source']).max() > 0


# --- (4) Counts ------------------------------------------------------------------------

def test_parameter_counts_of_vit_b16():
  # The reference adapter (no biases) at its default dim 32 in all 12 blocks:
  # 12 x 2 x 768 x 32 = 589,824 trained (every slot trains until pruning). The Pear
  # paper's own table could not be read (its code is unreachable), so this is the
  # reconstruction's figure; at prune_ratio 0.5, 6 adapters (294,912) remain trained
  # after the phase and, with the knowledge checkpoint, 6 frozen copies are kept.
  counts = vit_b16_counts(Pear())
  assert counts['adapter'] + counts['tuned'] == 589_824
  assert counts['state'] == 12 * 12 + 12 + 589_824  # Routing, pruned flags, kept copies.
  assert vit_b16_counts(Pear(checkpoint='none'))['state'] == 12 * 12 + 12
  stack = {'down': np.zeros((12, 768, 32)), 'up': np.zeros((12, 32, 768)),
           'state_pruned': np.array([1.0, 0.0] * 6)}
  assert Pear().adapter_storage(stack) == {'positions': 12, 'pruned': 6, 'per_adapter': 49_152,
                                           'before': 589_824, 'after': 294_912,
                                           'kept': 294_912}


def test_not_mergeable(checkpoint):
  params = randomize(fresh_params(checkpoint, 'keep'))
  with pytest.raises(NotMergeable):
    merge_adapters(tiny_model(Pear(dim=DIM)), params)


# --- (5) A whole run --------------------------------------------------------------------

def test_a_run_prunes_after_its_prune_epoch(tmp_path):
  config = tiny_config(**{'adapter.method': 'pear', 'adapter.pear.prune_epoch': 1,
                          'adapter.pear.dim': DIM, 'epochs': 3})
  results = train_and_evaluate(config, str(tmp_path))
  assert np.isfinite(results['final_epoch_accuracy'])
  trained = read_npz(tmp_path / 'export' / 'adapter.npz')
  pruned = trained[f'{SHARED}/state_pruned']
  assert pruned.tolist() in ([1.0, 0.0], [0.0, 1.0])  # 2 blocks: round(0.5 * 2) = 1.
  gone, kept = int(np.argmax(pruned)), 1 - int(np.argmax(pruned))
  np.testing.assert_array_equal(trained[f'{SHARED}/state_source'], np.eye(2)[[kept, kept]])
  for leaf in ('down', 'up'):
    copies = trained[f'{SHARED}/state_kept_{leaf}']
    assert np.abs(copies[gone]).max() > 0 and not np.any(copies[kept])
  with open(tmp_path / 'export' / 'adapter_config.json') as f:
    assert json.load(f)['adapter']['prune_epoch'] == 1
  assert results['adapter_params'] == 2 * 2 * 32 * DIM  # Both slots, state not counted.


# --- Config ----------------------------------------------------------------------------

@pytest.mark.parametrize('fields, message', [
    (dict(dim=0), 'dim must be an integer >= 1'),
    (dict(scale=float('nan')), 'scale must be a finite number'),
    (dict(dropout=1.0), r'dropout must lie in \[0, 1\)'),
    (dict(prune_epoch=0), 'prune_epoch must be an integer >= 1'),
    (dict(prune_epoch=2.0), 'prune_epoch must be an integer >= 1'),
    (dict(prune_ratio=1.0), r'prune_ratio must lie in \[0, 1\)'),
    (dict(score_batches=0), 'score_batches must be an integer >= 1'),
    (dict(share='random'), 'share must be one of'),
    (dict(checkpoint='yes'), 'checkpoint must be one of'),
    (dict(targets=('ffn',)), "targets \\['ffn'\\] are not sites"),
])
def test_bad_configs_are_refused_with_a_reason(fields, message):
  with pytest.raises(ValueError, match=message):
    Pear(**fields)


def test_registered_with_the_reference_defaults_and_recipe():
  assert get_method('pear') is Pear and Pear.NAME == 'pear' and not Pear.MERGEABLE
  method = Pear()
  assert (method.targets, method.dim, method.scale, method.dropout) == (('mlp',), 32, 1.0, 0.1)
  assert (method.prune_epoch, method.prune_ratio, method.score_batches, method.share,
          method.checkpoint) == (None, 0.5, 8, 'nearest', 'keep')
  assert method.recipe('tfds') == PEFT_RECIPE == {'learning_rate': 1e-3, 'weight_decay': 1e-4,
                                                  'epochs': 100}
  group = config_group('pear')
  assert group.pear.prune_ratio == 0.5 and group.pear.prune_epoch is None
