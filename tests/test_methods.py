"""Every registered method through the one interface: its config group, exports, merging,
and a run from the command line on a random ViT-B/16 in the original checkpoint layout."""

import json
import os
import subprocess
import sys

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from mlae_jax.adapters import METHODS, NotMergeable, create
from mlae_jax.adapters.merge import merge_adapters
from mlae_jax.adapters.registry import config_group, from_config_group, from_description
from mlae_jax.model import create_model
from mlae_jax.partition import count_params
from mlae_jax.training import config_checks
from mlae_jax.training.defaults import base_config
from fake_checkpoint import write_original_npz
from tiny import images, init, randomize, tiny_model

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
ALL = tuple(METHODS)
# Trainable parameters at ViT-B/16 beside the head, at each method's defaults, and where
# the figure comes from (the papers print rounded millions; see each method's module).
VIT_B16_PARAMS = {
    'mlae': 295_008,  # 12 x (8 x (768 + 2304) + 8); the paper's 0.30 M.
    'lora': 294_912,  # 12 x 8 x (768 + 2304); the paper's 0.29 M.
    'linear_probe': 0,
    'full': 85_798_656,  # ViT-B/16 without its head; the paper's 85.8 M.
    'bitfit': 102_912,  # Every bias of the backbone; BitFit's 0.10 M.
    'vpt_deep': 46_080,  # 12 x 768 x 5 prompts (the paper's 0.53 M averages per-task p).
    'adapter': 156_768,  # 12 x (768 x 8 + 8 + 8 x 768 + 768); the paper's 0.16 M.
    'adaptformer': 156_768,  # The same bottleneck, parallel; the paper's 0.16 M.
    'ssf': 205_824,  # Scale and shift after 8 ops (the paper's 0.24 M includes heads).
    'fact_tt': 21_504,  # Rank 8 (the paper's 0.04 M averages per-task ranks).
    'fact_tk': 13_952,  # Rank 8 (the paper's 0.07 M averages per-task ranks 16, 32).
    'repadapter': 239_808,  # 221,184 weights (the paper's 0.22 M) + 18,624 biases.
    'lily': 792_576,  # HPs 393,216 + 4 LP groups 393,216 + routers 6,144 (main.py's count).
    'neat': 294_912,  # 2 x 12 x (768 x 8 + 8 x 768) on query and value; no paper count.
    'pear': 589_824,  # 12 x 2 x 768 x 32 (the lily repo's AdaptFormer, dim 32); before pruning.
    'dmlora': 1_179_660,  # 12 x 4 branches x 8 x (768 + 2304) + 12 scales; no paper count.
    'heat': 294_912,  # LoRA's (its 144 head masks are state, not trained); no paper count.
}


def test_every_method_is_counted_here():
  assert set(VIT_B16_PARAMS) == set(ALL)


@pytest.mark.parametrize('name', ALL)
def test_trainable_parameters_at_vit_b16(name):
  method = create(name)
  model = create_model('ViT-B_16', 10, adapter=method)
  shapes = jax.eval_shape(model.init, jax.random.key(0), jnp.zeros((1, 224, 224, 3)))['params']
  counts = count_params(shapes, method.trained_patterns(12))
  assert counts['adapter'] + counts['tuned'] == VIT_B16_PARAMS[name]
  assert counts['head'] == 768 * 10 + 10
  assert counts['total'] == 85_798_656 + 7_690 + counts['adapter'] + counts['state']


@pytest.mark.parametrize('name', ALL)
def test_config_group_holds_each_methods_fields_at_their_defaults(name):
  group = config_group(name)
  assert set(group) == {'method'} | set(ALL)
  assert from_config_group(group) == create(name)
  method = create(name)
  assert from_description(json.loads(json.dumps(method.describe()))) == method


def test_a_field_of_the_config_group_reaches_the_method():
  config = base_config()
  config.adapter.method = 'vpt_deep'
  config.adapter.vpt_deep.num_tokens = 50
  assert config_checks.method_of(config).num_tokens == 50
  config.adapter.vpt_deep.num_tokens = 0
  with pytest.raises(ValueError, match=r'num_tokens must be an integer >= 1.*'
                                       r'\(config.adapter.vpt_deep\)'):
    config_checks.resolve(config)


def test_each_method_brings_its_recipe_unless_the_config_sets_it():
  config = base_config()
  assert (config_checks.resolve(config).learning_rate, config_checks.resolve(config).epochs) == (
      5e-4, 500)  # MLAE's (the paper's A.2).
  config.data.source = 'fgvc'
  assert config_checks.resolve(config).epochs == 300
  config.adapter.method = 'lora'
  resolved = config_checks.resolve(config)
  assert (resolved.learning_rate, resolved.weight_decay, resolved.epochs) == (1e-3, 1e-4, 100)
  config.learning_rate = 2e-3
  assert config_checks.resolve(config).learning_rate == 2e-3
  assert config.epochs is None  # resolve works on a copy.


@pytest.mark.parametrize('name', ALL)
def test_merged_equals_adapted_or_merging_is_refused(name):
  method = create(name)
  model = tiny_model(method)
  params = randomize(init(model), roles=('adapter', 'head', 'tuned'))
  x = images(3)
  adapted = np.asarray(model.apply({'params': params}, x))
  if not method.MERGEABLE:
    with pytest.raises(NotMergeable, match=f'{name} cannot be merged'):
      merge_adapters(model, params)
    return
  plain, merged = merge_adapters(model, params)
  assert plain.adapter is None
  np.testing.assert_allclose(np.asarray(plain.apply({'params': merged}, x)), adapted,
                             rtol=1e-4, atol=1e-5)


def train_on_random_vit_b16(tmp_path, *flags: str):
  """(workdir, finished process) of the command line on a random ViT-B/16 in the original
  .npz layout, 4 synthetic 32 px images of 3 classes; `flags` add to it."""
  checkpoint = tmp_path / 'ViT-B_16.npz'
  write_original_npz(checkpoint, hidden=768, mlp=3072, heads=12, layers=12, patch=16)
  workdir = tmp_path / 'run'
  result = subprocess.run(
      [sys.executable, '-m', 'mlae_jax.main', '--config=configs/vtab.py:svhn',
       f'--workdir={workdir}', f'--config.pretrained={checkpoint}', '--config.data.source=synthetic',
       '--config.data.image_size=32', '--config.data.num_classes=3', '--config.data.num_train=4',
       '--config.data.num_eval=4', '--config.batch_size=4', '--config.eval_batch_size=4',
       '--config.warmup_epochs=0', '--config.progress_bar=False', '--config.model.dtype=float32',
       *flags],
      cwd=REPO, env=dict(os.environ, PYTHONPATH=REPO), capture_output=True, text=True,
      timeout=1200)
  assert result.returncode == 0, result.stderr[-3000:]
  return workdir, result


# Methods with phases between epochs: trained from the command line over two epochs, so
# that their phases run (the others in one).
PHASED = ('heat', 'pear', 'dmlora')


def check_cli_runs(workdir, result, names) -> None:
  """Each of `names` (the first in `workdir`, the others as its baselines) printed its row,
  counted its trained parameters, exported, and (mergeable ones) exported merged."""
  rows = {line.split()[0]: line.split()[1:] for line in result.stdout.splitlines()
          if line.split() and line.split()[0] in ALL}
  assert set(rows) == set(names)
  for name in names:
    run = workdir if name == names[0] else workdir / 'baselines' / name
    results = json.loads((run / 'results.json').read_text())
    assert results['method'] == name
    # At 32 px the position embedding holds 1 + 2 x 2 tokens instead of 1 + 14 x 14.
    expected = VIT_B16_PARAMS[name] - (192 * 768 if name == 'full' else 0)
    assert results['tuned_backbone_params'] + results['adapter_params'] == expected
    assert int(rows[name][0].replace(',', '')) == results['trainable_params']
    assert (run / 'export' / 'adapter.npz').is_file()
    assert (run / 'export' / 'merged.npz').is_file() == METHODS[name].MERGEABLE


def test_every_method_trains_from_the_command_line_on_a_vit_b16_checkpoint(tmp_path):
  """One command trains each method without phases on a random ViT-B/16 in the original
  .npz layout; each exports, and the mergeable ones export a merged checkpoint too."""
  names = [name for name in ALL if name not in PHASED]
  workdir, result = train_on_random_vit_b16(tmp_path, '--config.epochs=1',
                                            f'--config.baselines={tuple(names[1:])!r}')
  check_cli_runs(workdir, result, names)


def test_phased_methods_run_their_phases_from_the_command_line_on_a_vit_b16(tmp_path):
  """HEAT's scoring, Pear's pruning and DMLoRA's schedule after epoch 1 of 2, on a random
  ViT-B/16 in the original layout: each run exports as the others do, its export holding
  the changed state."""
  assert set(PHASED) == {name for name in ALL if METHODS[name]().phase_epochs(2)}
  workdir, result = train_on_random_vit_b16(
      tmp_path, '--config.epochs=2', '--config.adapter.method=heat',
      '--config.adapter.heat.score_epoch=1', '--config.adapter.heat.score_batches=1',
      '--config.adapter.pear.prune_epoch=1', '--config.adapter.pear.score_batches=1',
      "--config.baselines=('pear','dmlora')")
  check_cli_runs(workdir, result, PHASED)

  def state(run, leaf):
    arrays = dict(np.load(run / 'export' / 'adapter.npz'))
    return [value for key, value in arrays.items() if key.endswith(leaf)]

  masks = state(workdir, 'state_head_mask')
  assert len(masks) == 12 and 0 < sum(int((m == 0).sum()) for m in masks) < 144
  pruned, = state(workdir / 'baselines' / 'pear', 'state_pruned')
  assert int(pruned.sum()) == 6  # Half of the 12 positions.
  stage, = state(workdir / 'baselines' / 'dmlora', 'state_stage')
  assert float(stage) == 1.0
