"""FGVC on ViT-B/16: `--config=configs/fgvc.py:<dataset>`, MLAE unless
`--config.adapter.method=<method>` names another (see mlae_jax.adapters).

MLAE trains 300 epochs (other methods their paper's recipe) on VPT's train split,
evaluated on test; train images are cropped and
flipped at random (VPT's resize-256 / crop-224 protocol). The paper gives no
per-dataset p or coefficient for FGVC; these use its best VTAB-wide values
(p = 0.5, coefficient 1; Tables 14-15). Training follows base_config's recipe of the
PyTorch runs (stochastic depth 0.1, SPT's weight-decay groups, schedule stepping and
evaluation schedule; README, "Reproducing the paper").
"""

from mlae_jax.training.defaults import base_config

DATASETS = ('cub', 'nabirds', 'oxford_flowers', 'stanford_dogs', 'stanford_cars')


def get_config(dataset: str = ''):
  if dataset not in DATASETS:
    raise ValueError(f'Unknown FGVC dataset {dataset!r}; use configs/fgvc.py:<dataset> with one '
                     f'of: {", ".join(DATASETS)}.')
  config = base_config()
  config.data.source = 'fgvc'
  config.data.task = dataset
  config.data.train_split = 'train'
  config.data.eval_split = 'test'
  config.adapter.mlae.drop_rate = 0.5
  config.adapter.mlae.coeff_init = 1.0
  return config
