"""A small learnable image task made on the fly, for tests and smoke runs."""

from __future__ import annotations

import numpy as np

from mlae_jax.data.task_data import TaskData, array_eval_batches


def synthetic_task(num_classes: int = 4, num_train: int = 64, num_eval: int = 40,
                   image_size: int = 32, seed: int = 0) -> TaskData:
  """Noise images in which class c brightens horizontal band c: learnable by a tiny
  ViT in a few steps, and deterministic for a given seed."""
  if not 1 < num_classes <= image_size:
    raise ValueError(f'synthetic task needs 2 <= num_classes <= image_size, got {num_classes}.')
  rng = np.random.default_rng(seed)

  def make(count: int) -> tuple[np.ndarray, np.ndarray]:
    labels = rng.integers(0, num_classes, count).astype(np.int32)
    images = rng.integers(0, 128, (count, image_size, image_size, 3)).astype(np.uint8)
    band = image_size // num_classes
    for index, label in enumerate(labels):
      images[index, label * band:(label + 1) * band] += 120
    return images, labels

  train_images, train_labels = make(num_train)
  eval_images, eval_labels = make(num_eval)
  return TaskData(name='synthetic', num_classes=num_classes, train_images=train_images,
                  train_labels=train_labels,
                  eval_batches=array_eval_batches(eval_images, eval_labels), num_eval=num_eval)
