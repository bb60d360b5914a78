"""The embedded demo: needs no download and runs on a 2-core CPU in a few minutes.

A small ViT pre-trained by this project on scikit-learn's digits 0-4
(scripts/pretrain_digits_backbone.py, shipped as mlae_jax/assets/digits_vit.npz in the
original checkpoint layout) is adapted with MLAE to digits 5-9, which it never saw,
and compared with every other method of the library on the same backbone (each at its
reference code's defaults, all with the recipe below; README, "The embedded demo").

  python -m mlae_jax.main --config=configs/demo.py --workdir=runs/demo

Training follows the shared recipe (SPT's schedule stepping, weight-decay groups and
evaluation schedule) except for the settings below, which every method shares (so the
methods' own recipes do not apply here). Stochastic depth was chosen for MLAE on the
validation split, never the test part: training on 'train' (200 images), evaluating
on 'val' (50), 8 seeds per rate, final-epoch val accuracy (mean) and val loss:
0.0: 0.855 / 0.479, 0.1: 0.853 / 0.498, 0.2: 0.838 / 0.517, 0.3: 0.835 / 0.518,
0.4: 0.835 / 0.506 (2-core CPU, 2026-12-01). Each point is one command:

  python -m mlae_jax.main --config=configs/demo.py --workdir=runs/dp/$RATE/$SEED \
      --config.baselines='()' --config.data.train_split=train \
      --config.data.eval_split=val --config.model.drop_path_rate=$RATE --config.seed=$SEED
"""

from mlae_jax.assets import DIGITS_BACKBONE
from mlae_jax.training.defaults import base_config


def get_config():
  config = base_config()
  config.model.name = 'ViT-Ti_16'
  config.model.patch_size = 8
  config.model.hidden_size = 64
  config.model.mlp_dim = 128
  config.model.num_heads = 4
  config.model.num_layers = 4
  config.model.dtype = 'float32'
  config.model.drop_path_rate = 0.0  # Best on the validation split (see above).
  config.pretrained = DIGITS_BACKBONE

  config.data.source = 'digits'
  config.data.task = 'digits_5to9'
  config.data.image_size = 32
  config.data.num_train = 250  # 50 per class; the other 646 images are the test part.
  config.data.train_split = 'trainval'  # All 250 ('train': the first 200, 'val': the last 50).
  config.data.eval_split = 'test'

  config.adapter.mlae.rank = 4
  config.adapter.mlae.drop_rate = 0.5
  config.adapter.mlae.coeff_init = 1.0
  config.adapter.lora.rank = 4
  # The seed systems at the same scale: LoRA's rank 4 (DMLoRA: 4 branches of rank 1),
  # Lily's projectors at width 4 (its 32 of 768), Pear's bottleneck at AdaptFormer's 8.
  config.adapter.neat.rank = 4
  config.adapter.heat.rank = 4
  config.adapter.dmlora.rank = 1
  config.adapter.lily.dim = 4
  config.adapter.pear.dim = 8

  config.epochs = 40
  config.batch_size = 50
  config.eval_batch_size = 216
  config.learning_rate = 5e-3
  config.weight_decay = 1e-4
  config.warmup_epochs = 4
  config.eval_every_epochs = 10
  config.checkpoint_every_epochs = 10
  config.baselines = ('lora', 'adapter', 'adaptformer', 'vpt_deep', 'ssf', 'fact_tt', 'fact_tk',
                      'repadapter', 'lily', 'neat', 'dmlora', 'heat', 'pear', 'bitfit', 'full',
                      'linear_probe')
  return config
