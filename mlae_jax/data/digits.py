"""Real images that ship inside a package: scikit-learn's handwritten digits (1,797
8x8 greyscale images). Classes 0-4 pre-train the demo backbone; classes 5-9 are the
task it is then adapted to, with a held-out test part.
"""

from __future__ import annotations

import numpy as np
from PIL import Image

from mlae_jax.data.task_data import TaskData, array_eval_batches

TASKS = {'digits_0to4': (0, 1, 2, 3, 4), 'digits_5to9': (5, 6, 7, 8, 9)}


def digits_task(task: str, *, num_train: int, image_size: int = 32, seed: int = 0) -> TaskData:
  """The digits of `task`'s classes (relabelled 0..4), split by a seeded shuffle into
  `num_train` training images and a test part holding all the others."""
  if task not in TASKS:
    raise ValueError(f'Unknown digits task {task!r}; valid: {", ".join(TASKS)}.')
  from sklearn.datasets import load_digits  # Bundled with scikit-learn: no download.

  digits = load_digits()
  classes = TASKS[task]
  chosen = np.flatnonzero(np.isin(digits.target, classes))
  if not 0 < num_train < len(chosen):
    raise ValueError(f'num_train must lie in [1, {len(chosen) - 1}] for {task}, got {num_train}.')
  chosen = np.random.default_rng(seed).permutation(chosen)
  images = upscale(digits.images[chosen], image_size)
  labels = np.searchsorted(classes, digits.target[chosen]).astype(np.int32)
  return TaskData(name=task, num_classes=len(classes), train_images=images[:num_train],
                  train_labels=labels[:num_train],
                  eval_batches=array_eval_batches(images[num_train:], labels[num_train:]),
                  num_eval=len(chosen) - num_train)


def upscale(images: np.ndarray, size: int) -> np.ndarray:
  """(N, 8, 8) values 0..16 -> (N, size, size, 3) uint8, bicubic."""
  pixels = np.clip(images * 16, 0, 255).astype(np.uint8)
  resized = [np.asarray(Image.fromarray(p).resize((size, size), Image.BICUBIC)) for p in pixels]
  return np.repeat(np.stack(resized)[..., None], 3, axis=-1)
