"""The 19 VTAB-1k tasks as the original VTAB tooling (google-research/task_adaptation)
defines them: TFDS builder and version, the split strings, the label rule, the class
count, and the names of the PyTorch papers' `vtab-1k/<name>` image folders.

The split strings are TFDS slices read in stored order (no shuffling before slicing);
val200 starts at k, the number of training examples VTAB keeps out of its validation
part (e.g. cifar: 90% of 50000 = 45000).
"""

from __future__ import annotations

import dataclasses
from typing import Any, Callable, Mapping

import numpy as np

from mlae_jax.data import labels, preprocess

SPLITS = ('train800', 'val200', 'train800val200', 'test')


@dataclasses.dataclass(frozen=True)
class VtabTask:
  """One VTAB-1k task.

  Attributes:
    name: the task name used in configs.
    tfds_name: TFDS builder string with version pattern, as VTAB/VPT load it.
    splits: VTAB split name (SPLITS) -> TFDS split string.
    num_classes: labels lie in [0, num_classes).
    label_rule: decoded TFDS example -> label.
    decode_features: the TFDS features the rules read (a PartialDecoding spec).
    image_rule: decoded image -> uint8 (H, W, 3) before resizing (grey tiling, x255).
    folder_names: candidate `vtab-1k/<name>` folders (NOAH/SPT/RepAdapter names first).
    tfds_fallback: builder string tried when tfds_name cannot be built (a TFDS release
      that dropped the version VTAB used); None if there is none.
    image_key: the image feature.
  """
  name: str
  tfds_name: str
  splits: Mapping[str, str]
  num_classes: int
  label_rule: labels.LabelRule
  decode_features: Mapping[str, Any]
  image_rule: Callable[[np.ndarray], np.ndarray] = preprocess.to_rgb
  folder_names: tuple[str, ...] = ()
  tfds_fallback: str | None = None
  image_key: str = 'image'

  def __post_init__(self):
    if tuple(self.splits) != SPLITS:
      raise ValueError(f'{self.name}: splits must be {SPLITS}, got {tuple(self.splits)}.')

  @property
  def builder_name(self) -> str:
    """The TFDS builder without version, e.g. 'sun397/tfds'."""
    return self.tfds_name.split(':')[0]


def _splits(train800: str, val200: str, test: str) -> dict[str, str]:
  return {'train800': train800, 'val200': val200, 'train800val200': f'{train800}+{val200}',
          'test': test}


def _val_from_train(k: int, test: str = 'test') -> dict[str, str]:
  """Tasks whose validation part is `train[k:]`: val200 = train[k:k+200]."""
  return _splits('train[:800]', f'train[{k}:{k + 200}]', test)


def _val_from_validation(test: str = 'test') -> dict[str, str]:
  """Tasks with a TFDS `validation` split: val200 = validation[:200]."""
  return _splits('train[:800]', 'validation[:200]', test)


def _dsprites_image(image: np.ndarray) -> np.ndarray:
  return preprocess.to_rgb(preprocess.binary_to_uint8(image))


_LABEL = labels.from_key('label')
_IMAGE_LABEL = {'image': True, 'label': True}


def _task(name: str, tfds_name: str, splits: dict[str, str], num_classes: int,
          folder_names: tuple[str, ...] = (), **kwargs) -> VtabTask:
  kwargs.setdefault('label_rule', _LABEL)
  kwargs.setdefault('decode_features', _IMAGE_LABEL)
  return VtabTask(name=name, tfds_name=tfds_name, splits=splits, num_classes=num_classes,
                  folder_names=folder_names or (name,), **kwargs)


_CLEVR_SPLITS = _val_from_train(63000, test='validation')  # TFDS clevr test has no objects.
# dsprites: 80/10/10 of TFDS train; 0/1 (64, 64, 1) images become 0/255 RGB.
_DSPRITES_SPLITS = _val_from_train(589824, test='train[663552:]')
# smallnorb: VTAB validates on test[:50%] and tests on test[50%:]; images (96, 96, 1) tiled.
_SMALLNORB_SPLITS = _splits('train[:800]', 'test[:200]', 'test[50%:]')

TASKS: dict[str, VtabTask] = {task.name: task for task in [
    # Natural.
    _task('cifar100', 'cifar100:3.*.*', _val_from_train(45000), 100, ('cifar', 'cifar100')),
    _task('caltech101', 'caltech101:3.*.*', _val_from_train(2754), 102),
    _task('dtd', 'dtd:3.*.*', _val_from_validation(), 47),
    _task('oxford_flowers102', 'oxford_flowers102:2.*.*', _val_from_validation(), 102),
    _task('oxford_iiit_pet', 'oxford_iiit_pet:3.*.*', _val_from_train(2944), 37,
          ('oxford_iiit_pet', 'oxford_pet'), tfds_fallback='oxford_iiit_pet:4.*.*'),
    _task('svhn', 'svhn_cropped:3.*.*', _val_from_train(65931), 10),
    _task('sun397', 'sun397/tfds:4.*.*', _val_from_validation(), 397),
    # Specialized.
    _task('patch_camelyon', 'patch_camelyon:2.*.*', _val_from_validation(), 2),
    _task('eurosat', 'eurosat/rgb:2.*.*', _val_from_train(16200, test='train[21600:]'), 10),
    _task('resisc45', 'resisc45:3.*.*', _val_from_train(18900, test='train[25200:]'), 45),
    _task('diabetic_retinopathy', 'diabetic_retinopathy_detection/btgraham-300:3.*.*',
          _val_from_validation(), 5),
    # Structured.
    _task('clevr_count', 'clevr:3.*.*', _CLEVR_SPLITS, 8, label_rule=labels.clevr_count,
          decode_features={'image': True, 'objects': {'size': True}}),
    _task('clevr_dist', 'clevr:3.*.*', _CLEVR_SPLITS, 6, label_rule=labels.clevr_closest_distance,
          decode_features={'image': True, 'objects': {'pixel_coords': True}}),
    _task('dmlab', 'dmlab:2.0.1', _val_from_validation(), 6),
    # VTAB pins kitti:3.1.0, which newer TFDS no longer builds; VPT uses 3.2.0 (same data).
    _task('kitti', 'kitti:3.2.0', _val_from_validation(), 4,
          label_rule=labels.kitti_closest_vehicle_distance,
          decode_features={'image': True, 'objects': {'type': True, 'location': True}}),
    _task('dsprites_loc', 'dsprites:2.*.*', _DSPRITES_SPLITS, 16,
          label_rule=labels.dsprites_binned('label_x_position', 32),
          decode_features={'image': True, 'label_x_position': True}, image_rule=_dsprites_image),
    _task('dsprites_ori', 'dsprites:2.*.*', _DSPRITES_SPLITS, 16,
          label_rule=labels.dsprites_binned('label_orientation', 40),
          decode_features={'image': True, 'label_orientation': True}, image_rule=_dsprites_image),
    _task('smallnorb_azi', 'smallnorb:2.*.*', _SMALLNORB_SPLITS, 18,
          label_rule=labels.from_key('label_azimuth'),
          decode_features={'image': True, 'label_azimuth': True}, image_rule=preprocess.to_rgb),
    _task('smallnorb_ele', 'smallnorb:2.*.*', _SMALLNORB_SPLITS, 9,
          label_rule=labels.from_key('label_elevation'),
          decode_features={'image': True, 'label_elevation': True}, image_rule=preprocess.to_rgb),
]}

TASK_NAMES = tuple(TASKS)
NATURAL = TASK_NAMES[:7]
SPECIALIZED = TASK_NAMES[7:11]
STRUCTURED = TASK_NAMES[11:]


def get_task(name: str) -> VtabTask:
  """The task called `name`; an unknown name lists the valid ones."""
  try:
    return TASKS[name]
  except KeyError:
    raise ValueError(f'Unknown VTAB-1k task {name!r}; valid: {", ".join(TASK_NAMES)}.') from None


def check_split(split: str) -> str:
  """`split` if it is one of SPLITS, else an error listing them."""
  if split not in SPLITS:
    raise ValueError(f'Unknown VTAB-1k split {split!r}; valid: {", ".join(SPLITS)}.')
  return split
