"""Real images that ship inside a package: scikit-learn's handwritten digits (1,797
8x8 greyscale images). Classes 0-4 pre-train the demo backbone; classes 5-9 are the
task it is then adapted to, with a held-out test part.

Splits, after a seeded shuffle of the task's images: 'trainval' is the first
`num_train`, split 80/20 (as VTAB-1k's train800/val200) into 'train' and 'val';
'test' is all the others. Choices such as the demo's settings are made on
train -> val, and the test part is only used to report.
"""

from __future__ import annotations

import numpy as np
from PIL import Image

from mlae_jax.data.task_data import TaskData, array_eval_batches

TASKS = {'digits_0to4': (0, 1, 2, 3, 4), 'digits_5to9': (5, 6, 7, 8, 9)}
TRAIN_SPLITS = ('trainval', 'train')
EVAL_SPLITS = ('test', 'val')


def digits_task(task: str, *, num_train: int, image_size: int = 32, seed: int = 0,
                train_split: str = 'trainval', eval_split: str = 'test') -> TaskData:
  """The digits of `task`'s classes (relabelled 0..4): training on `train_split`,
  evaluation on `eval_split` (see the module docstring)."""
  if task not in TASKS:
    raise ValueError(f'Unknown digits task {task!r}; valid: {", ".join(TASKS)}.')
  if train_split not in TRAIN_SPLITS:
    raise ValueError(f'data.train_split {train_split!r} is not a digits training split; '
                     f'use one of {", ".join(TRAIN_SPLITS)}.')
  if eval_split not in EVAL_SPLITS:
    raise ValueError(f'data.eval_split {eval_split!r} is not a digits evaluation split; '
                     f'use one of {", ".join(EVAL_SPLITS)}.')
  from sklearn.datasets import load_digits  # Bundled with scikit-learn: no download.

  digits = load_digits()
  classes = TASKS[task]
  chosen = np.flatnonzero(np.isin(digits.target, classes))
  if not 0 < num_train < len(chosen):
    raise ValueError(f'num_train must lie in [1, {len(chosen) - 1}] for {task}, got {num_train}.')
  chosen = np.random.default_rng(seed).permutation(chosen)
  images = upscale(digits.images[chosen], image_size)
  labels = np.searchsorted(classes, digits.target[chosen]).astype(np.int32)
  num_val = num_train // 5
  parts = {'trainval': slice(0, num_train), 'train': slice(0, num_train - num_val),
           'val': slice(num_train - num_val, num_train), 'test': slice(num_train, None)}
  if train_split == 'train' and num_val == 0:
    raise ValueError(f'num_train {num_train} leaves no validation part; use at least 5.')
  train, evaluated = parts[train_split], parts[eval_split]
  return TaskData(name=task, num_classes=len(classes), train_images=images[train],
                  train_labels=labels[train],
                  eval_batches=array_eval_batches(images[evaluated], labels[evaluated]),
                  num_eval=len(labels[evaluated]))


def upscale(images: np.ndarray, size: int) -> np.ndarray:
  """(N, 8, 8) values 0..16 -> (N, size, size, 3) uint8, bicubic."""
  pixels = np.clip(images * 16, 0, 255).astype(np.uint8)
  resized = [np.asarray(Image.fromarray(p).resize((size, size), Image.BICUBIC)) for p in pixels]
  return np.repeat(np.stack(resized)[..., None], 3, axis=-1)
