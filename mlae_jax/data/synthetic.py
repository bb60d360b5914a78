"""A small learnable image task made on the fly, for tests and smoke runs."""

from __future__ import annotations

import numpy as np

from mlae_jax.data.task_data import TaskData, array_eval_batches


def synthetic_task(num_classes: int = 4, num_train: int = 64, num_eval: int = 40,
                   image_size: int = 32, seed: int = 0) -> TaskData:
  """Noise images tinted by a class colour (a point on a colour circle), so the class
  survives the global mixing of even a random backbone: learnable by a tiny ViT in
  a few steps, and deterministic for a given seed."""
  if not 1 < num_classes <= image_size:
    raise ValueError(f'synthetic task needs 2 <= num_classes <= image_size, got {num_classes}.')
  rng = np.random.default_rng(seed)
  phases = np.arange(num_classes)[:, None] / num_classes + np.arange(3)[None, :] / 3
  tints = np.round(60 + 60 * np.cos(2 * np.pi * phases)).astype(np.int64)

  def make(count: int) -> tuple[np.ndarray, np.ndarray]:
    labels = rng.integers(0, num_classes, count).astype(np.int32)
    noise = rng.integers(0, 128, (count, image_size, image_size, 3))
    return (noise + tints[labels][:, None, None, :]).astype(np.uint8), labels


  train_images, train_labels = make(num_train)
  eval_images, eval_labels = make(num_eval)
  return TaskData(name='synthetic', num_classes=num_classes, train_images=train_images,
                  train_labels=train_labels,
                  eval_batches=array_eval_batches(eval_images, eval_labels), num_eval=num_eval)
