"""VTAB-1k from the image folders the PyTorch papers share (NOAH's `get_vtab1k.py`, used by
SPT, RepAdapter and GLoRA):

  <root>/<name>/{train800,val200,train800val200,test}.txt   lines "images/train800/000000.jpg 37"
  <root>/<name>/images/<split>/<index>.jpg

The images were written by the original VTAB classes at native size (labels derived,
grey images tiled, dsprites x255), so only the resize is left to do here.
"""

from __future__ import annotations

import functools
import os

import numpy as np

from mlae_jax.data import image_files, parallel, preprocess
from mlae_jax.data.task_data import TaskData
from mlae_jax.data.vtab import VtabTask


def task_folder(task: VtabTask, root: str) -> str:
  """The folder holding the task's split lists: root/<name> for the first of the task's
  folder names that exists, or root itself if it holds the lists."""
  if not os.path.isdir(root):
    raise FileNotFoundError(f'vtab-1k folder root {root} does not exist.')
  for name in task.folder_names:
    folder = os.path.join(root, name)
    if os.path.isdir(folder):
      return folder
  if os.path.isfile(os.path.join(root, 'train800val200.txt')):
    return root
  tried = ', '.join(os.path.join(root, name) for name in task.folder_names)
  raise FileNotFoundError(
      f'VTAB task {task.name!r}: no vtab-1k folder found; looked for {tried}. Expected '
      f'<folder>/{{train800,val200,train800val200,test}}.txt with "path label" lines.')


def read_list(folder: str, split: str, num_classes: int) -> tuple[list[str], np.ndarray]:
  """(absolute image paths, int32 labels) of `<folder>/<split>.txt`."""
  list_path = os.path.join(folder, f'{split}.txt')
  if not os.path.isfile(list_path):
    raise FileNotFoundError(f'Split list {list_path} does not exist.')
  paths, labels = [], []
  with open(list_path) as lines:
    for number, line in enumerate(lines, 1):
      if not line.strip():
        continue
      fields = line.rsplit(maxsplit=1)
      try:
        label = int(fields[1])
      except (IndexError, ValueError):
        raise ValueError(f'{list_path} line {number}: expected "<path> <label>", got '
                         f'{line.strip()!r}.') from None
      if not 0 <= label < num_classes:
        raise ValueError(f'{list_path} line {number}: label {label} outside [0, {num_classes}).')
      paths.append(os.path.join(folder, fields[0]))
      labels.append(label)
  if not paths:
    raise ValueError(f'Split list {list_path} lists no images.')
  image_files.check_exist(paths, list_path)
  return paths, np.asarray(labels, np.int32)


def _load(path: str, image_size: int, resize: str) -> np.ndarray:
  return preprocess.resize_square(image_files.read_rgb(path), image_size, resize)


def load_folder_task(task: VtabTask, *, root: str, train_split: str, eval_split: str,
                     image_size: int, resize: str, mean: tuple[float, float, float],
                     std: tuple[float, float, float], workers: int | None = None) -> TaskData:
  """TaskData of a VTAB task from the vtab-1k folders under `root`."""
  folder = task_folder(task, root)
  train_paths, train_labels = read_list(folder, train_split, task.num_classes)
  eval_paths, eval_labels = read_list(folder, eval_split, task.num_classes)
  load = functools.partial(_load, image_size=image_size, resize=resize)
  train_images = parallel.map_into_array(load, train_paths, len(train_paths),
                                         (image_size, image_size, 3), workers,
                                         desc=f'decoding {train_split}.txt')
  # Evaluation streams its images later: decode each once now, so none fails mid-run.
  image_files.check_decodable(eval_paths, f'{eval_split}.txt', workers)

  return TaskData(name=task.name, num_classes=task.num_classes, train_images=train_images,
                  train_labels=train_labels,
                  eval_batches=image_files.streamed_eval_batches(load, eval_paths, eval_labels,
                                                                 workers),
                  num_eval=len(eval_paths), mean=tuple(mean), std=tuple(std))
