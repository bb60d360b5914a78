"""The training loop: partition, steps, schedules, parallelism, resume, exports, CLI."""

import functools
import json
import os
import signal
import subprocess
import sys
import time

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

from mlae_jax.adapters import Mlae
from mlae_jax.checkpoints import read_npz
from mlae_jax.checkpoints.layout import flatten
from mlae_jax.partition import combine, param_role, split_trainable
from mlae_jax.training.metrics import read_metrics
from mlae_jax.training.optimizer import make_optimizer
from mlae_jax.training.schedules import learning_rate_schedule
from mlae_jax.training.steps import StepConfig, TrainState, epoch_order, eval_step, train_step
from mlae_jax.training.train import train_and_evaluate
from tiny import init, tiny_model
from training_setup import tiny_config, tiny_config_flags

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def step_setup(batch_size=8, num_train=20):
  model = tiny_model(Mlae(rank=4, drop_rate=0.5))
  trainable, frozen = split_trainable(init(model))
  tx = make_optimizer(optax.constant_schedule(1e-2), weight_decay=1e-4, grad_clip_norm=1.0)
  cfg = StepConfig(model, tx, batch_size, (0.5,) * 3, (0.5,) * 3)
  state = TrainState(jnp.zeros((), jnp.int32), trainable, tx.init(trainable))
  rng = np.random.default_rng(0)
  images = rng.integers(0, 255, (num_train, 32, 32, 3)).astype(np.uint8)
  labels = rng.integers(0, 5, num_train).astype(np.int32)
  return model, cfg, state, frozen, images, labels


def test_training_changes_only_adapters_and_head():
  model, cfg, state, frozen, images, labels = step_setup()
  before = flatten(combine(state.trainable, frozen))
  step = jax.jit(functools.partial(train_step, cfg=cfg))
  for epoch in range(2):
    order = epoch_order(jax.random.key(epoch), len(labels), 8)
    for index in range(3):
      state, _ = step(state, frozen, images, labels, order, np.int32(index), jax.random.key(9))
  after = flatten(combine(state.trainable, frozen))
  assert set(after) == set(before)
  for key, value in after.items():
    if param_role(key) == 'backbone':
      np.testing.assert_array_equal(np.asarray(value), np.asarray(before[key]))
    else:
      assert not np.array_equal(np.asarray(value), np.asarray(before[key])), key
  assert int(state.step) == 6


def test_compiled_step_computes_no_frozen_weight_gradients():
  model, cfg, state, frozen, images, labels = step_setup()
  order = epoch_order(jax.random.key(0), len(labels), 8)
  args = (state, frozen, images, labels, order, np.int32(0), jax.random.key(1))
  ours = jax.jit(functools.partial(train_step, cfg=cfg)).lower(*args).compile()
  ours_flops = ours.cost_analysis()['flops']

  params = combine(state.trainable, frozen)
  x = jnp.zeros((8, 32, 32, 3), jnp.float32)

  def all_gradients(params):  # What a naive step computes (and keeps).
    def loss(p):
      logits = model.apply({'params': p}, x, train=True, rngs={'expert_mask': jax.random.key(0)})
      return optax.softmax_cross_entropy_with_integer_labels(logits, labels[:8]).mean()
    return jax.grad(loss)(params)

  naive_flops = jax.jit(all_gradients).lower(params).compile().cost_analysis()['flops']
  # Multiply-adds that the frozen kernels' weight gradients alone would need.
  tokens = 8 * (1 + (32 // 8) ** 2)
  kernels = sum(np.prod(v.shape) for k, v in flatten(frozen).items()
                if k.endswith('kernel') and 'embedding' not in k)
  weight_gradient_flops = 2 * tokens * kernels
  assert naive_flops - ours_flops >= 0.9 * weight_gradient_flops


def test_last_partial_batch_is_weighted_by_its_real_examples():
  _, cfg, state, frozen, images, labels = step_setup(batch_size=8, num_train=20)
  order = epoch_order(jax.random.key(0), 20, 8)
  assert order.shape == (24,) and int((order < 0).sum()) == 4
  assert sorted(np.asarray(order[:20]).tolist()) == list(range(20))
  _, metrics = jax.jit(functools.partial(train_step, cfg=cfg))(
      state, frozen, images, labels, order, np.int32(2), jax.random.key(1))
  assert float(metrics['count']) == 4.0


def test_eval_counts_every_example_once():
  from mlae_jax.data.task_data import array_eval_batches
  model, cfg, state, frozen, _, _ = step_setup()
  rng = np.random.default_rng(1)
  images = rng.integers(0, 255, (37, 32, 32, 3)).astype(np.uint8)
  labels = rng.integers(0, 5, 37).astype(np.int32)
  step = jax.jit(functools.partial(eval_step, cfg=cfg))
  totals = {'correct': 0.0, 'count': 0.0}
  for batch in array_eval_batches(images, labels)(16):
    sums = step(state.trainable, frozen, batch.images, batch.labels, batch.mask)
    totals = {k: totals[k] + float(sums[k]) for k in totals}
  logits = model.apply({'params': combine(state.trainable, frozen)},
                       images.astype(np.float32) / 127.5 - 1.0)
  assert totals['count'] == 37
  assert totals['correct'] == float(np.sum(np.argmax(logits, -1) == labels))


def test_warmup_cosine_schedule():
  schedule = learning_rate_schedule('warmup_cosine', base_lr=5e-4, epochs=10, steps_per_epoch=4,
                                    warmup_epochs=2, warmup_lr=1e-6, min_lr=1e-5)
  assert float(schedule(0)) == pytest.approx(1e-6, rel=1e-4)
  assert float(schedule(8)) == pytest.approx(5e-4, rel=1e-5)
  assert float(schedule(40)) == pytest.approx(1e-5, rel=1e-4)
  assert float(schedule(4)) == pytest.approx((1e-6 + 5e-4) / 2, rel=1e-5)
  assert float(schedule(24)) == pytest.approx(1e-5 + (5e-4 - 1e-5) / 2, rel=1e-4)


def test_unknown_schedule_is_refused():
  with pytest.raises(ValueError, match="Unknown schedule 'linear'"):
    learning_rate_schedule('linear', base_lr=1, epochs=1, steps_per_epoch=1, warmup_epochs=0,
                           warmup_lr=0, min_lr=0)


@pytest.fixture(scope='module')
def finished_run(tmp_path_factory):
  workdir = str(tmp_path_factory.mktemp('run'))
  results = train_and_evaluate(tiny_config(), workdir)
  return workdir, results


def test_a_run_writes_metrics_checkpoints_exports_and_results(finished_run):
  workdir, results = finished_run
  records = read_metrics(workdir)
  assert [r['epoch'] for r in records if r['kind'] == 'train'] == [1, 2, 3, 4]
  assert [r['epoch'] for r in records if r['kind'] == 'eval'] == [1, 3, 4]
  assert all(np.isfinite(r['loss']) for r in records)
  assert sorted(os.listdir(os.path.join(workdir, 'checkpoints'))) == ['3', '4']
  from tensorboard.backend.event_processing.event_accumulator import EventAccumulator
  events = EventAccumulator(os.path.join(workdir, 'tensorboard'))
  events.Reload()
  assert [e.step for e in events.Scalars('eval/accuracy')] == [r['step'] for r in records
                                                                if r['kind'] == 'eval']
  assert events.Scalars('train/loss')[-1].value == pytest.approx(records[-2]['loss'])
  with open(os.path.join(workdir, 'results.json')) as f:
    saved = json.load(f)
  assert saved == json.loads(json.dumps(results))
  assert saved['final_epoch_accuracy'] == records[-1]['accuracy']
  assert saved['best_of_evaluations_accuracy'] == max(r['accuracy'] for r in records
                                                      if r['kind'] == 'eval')
  assert saved['num_eval'] == 37 and saved['adapter_params'] == 2 * 4 * (32 + 96 + 1)
  assert saved['compute_dtype']['name'] == 'float32'  # tiny_config: 'auto', on the CPU.
  assert 'no native bf16 on CPU' in saved['compute_dtype']['reason']
  exported = read_npz(os.path.join(workdir, 'export', 'adapter.npz'))
  assert all(param_role(k) in ('adapter', 'head') for k in exported)
  with open(os.path.join(workdir, 'export', 'adapter_config.json')) as f:
    description = json.load(f)
  assert description['adapter']['rank'] == 4 and description['model']['num_classes'] == 4
  merged = read_npz(os.path.join(workdir, 'export', 'merged.npz'))
  assert 'Transformer/encoderblock_1/MultiHeadDotProductAttention_1/query/kernel' in merged
  assert not any('adapter' in k for k in merged)


def test_same_seed_gives_identical_results(finished_run, tmp_path):
  workdir, results = finished_run
  again = train_and_evaluate(tiny_config(), str(tmp_path))
  assert again['final_epoch_accuracy'] == results['final_epoch_accuracy']
  first = read_metrics(workdir)
  second = read_metrics(str(tmp_path))
  assert [r['loss'] for r in first] == [r['loss'] for r in second]
  a = read_npz(os.path.join(workdir, 'export', 'adapter.npz'))
  b = read_npz(os.path.join(tmp_path, 'export', 'adapter.npz'))
  for key in a:
    np.testing.assert_array_equal(a[key], b[key])


def test_rerunning_a_finished_run_resumes_without_training(finished_run):
  workdir, results = finished_run
  started = time.time()
  again = train_and_evaluate(tiny_config(), workdir)
  assert again['final_epoch_accuracy'] == results['final_epoch_accuracy']
  assert [r['epoch'] for r in read_metrics(workdir) if r['kind'] == 'train'] == [1, 2, 3, 4]
  assert time.time() - started < 60


def test_training_learns_the_synthetic_task(tmp_path):
  results = train_and_evaluate(tiny_config(**{'epochs': 12, 'data.num_train': 96,
                                              'adapter.mlae.drop_rate': 0.0}), str(tmp_path))
  assert results['final_epoch_accuracy'] > 0.5  # Chance is 0.25.


def run_cli(workdir, *extra, env=None, wait=True):
  command = [sys.executable, '-m', 'mlae_jax.main', '--config=configs/vtab.py:svhn',
             f'--workdir={workdir}', *tiny_config_flags(), *extra]
  environment = dict(os.environ, PYTHONPATH=REPO, **(env or {}))
  if not wait:
    return subprocess.Popen(command, cwd=REPO, env=environment, stdout=subprocess.DEVNULL,
                            stderr=subprocess.DEVNULL)
  return subprocess.run(command, cwd=REPO, env=environment, capture_output=True, text=True,
                        timeout=600)


def test_cli_resumes_a_killed_run_to_the_uninterrupted_result(tmp_path):
  epochs = '--config.epochs=8'
  straight = run_cli(tmp_path / 'straight', epochs)
  assert straight.returncode == 0, straight.stderr[-3000:]
  assert 'final epoch' in straight.stdout and 'best of evals' in straight.stdout

  workdir = tmp_path / 'killed'
  process = run_cli(workdir, epochs, wait=False)
  checkpoints = workdir / 'checkpoints'
  deadline = time.time() + 300
  while time.time() < deadline and process.poll() is None:
    if checkpoints.exists() and any(name.isdigit() for name in os.listdir(checkpoints)):
      process.send_signal(signal.SIGKILL)
      break
    time.sleep(0.05)
  process.wait()
  assert process.returncode == -signal.SIGKILL, 'the run was killed midway'
  assert not (workdir / 'results.json').exists()
  resumed = run_cli(workdir, epochs)
  assert resumed.returncode == 0, resumed.stderr[-3000:]
  assert 'Resuming from the checkpoint after epoch' in resumed.stderr

  a = read_npz(tmp_path / 'straight' / 'export' / 'adapter.npz')
  b = read_npz(workdir / 'export' / 'adapter.npz')
  assert set(a) == set(b)
  for key in a:
    np.testing.assert_array_equal(a[key], b[key])
  with open(workdir / 'config.json') as f:  # Stochastic depth on: its draws resume too.
    assert json.load(f)['model']['drop_path_rate'] == 0.1
  straight_losses = [r['loss'] for r in read_metrics(str(tmp_path / 'straight'))]
  assert [r['loss'] for r in read_metrics(str(workdir))] == straight_losses


def test_one_and_eight_devices_give_the_same_losses(tmp_path):
  losses = []
  for devices in (1, 8):
    flags = f'--xla_force_host_platform_device_count={devices}'
    result = run_cli(tmp_path / str(devices), '--config.epochs=3', env={'XLA_FLAGS': flags})
    assert result.returncode == 0, result.stderr[-3000:]
    records = read_metrics(str(tmp_path / str(devices)))
    losses.append([r['loss'] for r in records])
    with open(tmp_path / str(devices) / 'results.json') as f:
      assert json.load(f)['device'].startswith(f'{devices} x')
  np.testing.assert_allclose(losses[0], losses[1], rtol=1e-5)
  result = run_cli(tmp_path / 'odd', '--config.batch_size=12',
                   env={'XLA_FLAGS': '--xla_force_host_platform_device_count=8'})
  assert result.returncode != 0 and 'must be a multiple of the 8 devices' in result.stderr


def test_cli_reports_bad_config_values(tmp_path):
  result = run_cli(tmp_path, '--config.adapter.mlae.drop_rate=1.5')
  assert result.returncode != 0
  assert 'drop_rate must lie in [0, 1)' in result.stderr
  result = subprocess.run([sys.executable, '-m', 'mlae_jax.main', '--config=configs/vtab.py:svhm',
                           f'--workdir={tmp_path}'], cwd=REPO, capture_output=True, text=True,
                          env=dict(os.environ, PYTHONPATH=REPO))
  assert result.returncode != 0
  assert "Unknown VTAB-1k task 'svhm'" in result.stderr and 'smallnorb_ele' in result.stderr


@pytest.mark.parametrize('field, value, message', [
    ('epochs', 0, 'config.epochs = 0: must be an integer >= 1'),
    ('schedule', 'step', "config.schedule = 'step'"),
    ('warmup_epochs', 9, 'config.warmup_epochs = 9: must be a finite number in [0, epochs=4)'),
    ('model.dtype', 'float16', "config.model.dtype = 'float16'"),
    ('learning_rate', 0.0, 'config.learning_rate = 0.0: must be a finite number > 0'),
    ('model.drop_path_rate', 1.0,
     'config.model.drop_path_rate = 1.0: must be a finite number in [0, 1)'),
    ('weight_decay_rule', 'none', "config.weight_decay_rule = 'none': use one of ('spt', 'all')"),
    ('eval_last_epochs', -1, 'config.eval_last_epochs = -1: must be an integer >= 0'),
])
def test_bad_config_values_are_named(field, value, message, tmp_path):
  config = tiny_config(**{field: value})
  with pytest.raises(ValueError) as error:
    train_and_evaluate(config, str(tmp_path))
  assert message in str(error.value)


def test_exports_reload_in_our_loader_and_in_timm(tmp_path):
  import torch
  from timm.models.vision_transformer import VisionTransformer as TimmViT

  from fake_checkpoint import write_original_npz
  from mlae_jax.checkpoints import load_pretrained
  from mlae_jax.export import load_adapter_export
  from mlae_jax.training.run_setup import create_model_from_config

  pretrained = tmp_path / 'tiny_in21k.npz'
  write_original_npz(pretrained, hidden=32, mlp=64, heads=4, layers=2, patch=8, image_size=32)
  config = tiny_config(pretrained=str(pretrained), epochs=2)
  train_and_evaluate(config, str(tmp_path / 'run'))
  export = tmp_path / 'run' / 'export'

  model, params = load_adapter_export(str(export), str(pretrained))
  x = np.random.default_rng(0).uniform(-1, 1, (3, 32, 32, 3)).astype(np.float32)
  adapted = np.asarray(model.apply({'params': params}, x))
  assert model == create_model_from_config(config, 4)
  assert np.abs(adapted).max() > 0.1  # Trained: the head is no longer zero.

  plain = model.clone(adapter=None)
  merged = load_pretrained(export / 'merged.npz', plain, rng=jax.random.key(0), image_size=32,
                           keep_head=True)
  ours = np.asarray(plain.apply({'params': merged}, x))
  assert np.abs(ours - adapted).max() <= 1e-5

  reference = TimmViT(img_size=32, patch_size=8, embed_dim=32, depth=2, num_heads=4, mlp_ratio=2,
                      num_classes=4)
  reference.load_pretrained(str(export / 'merged.npz'))
  reference.eval()
  with torch.no_grad():
    theirs = reference(torch.from_numpy(x).permute(0, 3, 1, 2)).numpy()
  assert np.abs(theirs - adapted).max() <= 1e-4


@pytest.mark.parametrize('augment', ['crop_flip', 'random_resized_crop'])
def test_training_crops_fgvc_style_tasks_on_the_device(augment, tmp_path):
  from mlae_jax.data.synthetic import synthetic_task
  from mlae_jax.data.task_data import TaskData, array_eval_batches
  from mlae_jax.training.train import train_on_task
  large = synthetic_task(num_train=24, num_eval=1, image_size=40)
  small = synthetic_task(num_train=1, num_eval=10, image_size=32, seed=1)
  eval_images = np.concatenate([b.images[b.mask] for b in small.eval_batches(10)])
  eval_labels = np.concatenate([b.labels[b.mask] for b in small.eval_batches(10)])
  # Training images are larger than the model's input: only the crop makes them fit.
  data = TaskData('crops', 4, large.train_images, large.train_labels,
                  array_eval_batches(eval_images, eval_labels), 10, train_crop=32,
                  train_augment=augment)
  results = train_on_task(tiny_config(epochs=2), str(tmp_path), data)
  assert results['num_eval'] == 10 and np.isfinite(read_metrics(str(tmp_path))[-1]['loss'])


SHARDED_FLOPS_SCRIPT = '''
import json, sys
import jax, numpy as np
from jax.sharding import Mesh
sys.path.insert(0, 'tests')
from test_training import step_setup
from mlae_jax.training import parallel
from mlae_jax.training.steps import StepConfig, jit_train_step, stack_configs
model, cfg, state, frozen, images, labels = step_setup(batch_size=16, num_train=32)
state = stack_configs([state])  # The compiled step trains K = 1 stacked configurations.
flops = {}
for devices in (1, 8):
  mesh = Mesh(np.asarray(jax.devices()[:devices]), (parallel.DATA_AXIS,))
  sharded = StepConfig(**{**cfg.__dict__, 'batch_sharding': parallel.batch_sharding(mesh)})
  args = jax.device_put((state, frozen, images, labels, np.arange(32, dtype=np.int32)),
                        parallel.replicated(mesh))
  compiled = jit_train_step(sharded, parallel.replicated(mesh)).lower(
      *args, np.int32(0), jax.random.key(0)).compile()
  flops[devices] = compiled.cost_analysis()['flops']
print(json.dumps(flops))
'''


def test_each_device_computes_only_its_share_of_the_batch():
  # Replicated training data must not make every device run the whole batch.
  result = subprocess.run([sys.executable, '-c', SHARDED_FLOPS_SCRIPT], cwd=REPO, text=True,
                          capture_output=True, timeout=600,
                          env=dict(os.environ, PYTHONPATH=REPO,
                                   XLA_FLAGS='--xla_force_host_platform_device_count=8'))
  assert result.returncode == 0, result.stderr[-3000:]
  flops = json.loads(result.stdout.strip().splitlines()[-1])
  assert flops['8'] < flops['1'] / 4, flops
