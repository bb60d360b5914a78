"""Resizing, channel rules, normalisation and augmentation against independent computations:
torchvision/PIL for the PyTorch papers' paths, tf.compat.v1 and a hand-worked case for the
VTAB tooling's legacy bilinear, numpy for normalisation."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from PIL import Image

from mlae_jax.data import augment, build, preprocess
from mlae_jax.data.task_data import (IMAGENET_MEAN_STD, INCEPTION_MEAN_STD, TaskData,
                                     array_eval_batches, normalize, random_crop_flip)


def _image(height, width, seed=0, channels=3):
  rng = np.random.default_rng(seed)
  # Smooth structure plus noise, so resampling errors show.
  y, x = np.mgrid[:height, :width]
  base = 127 + 100 * np.sin(x / 5.0)[..., None] * np.cos(y / 7.0)[..., None]
  noise = rng.integers(-25, 26, (height, width, channels))
  return np.clip(base + noise, 0, 255).astype(np.uint8)


# ---------------------------------------------------------------- bicubic (PyTorch papers)

def _keys_cubic(x, a=-0.5):
  x = np.abs(x)
  return np.where(x < 1, (a + 2) * x**3 - (a + 3) * x**2 + 1,
                  np.where(x < 2, a * x**3 - 5 * a * x**2 + 8 * a * x - 4 * a, 0.0))


def _resample_matrix(in_size, out_size):
  """Antialiased Keys-cubic weights (out, in), pixel centres at i + 0.5 (PIL's scheme)."""
  scale = in_size / out_size
  stretch = max(scale, 1.0)
  centres = (np.arange(out_size) + 0.5) * scale
  taps = np.arange(in_size) + 0.5
  weights = _keys_cubic((taps[None, :] - centres[:, None]) / stretch)
  return weights / weights.sum(axis=1, keepdims=True)


def _numpy_bicubic(image, size):
  rows, cols = _resample_matrix(image.shape[0], size), _resample_matrix(image.shape[1], size)
  vertical = np.tensordot(rows, image.astype(np.float64), axes=(1, 0))  # (out, W, C)
  out = np.tensordot(vertical, cols, axes=(1, 1)).transpose(0, 2, 1)  # (out, out, C)
  return np.clip(np.rint(out), 0, 255)


@pytest.mark.parametrize('shape', [(32, 32), (64, 48), (300, 200), (375, 1242)])
def test_bicubic_equals_torchvision_resize_on_pil(shape):
  torchvision = pytest.importorskip('torchvision')
  transforms = torchvision.transforms
  image = _image(*shape)
  resize = transforms.Resize((224, 224), interpolation=transforms.InterpolationMode.BICUBIC)
  expected = np.asarray(resize(Image.fromarray(image)))
  ours = preprocess.resize_square(image, 224, 'bicubic')
  assert ours.dtype == np.uint8 and ours.shape == (224, 224, 3)
  np.testing.assert_array_equal(ours, expected)


@pytest.mark.parametrize('shape, size', [((32, 32), 224), ((300, 200), 224), ((97, 131), 40)])
def test_bicubic_matches_an_independent_keys_cubic(shape, size):
  image = _image(*shape, seed=1)
  ours = preprocess.resize_bicubic(image, size).astype(np.float64)
  reference = _numpy_bicubic(image, size)
  difference = np.abs(ours - reference)
  # PIL works in fixed point with uint8 between its two passes: off by at most a level.
  assert difference.max() <= 1 and difference.mean() < 0.3
  # ... whereas bilinear is clearly a different filter.
  bilinear = np.asarray(Image.fromarray(image).resize((size, size), Image.BILINEAR), np.float64)
  assert np.abs(bilinear - reference).mean() > 5 * difference.mean()


# ------------------------------------------------------- legacy bilinear (VTAB tooling)

def test_legacy_bilinear_hand_worked_case():
  # half_pixel_centers=False: output x samples input x * in/out = 0, 0.5, 1, 1.5 (clamped).
  image = np.zeros((2, 2, 3), np.uint8)
  image[:, 1] = 100
  out = preprocess.resize_bilinear_legacy_float(image, 4)
  np.testing.assert_allclose(out[0, :, 0], [0, 50, 100, 100])
  np.testing.assert_allclose(out[:, 0, 0], [0, 0, 0, 0])
  # The v2 resize (half-pixel centres) would give [0, 25, 75, 100] instead.
  assert not np.allclose(out[0, :, 0], [0, 25, 75, 100])


@pytest.mark.parametrize('shape, size', [((32, 32), 224), ((64, 48), 224), ((360, 480), 224),
                                         ((97, 131), 40), ((5, 3), 7)])
def test_legacy_bilinear_equals_tf_compat_v1(shape, size):
  tf = pytest.importorskip('tensorflow')
  image = _image(*shape, seed=2)
  expected = tf.compat.v1.image.resize_bilinear(
      image[None].astype(np.float32), (size, size), align_corners=False,
      half_pixel_centers=False).numpy()[0]
  ours = preprocess.resize_bilinear_legacy_float(image, size)
  np.testing.assert_allclose(ours, expected, atol=1e-3)
  rounded = preprocess.resize_square(image, size, 'bilinear_legacy')
  assert rounded.dtype == np.uint8
  assert np.abs(rounded - expected).max() <= 0.5 + 1e-3


def test_legacy_bilinear_equals_tf_compat_v1_resize_images_as_vtab_calls_it():
  tf = pytest.importorskip('tensorflow')
  image = _image(50, 70, seed=3)
  expected = tf.compat.v1.image.resize(image, (224, 224)).numpy()  # VTAB's preprocess_fn call.
  ours = preprocess.resize_bilinear_legacy_float(image, 224)
  np.testing.assert_allclose(ours, expected, atol=1e-3)


def test_legacy_bilinear_skips_same_size():
  image = _image(24, 24)
  np.testing.assert_array_equal(preprocess.resize_square(image, 24, 'bilinear_legacy'), image)


def test_unknown_resize_lists_methods():
  with pytest.raises(ValueError, match='bicubic, bilinear_legacy'):
    preprocess.resize_square(_image(8, 8), 4, 'nearest')


# ------------------------------------------------------------------------- channels

def test_grey_images_are_tiled_to_three_channels():
  grey = np.arange(12, dtype=np.uint8).reshape(3, 4, 1)
  rgb = preprocess.to_rgb(grey)
  assert rgb.shape == (3, 4, 3)
  for channel in range(3):
    np.testing.assert_array_equal(rgb[..., channel], grey[..., 0])
  np.testing.assert_array_equal(preprocess.to_rgb(grey[..., 0]), rgb)
  rgba = np.concatenate([rgb, np.full((3, 4, 1), 7, np.uint8)], -1)
  np.testing.assert_array_equal(preprocess.to_rgb(rgba), rgb)
  with pytest.raises(ValueError, match='uint8'):
    preprocess.to_rgb(grey.astype(np.float32))
  with pytest.raises(ValueError, match='image'):
    preprocess.to_rgb(np.zeros((3, 4, 2), np.uint8))


def test_dsprites_images_become_black_and_white():
  binary = np.array([[0, 1], [1, 0]], np.uint8)[..., None]
  out = preprocess.binary_to_uint8(binary)
  np.testing.assert_array_equal(out[..., 0], [[0, 255], [255, 0]])
  with pytest.raises(ValueError, match='0/1'):
    preprocess.binary_to_uint8(binary * 2)


# -------------------------------------------------------------------- normalisation

@pytest.mark.parametrize('name, mean_std', [('inception', INCEPTION_MEAN_STD),
                                            ('imagenet', IMAGENET_MEAN_STD)])
def test_normalization_choice_sets_mean_std_and_device_normalize(name, mean_std):
  config = build.default_data_config()
  config.update(source='synthetic', image_size=8, num_classes=2, num_train=4, num_eval=3,
                normalization=name)
  task = build.build_task_data(config)
  assert task.mean == mean_std[0] and task.std == mean_std[1]
  pixels = task.train_images
  expected = (pixels / 255.0 - np.array(mean_std[0])) / np.array(mean_std[1])
  np.testing.assert_allclose(np.asarray(normalize(jnp.asarray(pixels), task.mean, task.std)),
                             expected, atol=1e-5)


def test_inception_normalization_maps_to_minus_one_one():
  pixels = jnp.array([[0, 0, 0], [255, 255, 255], [51, 102, 204]], jnp.uint8)
  out = np.asarray(normalize(pixels, *INCEPTION_MEAN_STD))
  np.testing.assert_allclose(out, [[-1, -1, -1], [1, 1, 1], [-0.6, -0.2, 0.6]], atol=1e-6)


def test_plain_objects_work_as_configs_and_sizes_are_checked():
  import types
  config = types.SimpleNamespace(source='synthetic', image_size=8, num_classes=3, num_train=5,
                                 num_eval=2, seed=1)  # Other fields take their defaults.
  task = build.build_task_data(config)
  assert task.train_images.shape == (5, 8, 8, 3) and task.num_eval == 2
  assert task.mean == INCEPTION_MEAN_STD[0]
  config.image_size = 0
  with pytest.raises(ValueError, match='positive int'):
    build.build_task_data(config)


def test_unknown_normalization_lists_choices():
  config = build.default_data_config()
  config.update(source='synthetic', normalization='zscore')
  with pytest.raises(ValueError, match='inception, imagenet'):
    build.build_task_data(config)


# ----------------------------------------------------------------------------- FGVC

@pytest.mark.parametrize('shape', [(300, 400), (500, 333), (256, 256), (240, 241)])
def test_fgvc_eval_equals_vpt_transform(shape):
  torchvision = pytest.importorskip('torchvision')
  transforms = torchvision.transforms
  image = _image(*shape, seed=4)
  vpt = transforms.Compose([transforms.Resize(256), transforms.CenterCrop(224)])
  expected = np.asarray(vpt(Image.fromarray(image)))
  np.testing.assert_array_equal(preprocess.fgvc_eval_image(image, 224), expected)


@pytest.mark.parametrize('shape', [(300, 400), (500, 333)])
def test_fgvc_train_canvas_is_the_central_square_of_vpt_resize(shape):
  torchvision = pytest.importorskip('torchvision')
  transforms = torchvision.transforms
  image = _image(*shape, seed=5)
  resized = np.asarray(transforms.Resize(256)(Image.fromarray(image)))
  canvas = preprocess.fgvc_train_image(image, 224)
  assert canvas.shape == (256, 256, 3)
  square = transforms.CenterCrop(256)(Image.fromarray(resized))
  np.testing.assert_array_equal(canvas, np.asarray(square))
  # The device crop then is a 224 window of VPT's resized image, maybe flipped.
  crop = np.asarray(random_crop_flip(jax.random.PRNGKey(0), jnp.asarray(canvas[None]), 224))[0]
  found = [np.array_equal(candidate, resized[top:top + 224, left:left + 224])
           for candidate in (crop, crop[:, ::-1])
           for top in range(resized.shape[0] - 223) for left in range(resized.shape[1] - 223)
           if np.array_equal(candidate[0, :4], resized[top, left:left + 4])]
  assert any(found)


def test_fgvc_resize_sizes_follow_vpt():
  assert [preprocess.fgvc_resize_size(size) for size in (224, 384, 448)] == [256, 438, 512]


def test_center_crop_rounds_like_torchvision():
  image = np.arange(5 * 6).reshape(5, 6, 1).astype(np.uint8)
  # (5 - 2) / 2 = 1.5 rounds to 2 (Python's round, as torchvision); (6 - 2) / 2 = 2.
  np.testing.assert_array_equal(preprocess.center_crop(image, 2), image[2:4, 2:4])
  with pytest.raises(ValueError, match='Cannot centre-crop'):
    preprocess.center_crop(image, 6)


# ---------------------------------------------------------------------- augmentation

def _task(train_crop=None, **extra):
  images = np.zeros((2, 40, 40, 3), np.uint8)
  fields = dict(name='t', num_classes=2, train_images=images, train_labels=np.zeros(2, np.int32),
                eval_batches=array_eval_batches(images, np.zeros(2, np.int32)), num_eval=2,
                train_crop=train_crop)
  return TaskData(**fields, **extra)


def test_train_augmentation_follows_the_task():
  images = jnp.asarray(np.random.default_rng(0).integers(0, 256, (4, 40, 40, 3)), jnp.uint8)
  np.testing.assert_array_equal(augment.train_augmentation(_task())(jax.random.PRNGKey(1), images),
                                images)
  crop_flip = augment.train_augmentation(_task(32))
  assert crop_flip.func is random_crop_flip and crop_flip.keywords == {'size': 32}
  rrc = augment.train_augmentation(_task(32, train_augment='random_resized_crop'))
  assert rrc.func is augment.random_resized_crop_flip and rrc.keywords == {'size': 32}
  with pytest.raises(ValueError, match='crop_flip, random_resized_crop'):
    augment.train_augmentation(_task(32, train_augment='mixup'))


def test_random_resized_crop_shapes_and_constant_images():
  images = jnp.full((8, 24, 32, 3), 77, jnp.uint8)
  crop = jax.jit(augment.random_resized_crop_flip, static_argnums=2)
  out = crop(jax.random.PRNGKey(0), images, 16)
  assert out.shape == (8, 16, 16, 3) and out.dtype == jnp.uint8
  assert np.all(np.asarray(out) == 77)


def test_random_resized_crop_of_the_whole_image_is_a_resize_and_flips_half():
  images = jnp.asarray(np.stack([_image(24, 24, seed=s) for s in range(64)]))
  out = np.asarray(augment.random_resized_crop_flip(jax.random.PRNGKey(3), images, 12,
                                                     scale=(1.0, 1.0), ratio=(1.0, 1.0)))
  resized = np.asarray(jnp.round(jax.image.resize(images.astype(jnp.float32), (64, 12, 12, 3),
                                                  'linear', antialias=True)))
  plain = [np.abs(o.astype(int) - r).max() <= 1 for o, r in zip(out, resized)]
  flipped = [np.abs(o[:, ::-1].astype(int) - r).max() <= 1 for o, r in zip(out, resized)]
  assert all(p or f for p, f in zip(plain, flipped))
  assert 16 < sum(flipped) < 48


def test_random_resized_crop_boxes_follow_torchvision_ranges():
  sample = jax.vmap(lambda k: augment._sample_box(k, 100, 100, (0.08, 1.0), (0.75, 4 / 3)))
  boxes = np.asarray(sample(jax.random.split(jax.random.PRNGKey(0), 1000)))
  tops, lefts, heights, widths = boxes.T
  area = heights * widths / 1e4
  assert area.min() >= 0.07 and area.max() <= 1.0 and area.std() > 0.2
  assert np.all(tops + heights <= 100) and np.all(lefts + widths <= 100) and tops.min() >= 0
  ratio = widths / heights
  assert ratio.min() >= 0.7 and ratio.max() <= 1.4
