"""FGVC (CUB-200-2011, NABirds, Oxford Flowers, Stanford Dogs, Stanford Cars) from VPT's
json split files (`fgvc_split.zip`): `<dataset folder>/{train,val,test}.json`, each
`{image path: class id}`, image paths relative to the dataset's image folder.

Class ids are made contiguous by sorting the training split's ids, as VPT's
`JSONDataset` does per split file (identical when every split holds every class). VPT's
protocol: train on train, select on val, report test; there is no trainval.
"""

from __future__ import annotations

import dataclasses
import functools
import json
import os

import numpy as np

from mlae_jax.data import image_files, parallel, preprocess
from mlae_jax.data.task_data import TaskData

SPLITS = ('train', 'val', 'test')


@dataclasses.dataclass(frozen=True)
class FgvcTask:
  """One FGVC dataset as VPT lays it out.

  Attributes:
    name: the task name used in configs.
    vpt_name: VPT's DATA.NAME, accepted as an alias.
    folder: the dataset folder (VPT's DATA.DATAPATH) under the data dir.
    image_dir: the folder the json paths are relative to, inside `folder` ('' = itself).
    num_classes: VPT's NUMBER_CLASSES.
  """
  name: str
  vpt_name: str
  folder: str
  image_dir: str
  num_classes: int


TASKS: dict[str, FgvcTask] = {task.name: task for task in [
    FgvcTask('cub', 'CUB', 'CUB_200_2011', 'images', 200),
    FgvcTask('nabirds', 'nabirds', 'nabirds', 'images', 555),
    FgvcTask('oxford_flowers', 'OxfordFlowers', 'OxfordFlower', '', 102),
    FgvcTask('stanford_dogs', 'StanfordDogs', 'Stanford-dogs', 'Images', 120),
    FgvcTask('stanford_cars', 'StanfordCars', 'Stanford-cars', '', 196),
]}
TASK_NAMES = tuple(TASKS)
_ALIASES = {task.vpt_name: task.name for task in TASKS.values()}


def get_task(name: str) -> FgvcTask:
  """The FGVC task `name` (or VPT's DATA.NAME for it); an unknown name lists the valid ones."""
  task = TASKS.get(_ALIASES.get(name, name))
  if task is None:
    raise ValueError(f'Unknown FGVC task {name!r}; valid: {", ".join(TASK_NAMES)} '
                     f'(or VPT\'s {", ".join(_ALIASES)}).')
  return task


def dataset_folder(task: FgvcTask, data_dir: str) -> str:
  """`data_dir/<VPT folder>`, or `data_dir` itself when it holds the json files."""
  folder = os.path.join(data_dir, task.folder)
  if os.path.isfile(os.path.join(folder, 'train.json')):
    return folder
  if os.path.isfile(os.path.join(data_dir, 'train.json')):
    return data_dir
  raise FileNotFoundError(
      f'FGVC task {task.name!r}: no VPT split files found in {folder} or {data_dir}. Put the '
      f'dataset in {folder} (images under {os.path.join(folder, task.image_dir)}) and copy '
      f'train.json, val.json and test.json from VPT\'s fgvc_split.zip (cornell.box.com/v/'
      f'vptfgvcsplits) into {folder}.')


def check_split(folder: str, split: str) -> str:
  """`split` if it is train/val/test or another `<split>.json` in `folder` (VPT's
  train-size ablation files), else an error listing the valid ones."""
  if split in SPLITS or os.path.isfile(os.path.join(folder, f'{split}.json')):
    return split
  extra = sorted(name[:-5] for name in os.listdir(folder)
                 if name.endswith('.json') and name[:-5] not in SPLITS)
  raise ValueError(f'Unknown FGVC split {split!r}; valid: {", ".join(SPLITS + tuple(extra))} '
                   f'(FGVC has no train800val200: train on "train", report "test").')


def read_split(task: FgvcTask, folder: str, split: str) -> tuple[list[str], list[int]]:
  """(absolute image paths, raw class ids) of `<folder>/<split>.json`, in file order."""
  json_path = os.path.join(folder, f'{split}.json')
  if not os.path.isfile(json_path):
    raise FileNotFoundError(f'FGVC split file {json_path} does not exist.')
  with open(json_path) as file:
    try:
      annotations = json.load(file)
    except json.JSONDecodeError as error:
      raise ValueError(f'FGVC split file {json_path} is not valid json: {error}') from error
  if not isinstance(annotations, dict) or not annotations:
    raise ValueError(f'FGVC split file {json_path} must be a non-empty {{image path: class id}} '
                     'object.')
  image_root = os.path.join(folder, task.image_dir)
  paths, class_ids = [], []
  for path, class_id in annotations.items():
    try:
      class_ids.append(int(class_id))
    except (TypeError, ValueError):
      raise ValueError(f'{json_path}: class id {class_id!r} of {path} is not an integer.') from None
    paths.append(os.path.join(image_root, path))
  image_files.check_exist(paths, json_path)
  return paths, class_ids


def contiguous_labels(train_ids: list[int], eval_ids: list[int], num_classes: int,
                      where: str) -> tuple[np.ndarray, np.ndarray]:
  """Raw class ids -> 0..C-1 by sorted training ids; eval ids must occur in training."""
  mapping = {class_id: index for index, class_id in enumerate(sorted(set(train_ids)))}
  if len(mapping) > num_classes:
    raise ValueError(f'{where}: {len(mapping)} classes in the training split, expected at most '
                     f'{num_classes}.')
  unknown = sorted(set(eval_ids) - set(mapping))
  if unknown:
    raise ValueError(f'{where}: evaluation class ids {unknown[:10]} do not occur in the training '
                     'split.')
  return (np.asarray([mapping[i] for i in train_ids], np.int32),
          np.asarray([mapping[i] for i in eval_ids], np.int32))


def _load(path: str, transform) -> np.ndarray:
  return transform(image_files.read_rgb(path))


def load_fgvc_task(task: FgvcTask, *, data_dir: str, train_split: str, eval_split: str,
                   image_size: int, mean: tuple[float, float, float],
                   std: tuple[float, float, float], workers: int | None = None) -> TaskData:
  """TaskData of an FGVC dataset with VPT's transforms.

  Training images are stored as the central square of the image resized to shorter side
  256 (for image_size 224) and cropped/flipped on the device (`train_crop`); evaluation
  images are resized to 256 and centre-cropped to 224 here.
  """
  folder = dataset_folder(task, data_dir)
  train_paths, train_ids = read_split(task, folder, check_split(folder, train_split))
  eval_paths, eval_ids = read_split(task, folder, check_split(folder, eval_split))
  train_labels, eval_labels = contiguous_labels(
      train_ids, eval_ids, task.num_classes, f'FGVC task {task.name!r} in {folder}')
  load_train = functools.partial(
      _load, transform=functools.partial(preprocess.fgvc_train_image, image_size=image_size))
  load_eval = functools.partial(
      _load, transform=functools.partial(preprocess.fgvc_eval_image, image_size=image_size))
  canvas = preprocess.fgvc_resize_size(image_size)
  train_images = parallel.map_into_array(load_train, train_paths, len(train_paths),
                                         (canvas, canvas, 3), workers,
                                         desc=f'decoding {train_split}.json')
  # Evaluation streams its images later: decode each once now, so none fails mid-run.
  image_files.check_decodable(eval_paths, f'{eval_split}.json', workers)

  return TaskData(name=task.name, num_classes=task.num_classes, train_images=train_images,
                  train_labels=train_labels,
                  eval_batches=image_files.streamed_eval_batches(load_eval, eval_paths,
                                                                 eval_labels, workers),
                  num_eval=len(eval_paths), mean=tuple(mean), std=tuple(std),
                  train_crop=image_size)
