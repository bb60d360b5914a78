"""A task ready for training: the training split in memory, the evaluation split as a
stream of padded batches, and the on-device preprocessing both share.

Images stay uint8 on the host (1000 VTAB images at 224 are 150 MB) and are
normalised, and for FGVC cropped and flipped, inside the jitted step on the device.
"""

from __future__ import annotations

import dataclasses
from typing import Callable, Iterable, Iterator

import jax
import jax.numpy as jnp
import numpy as np

INCEPTION_MEAN_STD = ((0.5, 0.5, 0.5), (0.5, 0.5, 0.5))  # pixels to [-1, 1]: the paper's default
IMAGENET_MEAN_STD = ((0.485, 0.456, 0.406), (0.229, 0.224, 0.225))


@dataclasses.dataclass(frozen=True)
class Batch:
  """A padded evaluation batch; `mask` is False on padding rows."""
  images: np.ndarray  # uint8 (B, H, W, 3)
  labels: np.ndarray  # int32 (B,)
  mask: np.ndarray    # bool (B,)


@dataclasses.dataclass(frozen=True)
class TaskData:
  """Everything training needs from a data source.

  Attributes:
    name: task name, for logs.
    num_classes: size of the label space; labels lie in [0, num_classes).
    train_images: uint8 (N, H, W, 3), decoded once. For FGVC, H = W = the size
      before the random crop (e.g. 256).
    train_labels: int32 (N,).
    eval_batches: batch_size -> iterator of padded Batches that cover every
      evaluation example exactly once, in a fixed order.
    num_eval: number of evaluation examples (padding excluded).
    mean, std: per-channel normalisation of pixels / 255.
    train_crop: if set, training takes a random crop of this size (on the device),
      as `train_augment` says; None uses the stored images as they are.
    train_augment: how the crop is taken: 'crop_flip' (random crop + horizontal
      flip, VPT) or 'random_resized_crop' (+ flip, the MLAE paper); see
      `mlae_jax.data.augment`.
  """
  name: str
  num_classes: int
  train_images: np.ndarray
  train_labels: np.ndarray
  eval_batches: Callable[[int], Iterator[Batch]]
  num_eval: int
  mean: tuple[float, float, float] = INCEPTION_MEAN_STD[0]
  std: tuple[float, float, float] = INCEPTION_MEAN_STD[1]
  train_crop: int | None = None
  train_augment: str = 'crop_flip'


def padded_batches(examples: Iterable[tuple[np.ndarray, int]], batch_size: int) -> Iterator[Batch]:
  """Groups (image, label) pairs into batches of exactly `batch_size`; the last one is
  padded with zero images and masked, so no example is dropped or counted twice."""
  images, labels = [], []
  for image, label in examples:
    images.append(image)
    labels.append(label)
    if len(images) == batch_size:
      yield _batch(images, labels, batch_size)
      images, labels = [], []
  if images:
    yield _batch(images, labels, batch_size)


def _batch(images: list[np.ndarray], labels: list[int], batch_size: int) -> Batch:
  count = len(images)
  stacked = np.zeros((batch_size,) + images[0].shape, np.uint8)
  stacked[:count] = np.stack(images)
  padded_labels = np.zeros(batch_size, np.int32)
  padded_labels[:count] = labels
  return Batch(stacked, padded_labels, np.arange(batch_size) < count)


def array_eval_batches(images: np.ndarray, labels: np.ndarray) -> Callable[[int], Iterator[Batch]]:
  """`eval_batches` over arrays held in memory."""
  def batches(batch_size: int) -> Iterator[Batch]:
    return padded_batches(zip(images, labels), batch_size)
  return batches


def normalize(images: jax.Array, mean, std) -> jax.Array:
  """uint8 pixels -> float32 (pixels / 255 - mean) / std."""
  mean, std = jnp.asarray(mean, jnp.float32), jnp.asarray(std, jnp.float32)
  return (images.astype(jnp.float32) / 255.0 - mean) / std


def random_crop_flip(key: jax.Array, images: jax.Array, size: int) -> jax.Array:
  """A random `size` crop and a random horizontal flip of each image (on the device)."""
  batch, height, width = images.shape[:3]
  crop_key, flip_key = jax.random.split(key)
  tops = jax.random.randint(crop_key, (batch,), 0, height - size + 1)
  lefts = jax.random.randint(jax.random.fold_in(crop_key, 1), (batch,), 0, width - size + 1)
  flips = jax.random.bernoulli(flip_key, 0.5, (batch,))

  def one(image, top, left, flip):
    crop = jax.lax.dynamic_slice(image, (top, left, 0), (size, size, image.shape[-1]))
    return jnp.where(flip, crop[:, ::-1], crop)

  return jax.vmap(one)(images, tops, lefts, flips)
