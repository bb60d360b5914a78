"""One entry point from a data config to a TaskData, with the config's fields checked.

Sources: 'tfds' (the 19 VTAB-1k tasks through TFDS), 'folder' (the same tasks from the
PyTorch papers' vtab-1k image folders), 'fgvc' (VPT's json splits) and 'synthetic'.
"""

from __future__ import annotations

import dataclasses
from typing import Any

import ml_collections

from mlae_jax.data import augment, fgvc, preprocess, vtab
from mlae_jax.data.task_data import IMAGENET_MEAN_STD, INCEPTION_MEAN_STD, TaskData

SOURCES = ('tfds', 'folder', 'fgvc', 'synthetic', 'digits')
NORMALIZATIONS = {'inception': INCEPTION_MEAN_STD, 'imagenet': IMAGENET_MEAN_STD}


def default_data_config() -> ml_collections.ConfigDict:
  """The data fields a training config embeds, with their defaults."""
  return ml_collections.ConfigDict({
      'source': 'tfds',             # One of SOURCES.
      'task': 'cifar100',           # VTAB task (tfds, folder), FGVC task (fgvc).
      'data_dir': '',               # TFDS data dir ('': TFDS default) / folder root.
      'train_split': 'train800val200',  # VTAB: train800|val200|train800val200|test; FGVC: train.
      'eval_split': 'test',         # FGVC: val or test.
      'image_size': 224,
      'resize': 'bicubic',          # VTAB: bicubic (PyTorch papers) | bilinear_legacy (VTAB).
      'normalization': 'inception',  # inception (0.5 mean/std, the paper) | imagenet.
      'fgvc_augment': 'crop_flip',  # crop_flip (VPT) | random_resized_crop (MLAE paper).
      'download': False,            # tfds: let TFDS download and prepare missing data.
      # synthetic source (all four) and digits source (num_train, seed; splits
      # trainval|train and test|val):
      'num_classes': 4,
      'num_train': 64,
      'num_eval': 40,
      'seed': 0,
  })


_DEFAULTS = default_data_config().to_dict()


def _field(config: Any, name: str) -> Any:
  return getattr(config, name, _DEFAULTS[name])


def _choice(config: Any, name: str, valid) -> str:
  value = _field(config, name)
  if value not in valid:
    raise ValueError(f'Unknown data.{name} {value!r}; valid: {", ".join(valid)}.')
  return value


def build_task_data(config: Any) -> TaskData:
  """TaskData for `config` (a ConfigDict or any object with the fields of
  `default_data_config`; missing fields take their defaults)."""
  source = _choice(config, 'source', SOURCES)
  mean, std = NORMALIZATIONS[_choice(config, 'normalization', tuple(NORMALIZATIONS))]
  image_size = _field(config, 'image_size')
  if not isinstance(image_size, int) or image_size <= 0:
    raise ValueError(f'data.image_size must be a positive int, got {image_size!r}.')
  task_name, data_dir = _field(config, 'task'), _field(config, 'data_dir')
  train_split, eval_split = _field(config, 'train_split'), _field(config, 'eval_split')

  if source == 'synthetic':
    from mlae_jax.data.synthetic import synthetic_task
    task = synthetic_task(num_classes=_field(config, 'num_classes'),
                          num_train=_field(config, 'num_train'),
                          num_eval=_field(config, 'num_eval'), image_size=image_size,
                          seed=_field(config, 'seed'))
    return dataclasses.replace(task, mean=mean, std=std)

  if source == 'digits':
    from mlae_jax.data.digits import digits_task
    task = digits_task(task_name, num_train=_field(config, 'num_train'), image_size=image_size,
                       seed=_field(config, 'seed'), train_split=train_split,
                       eval_split=eval_split)
    return dataclasses.replace(task, mean=mean, std=std)

  if source == 'fgvc':
    augmentation = _choice(config, 'fgvc_augment', augment.AUGMENTATIONS)
    task = fgvc.get_task(task_name)
    if not data_dir:
      raise ValueError('data.data_dir must name the folder holding the FGVC datasets '
                       f'(e.g. <data_dir>/{task.folder}/train.json).')
    data = fgvc.load_fgvc_task(task, data_dir=data_dir, train_split=train_split,
                               eval_split=eval_split, image_size=image_size, mean=mean, std=std)
    return dataclasses.replace(data, train_augment=augmentation)

  task = vtab.get_task(task_name)
  vtab.check_split(train_split)
  vtab.check_split(eval_split)
  resize = _choice(config, 'resize', preprocess.RESIZE_METHODS)
  if source == 'folder':
    if not data_dir:
      raise ValueError('data.data_dir must name the vtab-1k folder root (holding '
                       f'{task.folder_names[0]}/train800val200.txt).')
    from mlae_jax.data.folder_source import load_folder_task
    return load_folder_task(task, root=data_dir, train_split=train_split, eval_split=eval_split,
                            image_size=image_size, resize=resize, mean=mean, std=std)
  from mlae_jax.data.tfds_source import load_tfds_task
  return load_tfds_task(task, data_dir=data_dir or None, train_split=train_split, eval_split=eval_split,
                        image_size=image_size, resize=resize, mean=mean, std=std,
                        download=bool(_field(config, 'download')))
