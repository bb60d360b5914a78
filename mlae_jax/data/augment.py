"""Training augmentation on the device, chosen by the task.

VTAB: none. FGVC: VPT's random crop + horizontal flip (`task_data.random_crop_flip`) by
default, or the MLAE paper's random-resized-crop + flip (torchvision's
`RandomResizedCrop(224)` sampling: area 8%-100%, aspect 3/4-4/3 log-uniform, 10 tries
then a centre crop), both from the stored training canvas.
"""

from __future__ import annotations

import functools
import math
from typing import Callable

import jax
import jax.numpy as jnp

from mlae_jax.data.task_data import TaskData, random_crop_flip

AUGMENTATIONS = ('crop_flip', 'random_resized_crop')
Augment = Callable[[jax.Array, jax.Array], jax.Array]


def train_augmentation(task: TaskData) -> Augment:
  """(key, uint8 images) -> uint8 training inputs for `task`: identity without a
  `train_crop`, else the task's crop (random crop + flip unless it asks for
  random_resized_crop)."""
  if task.train_crop is None:
    return lambda key, images: images
  kind = task.train_augment
  if kind == 'crop_flip':
    return functools.partial(random_crop_flip, size=task.train_crop)
  if kind == 'random_resized_crop':
    return functools.partial(random_resized_crop_flip, size=task.train_crop)
  raise ValueError(f'Unknown augmentation {kind!r}; valid: {", ".join(AUGMENTATIONS)}.')


def _sample_box(key: jax.Array, height: int, width: int, scale: tuple[float, float],
                ratio: tuple[float, float], attempts: int = 10) -> jax.Array:
  """(top, left, h, w) as torchvision RandomResizedCrop.get_params draws them: the first of
  `attempts` draws that fits, else the whole image clamped to the ratio range, centred."""
  area_key, ratio_key, top_key, left_key = jax.random.split(key, 4)
  area = height * width * jax.random.uniform(area_key, (attempts,), minval=scale[0],
                                             maxval=scale[1])
  aspect = jnp.exp(jax.random.uniform(ratio_key, (attempts,), minval=math.log(ratio[0]),
                                      maxval=math.log(ratio[1])))
  crop_w = jnp.round(jnp.sqrt(area * aspect)).astype(jnp.int32)
  crop_h = jnp.round(jnp.sqrt(area / aspect)).astype(jnp.int32)
  fits = (crop_w > 0) & (crop_h > 0) & (crop_w <= width) & (crop_h <= height)
  tops = jnp.floor(jax.random.uniform(top_key, (attempts,)) * (height - crop_h + 1))
  lefts = jnp.floor(jax.random.uniform(left_key, (attempts,)) * (width - crop_w + 1))
  first = jnp.argmax(fits)

  in_ratio = width / height
  if in_ratio < ratio[0]:
    fallback_w, fallback_h = width, round(width / ratio[0])
  elif in_ratio > ratio[1]:
    fallback_w, fallback_h = round(height * ratio[1]), height
  else:
    fallback_w, fallback_h = width, height
  fallback = jnp.array([(height - fallback_h) // 2, (width - fallback_w) // 2, fallback_h,
                        fallback_w], jnp.float32)
  drawn = jnp.stack([tops[first], lefts[first], crop_h[first], crop_w[first]]).astype(jnp.float32)
  return jnp.where(jnp.any(fits), drawn, fallback)


def random_resized_crop_flip(key: jax.Array, images: jax.Array, size: int,
                             scale: tuple[float, float] = (0.08, 1.0),
                             ratio: tuple[float, float] = (3 / 4, 4 / 3)) -> jax.Array:
  """A random resized crop to size x size (bilinear, antialiased when shrinking, as PIL)
  and a random horizontal flip of each uint8 image; returns uint8."""
  batch, height, width, channels = images.shape
  box_key, flip_key = jax.random.split(key)
  boxes = jax.vmap(lambda k: _sample_box(k, height, width, scale, ratio))(
      jax.random.split(box_key, batch))
  flips = jax.random.bernoulli(flip_key, 0.5, (batch,))

  def one(image, box, flip):
    top, left, crop_h, crop_w = box[0], box[1], box[2], box[3]
    scales = jnp.stack([size / crop_h, size / crop_w])
    out = jax.image.scale_and_translate(
        image.astype(jnp.float32), (size, size, channels), (0, 1), scales,
        jnp.stack([-top * scales[0], -left * scales[1]]), method='linear', antialias=True)
    out = jnp.where(flip, out[:, ::-1], out)
    return jnp.clip(jnp.round(out), 0, 255).astype(jnp.uint8)

  return jax.vmap(one)(images, boxes, flips)
