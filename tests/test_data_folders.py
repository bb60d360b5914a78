"""The vtab-1k image-folder source and FGVC from VPT's json splits, on small trees written
by the tests; broken entries must give errors that name the file."""

import json
import os

import numpy as np
import pytest
from PIL import Image

from mlae_jax.data import augment, build, fgvc, preprocess


def _write_image(path, height, width, seed, mode='RGB'):
  os.makedirs(os.path.dirname(path), exist_ok=True)
  rng = np.random.default_rng(seed)
  channels = 3 if mode == 'RGB' else 1
  pixels = rng.integers(0, 256, (height, width, channels), dtype=np.uint8)
  Image.fromarray(pixels if channels == 3 else pixels[..., 0], mode).save(path)  # PNG: lossless.
  return pixels


def _vtab_tree(root, folder='cifar', counts=None, num_classes=100):
  """vtab-1k/<folder>/{split}.txt + images/<split>/<i>.png; returns {split: (images, labels)}."""
  counts = counts or {'train800': 6, 'val200': 3, 'train800val200': 9, 'test': 7}
  written = {}
  for split_index, (split, count) in enumerate(counts.items()):
    lines, images, labels = [], [], []
    for i in range(count):
      relative = f'images/{split}/{i:06d}.png'
      mode = 'L' if i == 1 else 'RGB'  # A grey image among them, as in dsprites/smallnorb.
      images.append(_write_image(os.path.join(root, folder, relative), 20 + i, 30 - i,
                                 100 * split_index + i, mode))
      labels.append((7 * i + split_index) % num_classes)
      lines.append(f'{relative} {labels[-1]}')
    with open(os.path.join(root, folder, f'{split}.txt'), 'w') as file:
      file.write('\n'.join(lines) + '\n')
    written[split] = images, labels
  return written


def _folder_config(root, task='cifar100', **overrides):
  config = build.default_data_config()
  config.update({'source': 'folder', 'task': task, 'data_dir': str(root), 'image_size': 16,
                 **overrides})
  return config


# ------------------------------------------------------------------------ vtab-1k

@pytest.mark.parametrize('resize', ['bicubic', 'bilinear_legacy'])
def test_folder_source_loads_images_and_labels(tmp_path, resize):
  written = _vtab_tree(tmp_path)
  data = build.build_task_data(_folder_config(tmp_path, resize=resize))
  train_images, train_labels = written['train800val200']
  assert data.name == 'cifar100' and data.num_classes == 100
  assert data.train_images.shape == (9, 16, 16, 3) and data.train_images.dtype == np.uint8
  assert data.train_labels.dtype == np.int32
  np.testing.assert_array_equal(data.train_labels, train_labels)
  for stored, original in zip(data.train_images, train_images):
    np.testing.assert_array_equal(stored, preprocess.resize_square(original, 16, resize))
  assert data.train_crop is None and data.num_eval == 7


def test_folder_evaluation_counts_every_example_once(tmp_path):
  written = _vtab_tree(tmp_path)
  data = build.build_task_data(_folder_config(tmp_path))
  batches = list(data.eval_batches(3))
  assert [int(batch.mask.sum()) for batch in batches] == [3, 3, 1]
  labels = np.concatenate([batch.labels[batch.mask] for batch in batches])
  np.testing.assert_array_equal(labels, written['test'][1])
  images = np.concatenate([batch.images[batch.mask] for batch in batches])
  expected = [preprocess.resize_square(image, 16) for image in written['test'][0]]
  np.testing.assert_array_equal(images, np.stack(expected))


def test_folder_splits_and_noah_folder_names(tmp_path):
  _vtab_tree(tmp_path, folder='oxford_pet', num_classes=37)  # NOAH's name for the pets folder.
  data = build.build_task_data(_folder_config(tmp_path, task='oxford_iiit_pet',
                                              train_split='train800', eval_split='val200'))
  assert data.train_images.shape[0] == 6 and data.num_eval == 3 and data.num_classes == 37
  # data_dir may also point straight at the task folder.
  direct = build.build_task_data(_folder_config(tmp_path / 'oxford_pet', task='oxford_iiit_pet'))
  assert direct.train_images.shape[0] == 9


def test_missing_image_names_the_file(tmp_path):
  _vtab_tree(tmp_path)
  missing = tmp_path / 'cifar' / 'images' / 'test' / '000004.png'
  missing.unlink()
  with pytest.raises(FileNotFoundError, match='000004.png') as error:
    build.build_task_data(_folder_config(tmp_path))
  assert 'test.txt' in str(error.value) and '1 of the 7' in str(error.value)


def test_corrupt_image_names_the_file(tmp_path):
  _vtab_tree(tmp_path)
  (tmp_path / 'cifar' / 'images' / 'train800val200' / '000002.png').write_bytes(b'not a png')
  with pytest.raises(ValueError, match='000002.png cannot be decoded'):
    build.build_task_data(_folder_config(tmp_path))


def test_corrupt_eval_image_fails_before_training(tmp_path):
  _vtab_tree(tmp_path)
  image = tmp_path / 'cifar' / 'images' / 'test' / '000005.png'
  intact = image.read_bytes()
  image.write_bytes(b'\x89PNG garbage')
  with pytest.raises(ValueError, match='000005.png cannot be decoded'):
    build.build_task_data(_folder_config(tmp_path))  # Every eval image is decoded up front.
  image.write_bytes(intact)
  data = build.build_task_data(_folder_config(tmp_path))
  image.write_bytes(b'\x89PNG garbage')  # Damaged after loading: named when streamed.
  with pytest.raises(ValueError, match='000005.png cannot be decoded'):
    list(data.eval_batches(4))


@pytest.mark.parametrize('line, message', [
    ('images/test/000000.png', 'line 2: expected'),
    ('images/test/000000.png seven', 'line 2: expected'),
    ('images/test/000000.png 100', r'line 2: label 100 outside')])
def test_bad_list_lines_name_the_line(tmp_path, line, message):
  _vtab_tree(tmp_path)
  with open(tmp_path / 'cifar' / 'test.txt') as file:
    lines = file.read().splitlines()
  lines[1] = line
  (tmp_path / 'cifar' / 'test.txt').write_text('\n'.join(lines))
  with pytest.raises(ValueError, match=message):
    build.build_task_data(_folder_config(tmp_path))


def test_missing_folder_or_list_says_where_it_looked(tmp_path):
  with pytest.raises(FileNotFoundError, match=r'looked for .*/cifar, .*/cifar100'):
    build.build_task_data(_folder_config(tmp_path))
  _vtab_tree(tmp_path, counts={'train800val200': 2})
  with pytest.raises(FileNotFoundError, match=r'test.txt does not exist'):
    build.build_task_data(_folder_config(tmp_path))
  with pytest.raises(ValueError, match='data_dir'):
    build.build_task_data(_folder_config(tmp_path, data_dir=None))


# --------------------------------------------------------------------------- FGVC

def _fgvc_tree(root, folder='CUB_200_2011', image_dir='images', class_ids=(12, 3, 7),
               counts=None):
  """VPT layout: <folder>/{train,val,test}.json {relative path: class id}, images under
  <folder>/<image_dir>/<class>/<n>.png. Returns {split: [(pixels, class id)]}."""
  counts = counts or {'train': 5, 'val': 3, 'test': 4}
  written = {}
  for split_index, (split, count) in enumerate(counts.items()):
    annotations, examples = {}, []
    for i in range(count):
      class_id = class_ids[i % len(class_ids)]
      relative = f'{class_id:03d}.class/{split}_{i}.png'
      pixels = _write_image(os.path.join(root, folder, image_dir, relative), 40 + 3 * i,
                            52 - 5 * i, 50 * split_index + i)
      annotations[relative] = class_id
      examples.append((pixels, class_id))
    with open(os.path.join(root, folder, f'{split}.json'), 'w') as file:
      json.dump(annotations, file)
    written[split] = examples
  return written


def _fgvc_config(root, task='cub', **overrides):
  config = build.default_data_config()
  config.update({'source': 'fgvc', 'task': task, 'data_dir': str(root), 'image_size': 32,
                 'train_split': 'train', 'eval_split': 'test', **overrides})
  return config


def test_fgvc_loads_vpt_json_splits(tmp_path):
  written = _fgvc_tree(tmp_path)
  data = build.build_task_data(_fgvc_config(tmp_path))
  assert data.name == 'cub' and data.num_classes == 200 and data.train_crop == 32
  assert data.train_images.shape == (5, 36, 36, 3)  # 32 / 0.875 = 36, cropped on the device.
  # Class ids 12, 3, 7 (in file order) -> 2, 0, 1: contiguous by sorted id.
  np.testing.assert_array_equal(data.train_labels, [2, 0, 1, 2, 0])
  for stored, (pixels, _) in zip(data.train_images, written['train']):
    np.testing.assert_array_equal(stored, preprocess.fgvc_train_image(pixels, 32))
  batches = list(data.eval_batches(3))
  assert data.num_eval == 4 and [int(b.mask.sum()) for b in batches] == [3, 1]
  assert batches[0].images.shape == (3, 32, 32, 3)
  images = np.concatenate([b.images[b.mask] for b in batches])
  for image, (pixels, _) in zip(images, written['test']):
    np.testing.assert_array_equal(image, preprocess.fgvc_eval_image(pixels, 32))
  np.testing.assert_array_equal(np.concatenate([b.labels[b.mask] for b in batches]), [2, 0, 1, 2])


@pytest.mark.parametrize('name, folder, image_dir', [
    ('CUB', 'CUB_200_2011', 'images'), ('nabirds', 'nabirds', 'images'),
    ('OxfordFlowers', 'OxfordFlower', ''), ('stanford_dogs', 'Stanford-dogs', 'Images'),
    ('StanfordCars', 'Stanford-cars', '')])
def test_fgvc_vpt_folders_and_names(tmp_path, name, folder, image_dir):
  _fgvc_tree(tmp_path, folder=folder, image_dir=image_dir, counts={'train': 2, 'val': 2})
  data = build.build_task_data(_fgvc_config(tmp_path, task=name, eval_split='val'))
  assert data.num_classes == {'cub': 200, 'nabirds': 555, 'oxford_flowers': 102,
                              'stanford_dogs': 120, 'stanford_cars': 196}[data.name]
  assert data.num_eval == 2


def test_fgvc_at_224_uses_vpt_sizes(tmp_path):
  _fgvc_tree(tmp_path, counts={'train': 1, 'test': 1})
  data = build.build_task_data(_fgvc_config(tmp_path, image_size=224))
  assert data.train_images.shape == (1, 256, 256, 3) and data.train_crop == 224
  assert next(data.eval_batches(2)).images.shape == (2, 224, 224, 3)


def test_fgvc_random_resized_crop_option(tmp_path):
  _fgvc_tree(tmp_path, counts={'train': 2, 'test': 1})
  data = build.build_task_data(_fgvc_config(tmp_path, fgvc_augment='random_resized_crop'))
  assert data.train_augment == 'random_resized_crop' and data.train_crop == 32
  assert augment.train_augmentation(data).func is augment.random_resized_crop_flip
  with pytest.raises(ValueError, match='crop_flip, random_resized_crop'):
    build.build_task_data(_fgvc_config(tmp_path, fgvc_augment='autoaugment'))


def test_fgvc_errors(tmp_path):
  with pytest.raises(ValueError, match='Unknown FGVC task .*cub, nabirds'):
    fgvc.get_task('aircraft')
  with pytest.raises(FileNotFoundError, match=r'CUB_200_2011.*fgvc_split'):
    build.build_task_data(_fgvc_config(tmp_path))
  _fgvc_tree(tmp_path)
  with pytest.raises(ValueError, match=r"valid: train, val, test .*no train800val200"):
    build.build_task_data(_fgvc_config(tmp_path, train_split='train800val200'))
  missing = tmp_path / 'CUB_200_2011' / 'images' / '003.class' / 'test_1.png'
  missing.unlink()
  with pytest.raises(FileNotFoundError, match='test_1.png') as error:
    build.build_task_data(_fgvc_config(tmp_path))
  assert 'test.json' in str(error.value)


def test_fgvc_class_ids_must_be_known_from_training(tmp_path):
  _fgvc_tree(tmp_path, class_ids=(3, 7), counts={'train': 2})
  _fgvc_tree(tmp_path, class_ids=(3, 9), counts={'test': 2})
  with pytest.raises(ValueError, match=r'evaluation class ids \[9\]'):
    build.build_task_data(_fgvc_config(tmp_path))


def test_fgvc_ablation_split_files_are_accepted(tmp_path):
  _fgvc_tree(tmp_path, counts={'train': 3, 'train_10': 1, 'test': 1})
  data = build.build_task_data(_fgvc_config(tmp_path, train_split='train_10'))
  assert data.train_images.shape[0] == 1
