"""VTAB-1k on ViT-B/16: `--config=configs/vtab.py:<task>`, MLAE unless
`--config.adapter.method=<method>` names another (see mlae_jax.adapters).

Every task trains on train800val200 and evaluates on test. MLAE trains 500 epochs at
lr 5e-4 with the expert-level dropout p and coefficient init the paper chose per task
(Table 10); another method trains with its own paper's epochs, learning rate and weight
decay (its RECIPE) unless the command line sets them. All are trained with base_config's recipe of the PyTorch runs (stochastic depth 0.1, SPT's
weight-decay groups, schedule stepping and evaluation schedule; README, "Reproducing
the paper").
"""

from mlae_jax.training.defaults import base_config

# task: (drop_rate p, coeff_init), Table 10 of the paper.
TABLE_10 = {
    'cifar100': (0.7, 2.0),
    'caltech101': (0.1, 0.5),
    'dtd': (0.7, 0.25),
    'oxford_flowers102': (0.7, 1.0),
    'oxford_iiit_pet': (0.7, 2.0),
    'svhn': (0.5, 4.0),
    'sun397': (0.7, 4.0),
    'patch_camelyon': (0.7, 1.0),
    'eurosat': (0.5, 4.0),
    'resisc45': (0.5, 2.0),
    'diabetic_retinopathy': (0.7, 0.25),
    'clevr_count': (0.0, 0.125),
    'clevr_dist': (0.0, 0.125),
    'dmlab': (0.5, 2.0),
    'kitti': (0.5, 1.0),
    'dsprites_loc': (0.5, 1.0),
    'dsprites_ori': (0.7, 4.0),
    'smallnorb_azi': (0.0, 1.0),
    'smallnorb_ele': (0.0, 0.25),
}


def get_config(task: str = ''):
  if task not in TABLE_10:
    raise ValueError(f'Unknown VTAB-1k task {task!r}; use configs/vtab.py:<task> with one of: '
                     f'{", ".join(TABLE_10)}.')
  config = base_config()
  config.data.source = 'tfds'
  config.data.task = task
  config.data.train_split = 'train800val200'
  config.data.eval_split = 'test'
  config.adapter.mlae.drop_rate, config.adapter.mlae.coeff_init = TABLE_10[task]
  return config
