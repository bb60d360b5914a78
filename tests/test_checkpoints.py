"""Checkpoint layout, loading, resizing, downloading, and the errors users meet."""

import functools
import http.server
import os
import socket
import threading

import jax
import numpy as np
import pytest

from fake_checkpoint import original_vit_shapes, random_arrays, write_original_npz
from mlae_jax.adapters import Mlae
from mlae_jax.checkpoints import (CheckpointDownloadError, CheckpointError, load_pretrained,
                                  read_npz, resolve_checkpoint, write_npz)
from mlae_jax.checkpoints import layout
from mlae_jax.checkpoints.download import download_file
from mlae_jax.checkpoints.posemb import resize_pos_embedding
from mlae_jax.model import create_model, get_variant
from tiny import images, init, tiny_model

SIZE = dict(hidden=32, mlp=64, heads=4, layers=3, patch=8, image_size=32)


@pytest.fixture
def tiny_npz(tmp_path):
  path = tmp_path / 'tiny.npz'
  write_original_npz(path, **SIZE)
  return path


def test_renumbering_round_trip_matches_the_model_tree():
  original = original_vit_shapes(**SIZE, pre_logits=False, head_classes=5)
  linen = layout.to_linen(original)
  model_keys = set(layout.flatten(init(tiny_model(num_classes=5))))
  assert set(linen) == model_keys
  assert 'Transformer/encoderblock_2/MlpBlock_0/Dense_1/kernel' in linen
  assert 'Transformer/encoderblock_0/LayerNorm_1/scale' in linen
  assert layout.to_pre_linen(linen) == original
  assert layout.to_linen(linen) == linen  # Already Linen: unchanged.


def test_loading_keeps_the_values_and_drops_pretraining_layers(tiny_npz):
  model = tiny_model(Mlae(rank=2), num_classes=9)
  params = layout.flatten(load_pretrained(tiny_npz, model, rng=jax.random.key(0), image_size=32))
  original = layout.to_linen(read_npz(tiny_npz))
  np.testing.assert_array_equal(
      params['Transformer/encoderblock_1/MultiHeadDotProductAttention_0/key/kernel'],
      original['Transformer/encoderblock_1/MultiHeadDotProductAttention_0/key/kernel'])
  assert params['head/kernel'].shape == (32, 9) and not np.any(params['head/kernel'])
  assert not any(k.startswith('pre_logits') for k in params)
  assert params['Transformer/encoderblock_0/MultiHeadDotProductAttention_0/adapter_qkv/A'].shape \
      == (2, 32)


def test_position_embeddings_are_resized_for_another_image_size(tiny_npz):
  model = tiny_model(num_classes=3)
  params = load_pretrained(tiny_npz, model, rng=jax.random.key(0), image_size=64)
  posemb = params['Transformer']['posembed_input']['pos_embedding']
  assert posemb.shape == (1, 1 + 8 * 8, 32)
  original = read_npz(tiny_npz)['Transformer/posembed_input/pos_embedding']
  np.testing.assert_array_equal(posemb[0, 0], original[0, 0])  # Class token kept apart.
  assert model.apply({'params': params}, images(1, size=64)).shape == (1, 3)


def test_resize_is_bilinear_on_the_grid():
  # A field linear in the grid coordinates is reproduced exactly by linear zoom, whose
  # corners map to corners: new position j sits at j * (old - 1) / (new - 1).
  old, new, dim = 4, 7, 2
  rows, cols = np.meshgrid(np.arange(old), np.arange(old), indexing='ij')
  grid = np.stack([2.0 * rows + 1.0, -0.5 * cols], axis=-1).reshape(1, old * old, dim)
  posemb = np.concatenate([np.full((1, 1, dim), 9.0), grid], axis=1).astype(np.float32)
  resized = resize_pos_embedding(posemb, 1 + new * new)
  position = np.arange(new) * (old - 1) / (new - 1)
  new_rows, new_cols = np.meshgrid(position, position, indexing='ij')
  expected = np.stack([2.0 * new_rows + 1.0, -0.5 * new_cols], axis=-1).reshape(new * new, dim)
  np.testing.assert_allclose(resized[0, 1:], expected, atol=1e-5)
  np.testing.assert_array_equal(resized[0, 0], [9.0, 9.0])


def test_wrong_model_size_names_the_offending_keys(tiny_npz):
  wider = tiny_model(hidden_size=48, num_heads=4)
  with pytest.raises(CheckpointError) as error:
    load_pretrained(tiny_npz, wider, rng=jax.random.key(0), image_size=32)
  message = str(error.value)
  assert 'does not fit the model' in message and 'hidden 48' in message
  assert 'keys with the wrong shape (file vs model): Transformer/encoder_norm/bias: (32,) vs (48,)' \
      in message
  deeper = tiny_model(num_layers=4)
  with pytest.raises(CheckpointError, match=r'keys missing from the file: '
                                            r'Transformer/encoderblock_3/'):
    load_pretrained(tiny_npz, deeper, rng=jax.random.key(0), image_size=32)
  shallower = tiny_model(num_layers=2)
  with pytest.raises(CheckpointError, match=r'keys not in the model: Transformer/encoderblock_2/'):
    load_pretrained(tiny_npz, shallower, rng=jax.random.key(0), image_size=32)


def test_b16_file_into_s16_model_is_refused(tmp_path):
  # The full B/16 key set, with small arrays: only key names and shapes matter here.
  shapes = original_vit_shapes(hidden=768, mlp=3072, heads=12, layers=12, patch=16)
  model = create_model('ViT-S_16', 10)
  with pytest.raises(CheckpointError, match=r'hidden 384.* wrong shape'):
    load_pretrained(_shape_only_npz(tmp_path, shapes), model, rng=jax.random.key(0))


def _shape_only_npz(tmp_path, shapes):
  path = tmp_path / 'shapes.npz'
  np.savez(path, **{k: np.broadcast_to(np.float32(0), s) for k, s in shapes.items()})
  return path


def test_truncated_file_is_reported_as_corrupt(tiny_npz, tmp_path):
  data = tiny_npz.read_bytes()
  truncated = tmp_path / 'truncated.npz'
  truncated.write_bytes(data[:len(data) // 2])
  with pytest.raises(CheckpointError, match='truncated or corrupt'):
    load_pretrained(truncated, tiny_model(), rng=jax.random.key(0), image_size=32)


def test_missing_file_says_where_to_get_it(tmp_path):
  with pytest.raises(FileNotFoundError, match='Checkpoint not found: .*ViT-B_16.npz'):
    read_npz(tmp_path / 'ViT-B_16.npz')


def test_unknown_model_name_lists_the_valid_ones():
  with pytest.raises(ValueError, match=r"Unknown model name 'ViT-X_16'.*ViT-B_16"):
    create_model('ViT-X_16', 10)
  assert get_variant('B/16') == get_variant('ViT-B_16') == get_variant('ViT-B/16')


def test_write_npz_is_atomic_and_readable(tmp_path):
  arrays = random_arrays({'a/b': (2, 3), 'c': (4,)})
  write_npz(tmp_path / 'sub' / 'x.npz', arrays)
  assert os.listdir(tmp_path / 'sub') == ['x.npz']
  back = read_npz(tmp_path / 'sub' / 'x.npz')
  assert set(back) == {'a/b', 'c'}
  np.testing.assert_array_equal(back['a/b'], arrays['a/b'])


class _Quiet(http.server.SimpleHTTPRequestHandler):
  def log_message(self, *args):
    pass


@pytest.fixture
def local_server(tmp_path):
  served = tmp_path / 'served'
  served.mkdir()
  handler = functools.partial(_Quiet, directory=str(served))
  server = http.server.ThreadingHTTPServer(('127.0.0.1', 0), handler)
  thread = threading.Thread(target=server.serve_forever, daemon=True)
  thread.start()
  yield served, f'http://127.0.0.1:{server.server_address[1]}'
  server.shutdown()


def test_download_into_the_cache(local_server, tmp_path, tiny_npz):
  served, base_url = local_server
  (served / 'ViT-B_16.npz').write_bytes(tiny_npz.read_bytes())
  cache = tmp_path / 'cache'
  path = resolve_checkpoint('ViT-B_16', cache_dir=str(cache), url=f'{base_url}/ViT-B_16.npz')
  assert path == str(cache / 'ViT-B_16.npz')
  assert set(read_npz(path)) == set(read_npz(tiny_npz))
  assert os.listdir(cache) == ['ViT-B_16.npz']
  # Cached: found again without any download.
  assert resolve_checkpoint('B/16', cache_dir=str(cache), download=False) == path


def test_offline_download_fails_with_where_to_put_the_file(tmp_path):
  with socket.socket() as sock:  # A loopback port that nothing listens on.
    sock.bind(('127.0.0.1', 0))
    port = sock.getsockname()[1]
  cache = tmp_path / 'cache'
  with pytest.raises(CheckpointDownloadError,
                     match=f'place it at {cache / "ViT-B_16.npz"}') as error:
    resolve_checkpoint('ViT-B_16', cache_dir=str(cache), url=f'http://127.0.0.1:{port}/x.npz')
  assert 'offline' in str(error.value)
  assert not any(name.endswith('.part') for name in os.listdir(cache))
  with pytest.raises(FileNotFoundError, match='is not cached'):
    resolve_checkpoint('ViT-B_16', cache_dir=str(cache), download=False)
  with pytest.raises(ValueError, match='No original ImageNet-21k checkpoint exists for ViT-S_16'):
    resolve_checkpoint('ViT-S_16', cache_dir=str(cache))
  with pytest.raises(FileNotFoundError, match='Checkpoint not found'):
    resolve_checkpoint(str(tmp_path / 'nowhere.npz'))


def test_simultaneous_downloads_into_one_cache_do_not_collide(local_server, tmp_path):
  """The hosts of a multi-host job may download the checkpoint into one shared cache at
  once: each writes its own partial file, and the file in place is always whole."""
  served, base_url = local_server
  payload = np.random.default_rng(0).bytes(12 << 20)
  (served / 'big.npz').write_bytes(payload)
  target = tmp_path / 'cache' / 'big.npz'
  errors = []

  def fetch():
    try:
      download_file(f'{base_url}/big.npz', str(target))
    except Exception as error:  # pylint: disable=broad-except
      errors.append(error)

  threads = [threading.Thread(target=fetch) for _ in range(4)]
  for thread in threads:
    thread.start()
  for thread in threads:
    thread.join()
  assert not errors, errors
  assert target.read_bytes() == payload
  assert os.listdir(target.parent) == ['big.npz']
  assert os.stat(target).st_mode & 0o777 == 0o644
