"""Host-side image preprocessing: from a decoded image to the uint8 array the model sees.

VTAB: every image is squashed to size x size, either with PIL bicubic (what the PyTorch
papers do: torchvision `Resize((224, 224), BICUBIC)` on PIL images) or with the VTAB
tooling's legacy bilinear (`tf.compat.v1` resize: align_corners=False,
half_pixel_centers=False, no antialiasing). FGVC follows VPT: resize the shorter side
(PIL bilinear, torchvision's default) and centre-crop. Normalisation and the random
crop/flip run later on the device (`task_data.normalize`, `random_crop_flip`).
"""

from __future__ import annotations

import numpy as np
from PIL import Image

RESIZE_METHODS = ('bicubic', 'bilinear_legacy')


def to_rgb(image: np.ndarray) -> np.ndarray:
  """(H, W), (H, W, 1) grey images tiled to 3 channels (VTAB's `tf.tile` for dsprites and
  smallnorb); an alpha channel is dropped. Returns uint8 (H, W, 3)."""
  image = np.asarray(image)
  if image.ndim == 2:
    image = image[:, :, None]
  if image.ndim != 3 or image.shape[-1] not in (1, 3, 4):
    raise ValueError(f'Expected an (H, W), (H, W, 1), (H, W, 3) or (H, W, 4) image, got '
                     f'{image.shape}.')
  if image.dtype != np.uint8:
    raise ValueError(f'Expected uint8 pixels, got {image.dtype}.')
  if image.shape[-1] == 1:
    return np.repeat(image, 3, axis=-1)
  return image[:, :, :3]


def binary_to_uint8(image: np.ndarray) -> np.ndarray:
  """dsprites stores pixels as 0/1; VTAB multiplies by 255 so shapes are white on black."""
  image = np.asarray(image)
  if image.size and image.max() > 1:
    raise ValueError(f'Expected a 0/1 image (dsprites), got values up to {image.max()}.')
  return (image * 255).astype(np.uint8)


def resize_bicubic(image: np.ndarray, size: int) -> np.ndarray:
  """size x size with PIL bicubic, exactly as torchvision `Resize((size, size),
  interpolation=BICUBIC)` does on a PIL image (antialiased when shrinking)."""
  return np.asarray(Image.fromarray(to_rgb(image)).resize((size, size), Image.BICUBIC))


def resize_bilinear_legacy_float(image: np.ndarray, size: int) -> np.ndarray:
  """The VTAB tooling's resize, in float32 on raw 0..255 values: tf.compat.v1 bilinear
  with align_corners=False and half_pixel_centers=False (source = output index * in/out),
  no antialiasing, and the image returned unchanged when it already has the size."""
  image = to_rgb(image)
  height, width = image.shape[:2]
  if (height, width) == (size, size):
    return image.astype(np.float32)
  pixels = image.astype(np.float32)
  top, bottom, y_lerp = _legacy_taps(height, size)
  left, right, x_lerp = _legacy_taps(width, size)
  x_lerp = x_lerp[None, :, None]

  def horizontal(rows: np.ndarray) -> np.ndarray:  # TF's order: along x first, then y.
    left_pixels = rows[:, left]
    return left_pixels + (rows[:, right] - left_pixels) * x_lerp

  upper, lower = horizontal(pixels[top]), horizontal(pixels[bottom])
  return upper + (lower - upper) * y_lerp[:, None, None]


def _legacy_taps(in_size: int, out_size: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
  scale = np.float32(in_size) / np.float32(out_size)
  source = np.arange(out_size, dtype=np.float32) * scale
  low = np.floor(source).astype(np.int64)
  high = np.minimum(low + 1, in_size - 1)
  return low, high, (source - low).astype(np.float32)


def resize_bilinear_legacy(image: np.ndarray, size: int) -> np.ndarray:
  """`resize_bilinear_legacy_float` rounded to uint8 (the tooling keeps floats; storing
  uint8 costs at most half a grey level)."""
  return _round_uint8(resize_bilinear_legacy_float(image, size))


def _round_uint8(pixels: np.ndarray) -> np.ndarray:
  return np.clip(np.rint(pixels), 0, 255).astype(np.uint8)


def resize_square(image: np.ndarray, size: int, method: str = 'bicubic') -> np.ndarray:
  """A VTAB image squashed to uint8 (size, size, 3) with `method` in RESIZE_METHODS."""
  if method == 'bicubic':
    return resize_bicubic(image, size)
  if method == 'bilinear_legacy':
    return resize_bilinear_legacy(image, size)
  raise ValueError(f'Unknown resize method {method!r}; valid: {", ".join(RESIZE_METHODS)}.')


def resize_shorter_side(image: np.ndarray, size: int) -> np.ndarray:
  """Shorter side to `size`, aspect kept, PIL bilinear: torchvision `Resize(size)` on a PIL
  image (the longer side becomes int(size * long / short))."""
  image = to_rgb(image)
  height, width = image.shape[:2]
  if width <= height:
    new_width, new_height = size, int(size * height / width)
  else:
    new_width, new_height = int(size * width / height), size
  if (new_width, new_height) == (width, height):
    return image
  return np.asarray(Image.fromarray(image).resize((new_width, new_height), Image.BILINEAR))


def center_crop(image: np.ndarray, size: int) -> np.ndarray:
  """The central size x size window, offsets rounded as torchvision `CenterCrop`."""
  height, width = image.shape[:2]
  if height < size or width < size:
    raise ValueError(f'Cannot centre-crop {size}x{size} from a {height}x{width} image.')
  top = int(round((height - size) / 2.0))
  left = int(round((width - size) / 2.0))
  return image[top:top + size, left:left + size]


def fgvc_resize_size(image_size: int) -> int:
  """VPT's resize before cropping: 224 -> 256, 384 -> 438, 448 -> 512."""
  return int(image_size / 0.875)


def fgvc_eval_image(image: np.ndarray, image_size: int) -> np.ndarray:
  """VPT evaluation: shorter side to 256, centre crop 224 (for image_size 224)."""
  return center_crop(resize_shorter_side(image, fgvc_resize_size(image_size)), image_size)


def fgvc_train_image(image: np.ndarray, image_size: int) -> np.ndarray:
  """The stored FGVC training canvas: shorter side to 256 and the central 256x256 square.

  `random_crop_flip(size=224)` on the device then takes VPT's random 224 crop and flip.
  TaskData needs one array shape, so along the longer side the crop ranges over the
  central 256 pixels rather than the whole resized image; square images are exact.
  """
  resize = fgvc_resize_size(image_size)
  return center_crop(resize_shorter_side(image, resize), resize)
