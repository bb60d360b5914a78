"""VTAB-1k tasks read through TFDS, with the VTAB tooling's builders and split strings.

Splits are TFDS slices read without file shuffling (`shuffle_files=False`), as VTAB and
VPT read them, so `train[:800]` is the same 800 examples, in the same order, every run. The training split is decoded, labelled
and resized once into memory; the evaluation split is streamed each time it is asked
for, preprocessed on a few threads.
"""

from __future__ import annotations

import functools
import logging
from typing import Any, Iterator, Mapping

import numpy as np

from mlae_jax.data import parallel, preprocess
from mlae_jax.data.task_data import Batch, TaskData, padded_batches
from mlae_jax.data.vtab import VtabTask

logger = logging.getLogger(__name__)

_AUTO = ('TFDS downloads and prepares it itself: set data.download=True, or run '
         '`tfds build {build}{data_dir_flag}` (on a machine without internet access: build it '
         'elsewhere and copy the `{folder}` folder into {root}).')
_MANUAL_DIR_NOTE = ('TFDS cannot download it by itself: put the files in the manual dir '
                    '{manual} (TFDS default: <data dir>/downloads/manual) and run '
                    '`tfds build {build}{data_dir_flag} --manual_dir={manual}`.')

# How to get the data of the tasks whose preparation needs more than `tfds build`.
_PREPARE_HINTS: dict[str, str] = {
    'diabetic_retinopathy_detection/btgraham-300': (
        _MANUAL_DIR_NOTE + ' Download the Kaggle competition "diabetic-retinopathy-detection" '
        'data (https://www.kaggle.com/c/diabetic-retinopathy-detection/data; about 88 GB): check '
        'that all five train.zip.00* parts are there, join them with `cat train.zip.* > train.zip` '
        '(use `jar xvf` if unzip fails), unpack train.zip into {manual}/train/ (the builder reads '
        'train/*.jpeg), test.zip into {manual}/test/ and sample.zip into {manual}/sample/, and put '
        'trainLabels.csv in {manual}/. The build needs opencv-python and fetches the test labels '
        '(retinopathy_solution.csv) from storage.googleapis.com.'),
    'resisc45': (
        _MANUAL_DIR_NOTE + ' Download NWPU-RESISC45.rar from '
        'https://1drv.ms/u/s!AmgKYzARBl5ca3HNaHIlzp_IXjs and extract it so that '
        '{manual}/NWPU-RESISC45/<class>/*.jpg exists.'),
    'sun397/tfds': (
        _AUTO + ' The build downloads SUN397.tar.gz (tens of GB) from vision.princeton.edu and '
        'needs opencv-python; an older TFDS may stop on the undecodable image '
        't/track/outdoor/sun_aophkoiosslinihb.jpg (ignored by TFDS 4.9.10).'),
    'dmlab': (
        _AUTO + ' The VTAB tooling never prepares dmlab itself; the build downloads '
        'storage.googleapis.com/dmlab-vtab/dmlab.tar.gz (about 13.8 GB prepared).'),
    'clevr': _AUTO + ' The build downloads CLEVR_v1.0.zip (about 18 GB).',
    'kitti': _AUTO + ' The build downloads the KITTI object images (about 12 GB).',
}
_FOLDER_HINT = (' Alternatively, use the PyTorch papers\' vtab-1k image folders: '
                'data.source="folder", data.data_dir=<the vtab-1k folder, holding '
                '<task>/train800val200.txt>.')


def prepare_hint(task: VtabTask, root: str) -> str:
  """What to download and where to put it, for `task` under the TFDS data dir `root`."""
  builder = task.builder_name
  version = task.tfds_name.split(':')[1] if ':' in task.tfds_name else ''
  build = f'{builder}:{version}' if version and '*' not in version else builder
  hint = _PREPARE_HINTS.get(builder, _AUTO)
  return hint.format(build=build, root=root, folder=builder.split('/')[0],
                     manual=f'{root}/downloads/manual', data_dir_flag=f' --data_dir={root}')


def hide_accelerators_from_tensorflow() -> None:
  """Makes GPUs and TPUs invisible to TensorFlow, which TFDS runs its pipelines on, so
  that TensorFlow never reserves the accelerator memory JAX trains in (as the flax
  examples do). Must run before TensorFlow first touches its devices; if something
  else already made it do so, a warning says that TensorFlow may hold memory."""
  import tensorflow as tf
  for kind in ('GPU', 'TPU'):
    try:
      tf.config.set_visible_devices([], kind)
    except RuntimeError:  # TensorFlow's devices are already initialised.
      visible = tf.config.get_visible_devices(kind)
      if visible:
        logger.warning('TensorFlow initialised its devices before mlae_jax could hide them; '
                       'it sees %s and may hold their memory. Import and use TensorFlow only '
                       'after building the data, or set its visible devices to [] yourself.',
                       ', '.join(d.name for d in visible))


def _tfds() -> Any:
  """tensorflow_datasets (a heavy import, only for this source), with TensorFlow kept off
  the accelerators first."""
  hide_accelerators_from_tensorflow()
  import tensorflow_datasets as tfds
  return tfds


def open_builder(task: VtabTask, data_dir: str | None) -> Any:
  """The TFDS builder of `task` (its fallback version if TFDS cannot build the one VTAB
  used); `data_dir` None means TFDS's default (TFDS_DATA_DIR or ~/tensorflow_datasets)."""
  tfds = _tfds()
  failures = []
  for name in (task.tfds_name,) + ((task.tfds_fallback,) if task.tfds_fallback else ()):
    try:
      builder = tfds.builder(name, data_dir=data_dir)
    except (AssertionError, ValueError) as error:
      failures.append(f'{name}: {error}')
      continue
    if name != task.tfds_name:
      logger.warning('%s: TFDS cannot build %s (%s); using %s, whose example order may differ '
                     'from the one VTAB/VPT used.', task.name, task.tfds_name, failures[-1], name)
    return builder
  root = data_dir or tfds.core.constants.DATA_DIR
  raise FileNotFoundError(
      f'VTAB task {task.name!r}: TFDS cannot open {task.tfds_name} in the TFDS data dir {root} '
      f'({"; ".join(failures)}). ' + prepare_hint(task, str(root)) + _FOLDER_HINT)


def prepare(builder: Any, task: VtabTask) -> None:
  """Downloads and prepares the dataset (a no-op when already prepared)."""
  try:
    builder.download_and_prepare()
  except AssertionError as error:  # TFDS's error for a missing or empty manual dir.
    raise FileNotFoundError(f'VTAB task {task.name!r}: preparing {task.tfds_name} failed: '
                            f'{error}. {prepare_hint(task, str(builder.data_dir_root))}') from error


def split_dataset(builder: Any, task: VtabTask, split: str) -> Any:
  """tf.data.Dataset of the TFDS split string `split`, in stored order, decoding only the
  features the task's rules read."""
  tfds = _tfds()
  try:
    return builder.as_dataset(
        split=split, shuffle_files=False,
        decoders=tfds.decode.PartialDecoding(dict(task.decode_features)),
        read_config=tfds.ReadConfig(try_autocache=False))
  except AssertionError as error:  # TFDS: "could not find data in <data_dir>".
    raise FileNotFoundError(
        f'VTAB task {task.name!r}: no prepared TFDS data for {builder.info.full_name} split '
        f'{split!r} '
        f'in the TFDS data dir {builder.data_dir_root} (looked in {builder.data_dir}). '
        + prepare_hint(task, str(builder.data_dir_root)) + _FOLDER_HINT) from error


def example_to_pair(example: Mapping[str, Any], task: VtabTask, image_size: int,
                    resize: str) -> tuple[np.ndarray, int]:
  """A decoded TFDS example -> (uint8 (image_size, image_size, 3), label), with the task's
  image rule (grey tiling, dsprites x255) applied before the resize, as in VTAB."""
  label = task.label_rule(example)
  if not 0 <= label < task.num_classes:
    raise ValueError(f'VTAB task {task.name!r}: label {label} outside [0, {task.num_classes}).')
  image = task.image_rule(example[task.image_key])
  return preprocess.resize_square(image, image_size, resize), label


def _count(dataset: Any) -> int:
  count = int(dataset.cardinality())
  if count >= 0:
    return count
  return int(dataset.reduce(np.int64(0), lambda total, _: total + 1))


def load_tfds_task(task: VtabTask, *, data_dir: str | None, train_split: str, eval_split: str,
                   image_size: int, resize: str, mean: tuple[float, float, float],
                   std: tuple[float, float, float], download: bool = False,
                   workers: int | None = None) -> TaskData:
  """TaskData of a VTAB task from TFDS: `train_split` and `eval_split` are VTAB split names
  (train800, val200, train800val200, test)."""
  tfds = _tfds()
  builder = open_builder(task, data_dir)
  if download:
    prepare(builder, task)
  train_ds = split_dataset(builder, task, task.splits[train_split])
  eval_ds = split_dataset(builder, task, task.splits[eval_split])
  convert = functools.partial(example_to_pair, task=task, image_size=image_size, resize=resize)

  count = _count(train_ds)
  if not count:
    raise ValueError(f'VTAB task {task.name!r}: split {train_split} ({task.splits[train_split]}) '
                     f'is empty in {builder.data_dir}.')
  train_images = np.empty((count, image_size, image_size, 3), np.uint8)
  train_labels = np.empty(count, np.int32)
  pairs = parallel.ordered_map(convert, tfds.as_numpy(train_ds), workers)
  for index, (image, label) in enumerate(pairs):  # Filled in place: no second copy.
    train_images[index], train_labels[index] = image, label

  def eval_batches(batch_size: int) -> Iterator[Batch]:
    return padded_batches(parallel.ordered_map(convert, tfds.as_numpy(eval_ds), workers),
                          batch_size)

  return TaskData(name=task.name, num_classes=task.num_classes, train_images=train_images,
                  train_labels=train_labels, eval_batches=eval_batches,
                  num_eval=_count(eval_ds), mean=tuple(mean), std=tuple(std))
