"""Finding an original checkpoint locally, or downloading it into a cache."""

from __future__ import annotations

import os
import tempfile
import urllib.error
import urllib.request

from mlae_jax.checkpoints.variants import get_variant

# The original ImageNet-21k releases (no Ti or S exist in this series).
RELEASED = ('ViT-B_16', 'ViT-B_32', 'ViT-B_8', 'ViT-L_16', 'ViT-L_32', 'ViT-H_14')
URL_TEMPLATE = 'https://storage.googleapis.com/vit_models/imagenet21k/{name}.npz'


class CheckpointDownloadError(RuntimeError):
  """The checkpoint could not be fetched; the message says where to put it by hand."""


def default_cache_dir() -> str:
  return os.environ.get('MLAE_JAX_CACHE', os.path.join(os.path.expanduser('~'), '.cache',
                                                       'mlae_jax'))


def resolve_checkpoint(name_or_path: str, *, cache_dir: str | None = None,
                       download: bool = True, url: str | None = None) -> str:
  """A local path for a checkpoint file path or a released model name.

  An existing file is returned as is. A model name ('ViT-B_16') maps to
  `<cache_dir>/ViT-B_16.npz`, downloaded there (with a progress bar) when absent
  and `download` is set.
  """
  if os.path.isfile(name_or_path):
    return name_or_path
  try:
    name = get_variant(name_or_path).name
  except ValueError:
    raise FileNotFoundError(
        f'Checkpoint not found: {name_or_path}. Put the .npz file there, or give a model name '
        f'({", ".join(RELEASED)}) to use the cache.') from None
  if name not in RELEASED:
    raise ValueError(f'No original ImageNet-21k checkpoint exists for {name}; released: '
                     f'{", ".join(RELEASED)}. Pass the path of your own .npz file instead.')
  target = os.path.join(cache_dir or default_cache_dir(), f'{name}.npz')
  if os.path.isfile(target):
    return target
  source = url or URL_TEMPLATE.format(name=name)
  if not download:
    raise FileNotFoundError(f'Checkpoint {name} is not cached. Download {source} and place it '
                            f'at {target}, or enable downloading.')
  download_file(source, target)
  return target


def download_file(url: str, target: str, timeout: float = 60.0) -> None:
  """Streams `url` to `target` via a `.part` file of this download's own, so an interrupted
  download never looks complete and processes downloading into one shared cache at once
  (the hosts of a multi-host job) never write into each other's file."""
  from tqdm.auto import tqdm  # Only needed when downloading.

  os.makedirs(os.path.dirname(os.path.abspath(target)), exist_ok=True)
  handle, partial = tempfile.mkstemp(prefix=os.path.basename(target) + '.', suffix='.part',
                                     dir=os.path.dirname(os.path.abspath(target)))
  os.close(handle)
  try:
    with urllib.request.urlopen(url, timeout=timeout) as response:
      total = int(response.headers.get('Content-Length') or 0) or None
      received = 0
      with open(partial, 'wb') as out, tqdm(total=total, unit='B', unit_scale=True,
                                             desc=os.path.basename(target)) as bar:
        while chunk := response.read(1 << 20):
          out.write(chunk)
          received += len(chunk)
          bar.update(len(chunk))
    if total is not None and received != total:
      raise OSError(f'received {received} of {total} bytes')
    os.chmod(partial, 0o644)  # mkstemp's 0600 would hide a shared cache from other users.
    os.replace(partial, target)
  except (urllib.error.URLError, OSError, ValueError) as error:
    if os.path.exists(partial):
      os.remove(partial)
    raise CheckpointDownloadError(
        f'Could not download {url} ({error}). If this machine is offline, download the file '
        f'elsewhere and place it at {target}.') from error
