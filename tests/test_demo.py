"""The embedded demo: the README's first command, on real bundled data."""

import os
import subprocess
import sys

import jax
import numpy as np
import pytest

from mlae_jax.assets import DIGITS_BACKBONE
from mlae_jax.checkpoints import load_pretrained, read_npz
from mlae_jax.data.digits import digits_task
from mlae_jax.model.vit import VisionTransformer

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
# Measured on the 2-core CPU (seed 0): MLAE 0.858, LoRA 0.865, AdaptFormer 0.868, BitFit
# 0.810, VPT-Deep 0.782, linear probe 0.712 (README, "The embedded demo", has every method).
MLAE_THRESHOLD = 0.80
METHODS = ('mlae', 'lora', 'adapter', 'adaptformer', 'vpt_deep', 'ssf', 'fact_tt', 'fact_tk',
           'repadapter', 'lily', 'neat', 'dmlora', 'heat', 'pear', 'bitfit', 'full',
           'linear_probe')


def test_demo_command_compares_every_method_and_each_beats_the_linear_probe(tmp_path):
  result = subprocess.run(
      [sys.executable, '-m', 'mlae_jax.main', '--config=configs/demo.py',
       f'--workdir={tmp_path}', '--config.progress_bar=False'],
      cwd=REPO, env=dict(os.environ, PYTHONPATH=REPO), capture_output=True, text=True,
      timeout=600)
  assert result.returncode == 0, result.stderr[-3000:]
  rows = {line.split()[0]: line.split()[1:] for line in result.stdout.splitlines()
          if line.split() and line.split()[0] in METHODS}
  assert tuple(rows) == METHODS  # In the config's order: the method, then its baselines.
  accuracy = {name: float(values[1]) for name, values in rows.items()}
  params = {name: int(values[0].replace(',', '')) for name, values in rows.items()}
  for name in METHODS[:-1]:
    assert accuracy[name] > accuracy['linear_probe'], name
  assert accuracy['mlae'] >= MLAE_THRESHOLD
  head = 64 * 5 + 5
  assert params['mlae'] == 4 * 4 * (64 + 192 + 1) + head
  assert params['lora'] == 4 * 4 * (64 + 192) + head
  assert params['adaptformer'] == 4 * (64 * 8 + 8 + 8 * 64 + 64) + head
  assert params['vpt_deep'] == 4 * 5 * 64 + head
  assert params['bitfit'] == 4 * (192 + 64 + 128 + 64 + 64 + 64) + 64 + 64 + head
  assert params['linear_probe'] == head
  assert params['neat'] == params['heat'] == params['lora']  # Rank 4 on query+value / qkv.
  assert params['dmlora'] == 4 * (4 * 1 * (64 + 192) + 1) + head
  # Lily: k, v HPs (4 experts x 4 x 64 each), the MLP's (4 x 8 x 64), 4 LP groups of
  # (64 x 4, 64 x 4, 64 x 8), routers (4 x 4, 4 x 4, 8 x 4) per block.
  assert params['lily'] == 2 * 4 * 4 * 64 + 4 * 8 * 64 + 4 * 64 * 16 + 4 * 64 + head
  assert params['pear'] == 4 * 2 * 64 * 8 + head  # Every position's, trained before pruning.
  assert 'test accuracy on 646 images' in result.stdout


def test_backbone_asset_is_in_the_original_layout():
  arrays = read_npz(DIGITS_BACKBONE)
  assert 'Transformer/encoderblock_3/MultiHeadDotProductAttention_1/query/kernel' in arrays
  assert 'Transformer/encoderblock_3/MlpBlock_3/Dense_1/kernel' in arrays
  model = VisionTransformer(num_classes=5, patch_size=8, hidden_size=64, mlp_dim=128,
                            num_heads=4, num_layers=4)
  params = load_pretrained(DIGITS_BACKBONE, model, rng=jax.random.key(0), image_size=32)
  assert params['embedding']['kernel'].shape == (8, 8, 3, 64)


def test_digits_tasks_split_without_overlap():
  upper = digits_task('digits_5to9', num_train=250)
  lower = digits_task('digits_0to4', num_train=800)
  assert upper.num_eval == 646 and len(upper.train_labels) == 250
  assert set(np.unique(upper.train_labels)) == set(range(5))
  assert upper.train_images.shape == (250, 32, 32, 3) and upper.train_images.dtype == np.uint8
  evaluated = sum(int(b.mask.sum()) for b in upper.eval_batches(100))
  assert evaluated == 646
  train = digits_task('digits_5to9', num_train=250, train_split='train', eval_split='val')
  assert len(train.train_labels) == 200 and train.num_eval == 50
  np.testing.assert_array_equal(train.train_images, upper.train_images[:200])
  val_images = np.concatenate([b.images[b.mask] for b in train.eval_batches(64)])
  np.testing.assert_array_equal(val_images, upper.train_images[200:])  # Not the test part.
  with pytest.raises(ValueError, match="data.train_split 'train800val200' is not a digits"):
    digits_task('digits_5to9', num_train=250, train_split='train800val200')
  with pytest.raises(ValueError, match="data.eval_split 'trainval' is not a digits"):
    digits_task('digits_5to9', num_train=250, eval_split='trainval')
  with pytest.raises(ValueError, match='digits_0to4, digits_5to9'):
    digits_task('digits_all', num_train=10)
  with pytest.raises(ValueError, match=r'num_train must lie in \[1, 900\]'):
    digits_task('digits_0to4', num_train=901)
  del lower


def test_backbone_script_reproduces_a_loadable_file(tmp_path):
  out = tmp_path / 'backbone.npz'
  result = subprocess.run(
      [sys.executable, 'scripts/pretrain_digits_backbone.py', '--epochs=2', f'--out={out}'],
      cwd=REPO, env=dict(os.environ, PYTHONPATH=REPO), capture_output=True, text=True,
      timeout=600)
  assert result.returncode == 0, result.stderr[-3000:]
  assert set(read_npz(out)) == set(read_npz(DIGITS_BACKBONE))
