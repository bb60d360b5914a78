"""The VTAB-1k registry against the reference table, and the TFDS loader driven through
`builder.as_dataset` by `tensorflow_datasets.testing.mock_data` for all 19 tasks."""

import contextlib
import functools
import logging

import numpy as np
import pytest

tf = pytest.importorskip('tensorflow')
tfds = pytest.importorskip('tensorflow_datasets')
from tensorflow_datasets.testing import mocking  # noqa: E402

from mlae_jax.data import build, tfds_source, vtab  # noqa: E402

# Written out from the reference (vtab_fgvc.md section 2), not computed from the code:
# task: (TFDS builder, train800, val200, train800val200, test, classes).
REFERENCE = {
    'cifar100': ('cifar100:3.*.*', 'train[:800]', 'train[45000:45200]',
                 'train[:800]+train[45000:45200]', 'test', 100),
    'caltech101': ('caltech101:3.*.*', 'train[:800]', 'train[2754:2954]',
                   'train[:800]+train[2754:2954]', 'test', 102),
    'dtd': ('dtd:3.*.*', 'train[:800]', 'validation[:200]', 'train[:800]+validation[:200]',
            'test', 47),
    'oxford_flowers102': ('oxford_flowers102:2.*.*', 'train[:800]', 'validation[:200]',
                          'train[:800]+validation[:200]', 'test', 102),
    'oxford_iiit_pet': ('oxford_iiit_pet:3.*.*', 'train[:800]', 'train[2944:3144]',
                        'train[:800]+train[2944:3144]', 'test', 37),
    'svhn': ('svhn_cropped:3.*.*', 'train[:800]', 'train[65931:66131]',
             'train[:800]+train[65931:66131]', 'test', 10),
    'sun397': ('sun397/tfds:4.*.*', 'train[:800]', 'validation[:200]',
               'train[:800]+validation[:200]', 'test', 397),
    'patch_camelyon': ('patch_camelyon:2.*.*', 'train[:800]', 'validation[:200]',
                       'train[:800]+validation[:200]', 'test', 2),
    'eurosat': ('eurosat/rgb:2.*.*', 'train[:800]', 'train[16200:16400]',
                'train[:800]+train[16200:16400]', 'train[21600:]', 10),
    'resisc45': ('resisc45:3.*.*', 'train[:800]', 'train[18900:19100]',
                 'train[:800]+train[18900:19100]', 'train[25200:]', 45),
    'diabetic_retinopathy': ('diabetic_retinopathy_detection/btgraham-300:3.*.*', 'train[:800]',
                             'validation[:200]', 'train[:800]+validation[:200]', 'test', 5),
    'clevr_count': ('clevr:3.*.*', 'train[:800]', 'train[63000:63200]',
                    'train[:800]+train[63000:63200]', 'validation', 8),
    'clevr_dist': ('clevr:3.*.*', 'train[:800]', 'train[63000:63200]',
                   'train[:800]+train[63000:63200]', 'validation', 6),
    'dmlab': ('dmlab:2.0.1', 'train[:800]', 'validation[:200]', 'train[:800]+validation[:200]',
              'test', 6),
    'kitti': ('kitti:3.2.0', 'train[:800]', 'validation[:200]', 'train[:800]+validation[:200]',
              'test', 4),
    'dsprites_loc': ('dsprites:2.*.*', 'train[:800]', 'train[589824:590024]',
                     'train[:800]+train[589824:590024]', 'train[663552:]', 16),
    'dsprites_ori': ('dsprites:2.*.*', 'train[:800]', 'train[589824:590024]',
                     'train[:800]+train[589824:590024]', 'train[663552:]', 16),
    'smallnorb_azi': ('smallnorb:2.*.*', 'train[:800]', 'test[:200]', 'train[:800]+test[:200]',
                      'test[50%:]', 18),
    'smallnorb_ele': ('smallnorb:2.*.*', 'train[:800]', 'test[:200]', 'train[:800]+test[:200]',
                      'test[50%:]', 9),
}

# TFDS split sizes (reference, "TFDS source split sizes") and the VTAB test sizes.
SOURCE_SIZES = {
    'cifar100': {'train': 50000, 'test': 10000},
    'caltech101': {'train': 3060, 'test': 6084},
    'dtd': {'train': 1880, 'validation': 1880, 'test': 1880},
    'oxford_flowers102': {'train': 1020, 'validation': 1020, 'test': 6149},
    'oxford_iiit_pet': {'train': 3680, 'test': 3669},
    'svhn': {'train': 73257, 'test': 26032},
    'sun397': {'train': 76128, 'validation': 10875, 'test': 21750},
    'patch_camelyon': {'train': 262144, 'validation': 32768, 'test': 32768},
    'eurosat': {'train': 27000},
    'resisc45': {'train': 31500},
    'diabetic_retinopathy': {'train': 35126, 'validation': 10906, 'test': 42670},
    'clevr_count': {'train': 70000, 'validation': 15000, 'test': 15000},
    'clevr_dist': {'train': 70000, 'validation': 15000, 'test': 15000},
    'dmlab': {'train': 65550, 'validation': 22628, 'test': 22735},
    'kitti': {'train': 6347, 'validation': 423, 'test': 711},
    'dsprites_loc': {'train': 737280},
    'dsprites_ori': {'train': 737280},
    'smallnorb_azi': {'train': 24300, 'test': 24300},
    'smallnorb_ele': {'train': 24300, 'test': 24300},
}
VTAB_TEST_SIZES = {
    'cifar100': 10000, 'caltech101': 6084, 'dtd': 1880, 'oxford_flowers102': 6149,
    'oxford_iiit_pet': 3669, 'svhn': 26032, 'sun397': 21750, 'patch_camelyon': 32768,
    'eurosat': 5400, 'resisc45': 6300, 'diabetic_retinopathy': 42670, 'clevr_count': 15000,
    'clevr_dist': 15000, 'dmlab': 22735, 'kitti': 711, 'dsprites_loc': 73728,
    'dsprites_ori': 73728, 'smallnorb_azi': 12150, 'smallnorb_ele': 12150,
}


# ------------------------------------------------------------------------- registry

def test_registry_names_the_19_tasks_in_vtab_order():
  assert vtab.TASK_NAMES == tuple(REFERENCE)
  assert len(vtab.NATURAL) == 7 and len(vtab.SPECIALIZED) == 4 and len(vtab.STRUCTURED) == 8
  assert vtab.SPLITS == ('train800', 'val200', 'train800val200', 'test')


def test_all_76_split_strings_match_the_reference():
  compared = 0
  for name, (_, *splits_and_classes) in REFERENCE.items():
    for split, expected in zip(vtab.SPLITS, splits_and_classes[:4]):
      assert vtab.TASKS[name].splits[split] == expected, (name, split)
      compared += 1
  assert compared == 76


@pytest.mark.parametrize('name', list(REFERENCE))
def test_builder_and_class_count_match_the_reference(name):
  task = vtab.get_task(name)
  assert task.tfds_name == REFERENCE[name][0]
  assert task.num_classes == REFERENCE[name][5]
  assert task.image_key == 'image'


def _absolute(split, sizes):
  """Split string -> set of (tfds split, index), resolved by TFDS's own parser."""
  class Info:
    def __init__(self, count):
      self.num_examples = count
  instructions = tfds.core.ReadInstruction.from_spec(split).to_absolute(
      {name: Info(count) for name, count in sizes.items()})
  return {(i.splitname, index) for i in instructions
          for index in range(i.from_ or 0, sizes[i.splitname] if i.to is None else i.to)}


@pytest.mark.parametrize('name', list(REFERENCE))
def test_split_strings_select_800_200_1000_and_the_vtab_test_set(name):
  splits, sizes = vtab.TASKS[name].splits, SOURCE_SIZES[name]
  train, val, both, test = (_absolute(splits[s], sizes) for s in vtab.SPLITS)
  assert (len(train), len(val), len(both)) == (800, 200, 1000)
  assert both == train | val and not train & val
  assert not both & test, 'training examples leak into the test split'
  assert len(test) == VTAB_TEST_SIZES[name]


def test_unknown_task_and_split_list_the_valid_ones():
  with pytest.raises(ValueError, match='cifar100, caltech101, .*smallnorb_ele'):
    vtab.get_task('cifar10')
  config = build.default_data_config()
  config.task = 'imagenet'
  with pytest.raises(ValueError, match='Unknown VTAB-1k task .*dsprites_loc'):
    build.build_task_data(config)
  config = build.default_data_config()
  config.eval_split = 'test800'
  with pytest.raises(ValueError, match='train800, val200, train800val200, test'):
    build.build_task_data(config)
  config = build.default_data_config()
  config.source = 'hub'
  with pytest.raises(ValueError, match='tfds, folder, fgvc, synthetic'):
    build.build_task_data(config)
  config = build.default_data_config()
  config.resize = 'area'
  with pytest.raises(ValueError, match='bicubic, bilinear_legacy'):
    build.build_task_data(config)


def test_out_of_range_label_from_the_data_raises():
  example = {'image': np.zeros((8, 8, 3), np.uint8), 'objects': {'size': np.zeros(12)}}
  with pytest.raises(ValueError, match=r'label 9 outside \[0, 8\)'):
    tfds_source.example_to_pair(example, vtab.TASKS['clevr_count'], 8, 'bicubic')


# ------------------------------------------------------------------- mocked TFDS

@contextlib.contextmanager
def mocked_tfds(num_examples=5):
  """mock_data with a generator whose dynamic dimensions are all 10 (small images, and
  `Sequence` features of equal length, as real clevr/kitti objects are); records the
  (builder full name, split string) each `as_dataset` call reaches."""
  calls = []

  def as_dataset(self, split, decoders=None, read_config=None, shuffle_files=False):
    assert shuffle_files is False
    calls.append((self.info.full_name, split))
    features, inner = self.info.features, decoders
    if isinstance(decoders, tfds.decode.PartialDecoding):
      features, inner = decoders.extract_features(features), decoders.decoders
    generator = functools.partial(
        mocking.EncodedRandomFakeGenerator, features, num_examples, constant_dynamic_shape=True,
        max_value=2 if self.name == 'dsprites' else None)  # dsprites pixels are 0/1.
    specs = tf.nest.map_structure(lambda info: tf.TensorSpec(info.shape, info.dtype),
                                  features.get_serialized_info())
    dataset = tf.data.Dataset.from_generator(generator, output_signature=specs)
    dataset = dataset.apply(tf.data.experimental.assert_cardinality(num_examples))
    return dataset.map(functools.partial(features.decode_example, decoders=inner))

  with tfds.testing.mock_data(policy=tfds.testing.MockPolicy.USE_CODE, as_dataset_fn=as_dataset):
    yield calls


def _config(name, **overrides):
  config = build.default_data_config()
  config.update({'task': name, 'image_size': 32, 'data_dir': '/nonexistent/tfds', **overrides})
  return config


@pytest.mark.parametrize('name', list(REFERENCE))
def test_every_task_loads_through_tfds(name):
  with mocked_tfds(num_examples=5) as calls:
    data = build.build_task_data(_config(name))
    batches = list(data.eval_batches(4))
  task = vtab.TASKS[name]
  builder = REFERENCE[name][0].split(':')[0]
  assert [split for _, split in calls] == [REFERENCE[name][3], REFERENCE[name][4]]
  assert all(full_name.startswith(builder + '/') for full_name, _ in calls)
  assert data.name == name and data.num_classes == REFERENCE[name][5]
  assert data.train_images.shape == (5, 32, 32, 3) and data.train_images.dtype == np.uint8
  assert data.train_labels.dtype == np.int32 and data.train_labels.shape == (5,)
  assert np.all((data.train_labels >= 0) & (data.train_labels < task.num_classes))
  assert data.train_images.max() > 0 and data.train_crop is None
  assert data.num_eval == 5 and len(batches) == 2
  for batch in batches:
    assert batch.images.shape == (4, 32, 32, 3) and batch.images.dtype == np.uint8
    assert np.all((batch.labels >= 0) & (batch.labels < task.num_classes))
  assert sum(int(batch.mask.sum()) for batch in batches) == 5
  assert data.mean == (0.5, 0.5, 0.5) and data.std == (0.5, 0.5, 0.5)
  if name.startswith('dsprites'):  # 0/1 pixels scaled to 0/255 before resizing.
    assert data.train_images.max() > 200
  if name.startswith(('dsprites', 'smallnorb')):  # Grey, tiled to 3 equal channels.
    np.testing.assert_array_equal(data.train_images[..., 0], data.train_images[..., 2])
  if name == 'clevr_count':  # 10 mocked objects each.
    assert data.train_labels.tolist() == [7] * 5


def test_versions_reach_tfds_and_pets_falls_back(caplog):
  expected = {'kitti': 'kitti/3.2.0', 'dmlab': 'dmlab/2.0.1', 'cifar100': 'cifar100/3.',
              'sun397': 'sun397/tfds/4.', 'diabetic_retinopathy':
              'diabetic_retinopathy_detection/btgraham-300/3.', 'eurosat': 'eurosat/rgb/2.',
              'oxford_iiit_pet': 'oxford_iiit_pet/4.0.0'}
  for name, prefix in expected.items():
    with mocked_tfds(num_examples=2) as calls, caplog.at_level(logging.WARNING):
      build.build_task_data(_config(name))
    assert calls[0][0].startswith(prefix), (name, calls)
  # TFDS 4.9.10 only builds oxford_iiit_pet 4.0.0; the fallback says so.
  assert 'oxford_iiit_pet:3.*.*' in caplog.text and 'oxford_iiit_pet:4.*.*' in caplog.text


def test_other_splits_reach_tfds():
  with mocked_tfds(num_examples=2) as calls:
    build.build_task_data(_config('smallnorb_ele', train_split='train800', eval_split='val200'))
    build.build_task_data(_config('eurosat', train_split='val200', eval_split='test'))
  assert [split for _, split in calls] == ['train[:800]', 'test[:200]', 'train[16200:16400]',
                                           'train[21600:]']


@pytest.mark.parametrize('name, resize', [('dmlab', 'bilinear_legacy'),
                                          ('smallnorb_azi', 'bicubic')])
def test_tasks_resize_to_224(name, resize):
  with mocked_tfds(num_examples=2):
    data = build.build_task_data(_config(name, image_size=224, resize=resize,
                                         normalization='imagenet'))
    batch = next(data.eval_batches(2))
  assert data.train_images.shape == (2, 224, 224, 3)
  assert batch.images.shape == (2, 224, 224, 3) and batch.mask.all()
  assert data.mean == (0.485, 0.456, 0.406) and data.std == (0.229, 0.224, 0.225)


def test_default_mock_generator_also_loads():
  # tfds's own random examples (random dynamic shapes), as plain mock_data makes them.
  with tfds.testing.mock_data(num_examples=3, policy=tfds.testing.MockPolicy.USE_CODE):
    data = build.build_task_data(_config('caltech101'))
    assert data.train_images.shape == (3, 32, 32, 3) and data.num_eval == 3


def test_evaluation_counts_every_example_exactly_once():
  with mocked_tfds(num_examples=7):
    data = build.build_task_data(_config('cifar100'))
    whole = next(data.eval_batches(7))
    batches = list(data.eval_batches(3))
    again = list(data.eval_batches(3))
  assert data.num_eval == 7 and whole.mask.all()
  assert [int(batch.mask.sum()) for batch in batches] == [3, 3, 1]
  images = np.concatenate([batch.images[batch.mask] for batch in batches])
  labels = np.concatenate([batch.labels[batch.mask] for batch in batches])
  np.testing.assert_array_equal(images, whole.images)
  np.testing.assert_array_equal(labels, whole.labels)
  assert not batches[-1].images[1:].any()  # Padding rows are zero and masked out.
  for first, second in zip(batches, again):  # A fixed order, every time.
    np.testing.assert_array_equal(first.images, second.images)


# ----------------------------------------------------------------- missing data

def test_missing_tfds_data_names_the_data_dir(tmp_path):
  config = _config('cifar100', data_dir=str(tmp_path))
  with pytest.raises(FileNotFoundError) as error:
    build.build_task_data(config)
  message = str(error.value)
  assert str(tmp_path) in message and 'cifar100' in message
  assert 'tfds build cifar100' in message and 'source="folder"' in message


def test_manual_datasets_say_what_to_download_and_where(tmp_path):
  manual = f'{tmp_path}/downloads/manual'
  with pytest.raises(FileNotFoundError) as error:
    build.build_task_data(_config('diabetic_retinopathy', data_dir=str(tmp_path)))
  message = str(error.value)
  assert 'diabetic-retinopathy-detection' in message and 'kaggle' in message
  assert f'{manual}/train/' in message and 'trainLabels.csv' in message
  assert 'cat train.zip.* > train.zip' in message
  with pytest.raises(FileNotFoundError) as error:
    build.build_task_data(_config('resisc45', data_dir=str(tmp_path)))
  assert f'{manual}/NWPU-RESISC45/<class>/*.jpg' in str(error.value)
  with pytest.raises(FileNotFoundError) as error:
    build.build_task_data(_config('dmlab', data_dir=str(tmp_path)))
  assert 'dmlab.tar.gz' in str(error.value) and str(tmp_path) in str(error.value)


def test_tensorflow_is_kept_off_accelerators_before_the_first_tfds_call(monkeypatch):
  """TensorFlow must not reserve GPU memory that JAX trains in: GPUs and TPUs are hidden
  from it before TFDS opens a builder or builds a pipeline (observable on CPU as the
  order of the calls)."""
  events = []
  hide, builder = tf.config.set_visible_devices, tfds.builder

  def recording_hide(devices, device_type=None):
    events.append(('hide', device_type, list(devices)))
    return hide(devices, device_type)

  def recording_builder(*args, **kwargs):
    events.append(('tfds.builder',))
    return builder(*args, **kwargs)

  monkeypatch.setattr(tf.config, 'set_visible_devices', recording_hide)
  monkeypatch.setattr(tfds, 'builder', recording_builder)
  with mocked_tfds(num_examples=3) as calls:
    data = build.build_task_data(_config('svhn'))
    list(data.eval_batches(4))
  assert len(calls) == 2 and ('tfds.builder',) in events
  first_tfds = events.index(('tfds.builder',))
  hidden = {event[1] for event in events[:first_tfds] if event[0] == 'hide' and not event[2]}
  assert hidden == {'GPU', 'TPU'}, events
  assert tf.config.get_visible_devices('GPU') == []
