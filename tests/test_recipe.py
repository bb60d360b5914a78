"""The PyTorch runs' recipe, element by element: SPT's weight-decay groups, timm's
per-epoch cosine stepped as SPT (and as timm's train.py) steps it, SPT's evaluation
schedule, the VTAB/FGVC defaults, and training the adapted layers' biases."""

import json
import os

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
import torch
from timm.scheduler import CosineLRScheduler

from mlae_jax.adapters import Mlae
from mlae_jax.adapters.torch_layout import export_torch_state, import_torch_state
from mlae_jax.checkpoints import load_pretrained, read_npz
from mlae_jax.checkpoints.layout import flatten, unflatten
from mlae_jax.export import load_adapter_export
from mlae_jax.model import create_model
from mlae_jax.partition import count_params, param_role, split_trainable
from mlae_jax.training.metrics import read_metrics
from mlae_jax.training.optimizer import make_optimizer, weight_decay_mask
from mlae_jax.training.schedules import is_evaluation_epoch, learning_rate_schedule
from mlae_jax.training.train import train_and_evaluate
from fake_checkpoint import write_original_npz
from tiny import images, init, randomize, tiny_model
from torch_reference import nchw, tensor, timm_with_mlae, tiny_checkpoint
from training_setup import tiny_config

QKV = 'Transformer/encoderblock_{}/MultiHeadDotProductAttention_0'


def b16_trainable(adapter):
  model = create_model('ViT-B_16', 10, adapter=adapter)
  shapes = jax.eval_shape(model.init, jax.random.key(0), jnp.zeros((1, 224, 224, 3)))['params']
  trainable, _ = split_trainable(shapes, adapter.trained_patterns(12))
  return flatten(trainable)


def test_spt_rule_decays_matrices_only():
  trainable = b16_trainable(Mlae(rank=8, train_bias=True))
  mask = flatten(weight_decay_mask(trainable, 'spt'))
  decayed = sorted(k for k, v in mask.items() if v)
  assert len(decayed) == 2 * 12 + 1
  assert all(k.endswith(('/adapter_qkv/A', '/adapter_qkv/B'))
             for k in decayed if k != 'head/kernel')
  assert mask['head/kernel'] and not mask['head/bias']
  for i in range(12):
    assert not mask[f'{QKV.format(i)}/adapter_qkv/coeff']  # MLAE's lambda: one dimension.
    for name in ('query', 'key', 'value'):
      # (heads, head_dim): two dimensions, but a bias by name, as SPT's `.bias` rule.
      assert trainable[f'{QKV.format(i)}/{name}/bias'].shape == (12, 64)
      assert not mask[f'{QKV.format(i)}/{name}/bias']
  assert all(flatten(weight_decay_mask(trainable, 'all')).values())
  with pytest.raises(ValueError, match="Unknown weight-decay rule 'some'"):
    weight_decay_mask(trainable, 'some')


def test_masked_leaves_get_no_decay_in_the_update():
  params = {'kernel': jnp.ones((2, 3)), 'coeff': jnp.ones(3), 'bias': jnp.ones((2, 2))}
  zero = jax.tree.map(jnp.zeros_like, params)  # Adam's step is 0: only decay moves them.
  for rule, decayed in (('spt', {'kernel'}), ('all', {'kernel', 'coeff', 'bias'})):
    tx = make_optimizer(optax.constant_schedule(0.1), weight_decay=0.5, grad_clip_norm=None,
                        decay_mask=weight_decay_mask(params, rule))
    updates, _ = tx.update(zero, tx.init(params), params)
    for name, update in updates.items():
      expected = -0.1 * 0.5 if name in decayed else 0.0
      np.testing.assert_allclose(np.asarray(update), expected, rtol=1e-6)


@pytest.mark.parametrize('kind, step_after_epoch', [
    ('timm_cosine_spt', lambda epoch: epoch),      # train_spt.py: lr_scheduler.step(epoch)
    ('timm_cosine', lambda epoch: epoch + 1),      # timm train.py: lr_scheduler.step(epoch + 1)
])
def test_schedule_equals_timms_scheduler_stepped_the_same_way(kind, step_after_epoch):
  epochs, steps, warmup = 30, 3, 10
  optimizer = torch.optim.AdamW([torch.nn.Parameter(torch.zeros(1))], lr=5e-4)
  reference = CosineLRScheduler(optimizer, t_initial=epochs, warmup_t=warmup, lr_min=1e-5,
                                warmup_lr_init=1e-6)
  ours = learning_rate_schedule(kind, base_lr=5e-4, epochs=epochs, steps_per_epoch=steps,
                                warmup_epochs=warmup, warmup_lr=1e-6, min_lr=1e-5)
  used = []
  for epoch in range(epochs):
    expected = optimizer.param_groups[0]['lr']  # What this epoch's steps train with.
    used.append(expected)
    for step in range(epoch * steps, (epoch + 1) * steps):
      assert float(ours(step)) == pytest.approx(expected, rel=1e-5), (kind, epoch, step)
    reference.step(step_after_epoch(epoch))
  if kind == 'timm_cosine_spt':
    assert used[0] == used[1] == 1e-6  # Epochs 0 and 1 both at the warm-up start.
  else:
    assert used[0] == 1e-6 and used[1] > 1e-6


def test_the_two_steppings_differ_in_every_warmup_epoch():
  args = dict(base_lr=5e-4, epochs=100, steps_per_epoch=16, warmup_epochs=10, warmup_lr=1e-6,
              min_lr=1e-5)
  spt = learning_rate_schedule('timm_cosine_spt', **args)
  timm = learning_rate_schedule('timm_cosine', **args)
  for epoch in range(1, 11):
    assert float(timm(16 * epoch)) > float(spt(16 * epoch)) * 1.05
    assert float(spt(16 * epoch)) == pytest.approx(float(timm(16 * (epoch - 1))), rel=1e-6)


def test_evaluation_epochs_follow_spts_rule():
  evaluated = [e for e in range(100) if is_evaluation_epoch(e, epochs=100, every=10, last=10)]
  assert evaluated == list(range(0, 90, 10)) + list(range(90, 100))
  assert [e for e in range(7) if is_evaluation_epoch(e, epochs=7, every=5, last=0)] == [0, 5, 6]


def load_config_file(name):
  import importlib.util
  repo = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
  spec = importlib.util.spec_from_file_location(name, os.path.join(repo, 'configs', f'{name}.py'))
  module = importlib.util.module_from_spec(spec)
  spec.loader.exec_module(module)
  return module


def test_a_run_records_every_evaluation_of_the_schedule(tmp_path):
  config = load_config_file('demo').get_config()  # Real digits: accuracy moves between evals.
  config.baselines, config.progress_bar, config.export_merged = (), False, False
  config.epochs, config.eval_every_epochs, config.eval_last_epochs = 12, 5, 3
  config.warmup_epochs, config.checkpoint_every_epochs = 0, 12
  results = train_and_evaluate(config, str(tmp_path))
  evaluations = [r for r in read_metrics(str(tmp_path)) if r['kind'] == 'eval']
  # 0-based epochs 0, 5 (every 5) and 9, 10, 11 (the last 3), recorded 1-based.
  assert [r['epoch'] for r in evaluations] == [1, 6, 10, 11, 12]
  assert results['evaluated_epochs'] == [1, 6, 10, 11, 12]
  accuracies = [r['accuracy'] for r in evaluations]
  assert len(set(accuracies)) > 1, accuracies  # So picking the wrong record shows.
  best = max(evaluations, key=lambda r: r['accuracy'])
  assert results['final_epoch_accuracy'] == evaluations[-1]['accuracy']
  assert results['best_of_evaluations_accuracy'] == best['accuracy']
  assert results['best_of_evaluations_epoch'] == best['epoch']
  with open(tmp_path / 'results.json') as f:
    assert json.load(f)['evaluated_epochs'] == [1, 6, 10, 11, 12]


@pytest.mark.parametrize('config_file, arg', [('vtab', 'svhn'), ('fgvc', 'cub')])
def test_benchmark_configs_default_to_the_pytorch_recipe(config_file, arg):
  config = load_config_file(config_file).get_config(arg)
  assert config.model.drop_path_rate == 0.1
  assert config.weight_decay_rule == 'spt'
  assert config.schedule == 'timm_cosine_spt'
  assert (config.warmup_epochs, config.warmup_lr, config.min_lr) == (10, 1e-6, 1e-5)
  assert (config.eval_every_epochs, config.eval_last_epochs) == (10, 10)
  assert config.adapter.mlae.train_bias is False


def test_training_the_adapted_biases(tmp_path):
  pretrained = tmp_path / 'tiny_in21k.npz'
  write_original_npz(pretrained, hidden=32, mlp=64, heads=4, layers=2, patch=8, image_size=32)
  before = {k: v for k, v in flatten(load_pretrained(
      pretrained, tiny_model(num_layers=2, num_classes=4), rng=jax.random.key(0),
      image_size=32)).items()}
  runs = {}
  for train_bias in (False, True):
    workdir = tmp_path / str(train_bias)
    config = tiny_config(pretrained=str(pretrained), epochs=2, **{'adapter.mlae.train_bias': train_bias})
    runs[train_bias] = train_and_evaluate(config, str(workdir))
    _, params = load_adapter_export(str(workdir / 'export'), str(pretrained))
    exported = read_npz(workdir / 'export' / 'adapter.npz')
    biases = [f'{QKV.format(i)}/{n}/bias' for i in range(2) for n in ('query', 'key', 'value')]
    others = [k for k in before if k.endswith('/bias') and k not in biases
              and param_role(k) == 'backbone']
    for key in biases:
      changed = not np.array_equal(np.asarray(flatten(params)[key]), before[key])
      assert changed == train_bias, key
      assert (key in exported) == train_bias
    for key in others:  # out, MLP and norm biases stay frozen either way.
      np.testing.assert_array_equal(np.asarray(flatten(params)[key]), before[key])
  assert runs[True]['tuned_backbone_params'] == 2 * 3 * 32
  assert runs[True]['trainable_params'] == runs[False]['trainable_params'] + 2 * 3 * 32
  assert runs[True]['adapter_params'] == runs[False]['adapter_params']


def test_trained_biases_move_to_pytorch_as_the_wrapped_layers_bias(tmp_path):
  path = tiny_checkpoint(tmp_path / 'tiny.npz')
  model = tiny_model(Mlae(rank=4, coeff_init=2.0, train_bias=True))
  patterns = model.adapter.trained_patterns(3)
  params = randomize(load_pretrained(path, model, rng=jax.random.key(0), image_size=32))
  flat = flatten(params)
  tuned = [key for key in flat if param_role(key, patterns) == 'tuned']
  rng = np.random.default_rng(3)
  for key in tuned:
    flat[key] = jnp.asarray(rng.normal(0, 0.5, flat[key].shape), jnp.float32)
  params = unflatten(flat)
  assert count_params(params, patterns)['tuned'] == 3 * 96
  state = export_torch_state(model, params)
  assert state['blocks.0.attn.qkv.bias'].shape == (96,)  # q|k|v, as timm's fused qkv.

  reference = timm_with_mlae(path, 4).eval()
  with torch.no_grad():
    reference.head.weight.copy_(tensor(flat['head/kernel']).T)
    reference.head.bias.copy_(tensor(flat['head/bias']))
  # The authors' layer is an nn.Linear: its bias is `qkv.bias`; ours wraps it as `qkv.base`.
  renamed = {k.replace('qkv.bias', 'qkv.base.bias'): torch.from_numpy(np.array(v))
             for k, v in state.items()}
  _, unexpected = reference.load_state_dict(renamed, strict=False)
  assert not unexpected
  x = images(2)
  with torch.no_grad():
    theirs = reference(nchw(x)).numpy()
  ours = np.asarray(model.apply({'params': params}, x))
  assert np.abs(ours - theirs).max() <= 1e-4 * np.abs(theirs).max()

  back = import_torch_state(model, init(model, seed=7), state)
  for key in tuned:
    np.testing.assert_array_equal(np.asarray(flatten(back)[key]), np.asarray(flat[key]))
  del state['blocks.1.attn.qkv.bias']
  with pytest.raises(ValueError, match='missing blocks.1.attn.qkv.bias'):
    import_torch_state(model, params, state)


def test_train_bias_must_be_a_bool():
  with pytest.raises(ValueError, match='train_bias must be True or False'):
    Mlae(train_bias='yes')


def test_summary_counts_the_trained_biases_at_vit_b16():
  from mlae_jax.summary import describe
  text = describe(create_model('ViT-B_16', 10, adapter=Mlae(train_bias=True)), 224)
  # 12 blocks x (q, k, v biases: 3 x 768) beside the 295,008 adapter parameters.
  assert 'adapter 295,008, head 7,690, tuned 27,648, trainable 330,346' in text
