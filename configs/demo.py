"""The embedded demo: needs no download and runs on a 2-core CPU in a few minutes.

A small ViT pre-trained by this project on scikit-learn's digits 0-4
(scripts/pretrain_digits_backbone.py, shipped as mlae_jax/assets/digits_vit.npz in the
original checkpoint layout) is adapted with MLAE to digits 5-9, which it never saw,
and compared with a linear probe (head only) and LoRA on the same backbone.

  python -m mlae_jax.main --config=configs/demo.py --workdir=runs/demo
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
  config.pretrained = DIGITS_BACKBONE

  config.data.source = 'digits'
  config.data.task = 'digits_5to9'
  config.data.image_size = 32
  config.data.num_train = 250  # 50 per class; the other 646 images are the test part.

  config.mlae.rank = 4
  config.mlae.drop_rate = 0.5
  config.mlae.coeff_init = 1.0

  config.epochs = 40
  config.batch_size = 50
  config.eval_batch_size = 216
  config.learning_rate = 5e-3
  config.warmup_epochs = 4
  config.eval_every_epochs = 10
  config.checkpoint_every_epochs = 10
  config.baselines = ('linear_probe', 'lora')
  return config
