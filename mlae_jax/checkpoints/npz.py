"""Reading and writing flat `.npz` checkpoints, with errors that say what to do."""

from __future__ import annotations

import os
import tempfile
import zipfile
from typing import Mapping

import numpy as np


class CheckpointError(ValueError):
  """A checkpoint file is missing, unreadable, or does not fit the model."""


def read_npz(path: str | os.PathLike) -> dict[str, np.ndarray]:
  """All arrays of an `.npz` file, keyed by their '/'-joined tree paths."""
  path = os.fspath(path)
  if not os.path.exists(path):
    raise FileNotFoundError(
        f'Checkpoint not found: {path}. Download the original ImageNet-21k file (e.g. '
        'https://storage.googleapis.com/vit_models/imagenet21k/ViT-B_16.npz) and put it '
        'there, or point the config at where it is.')
  try:
    with np.load(path, allow_pickle=False) as data:
      return {key: data[key] for key in data.files}
  except (zipfile.BadZipFile, EOFError, OSError, ValueError) as error:
    raise CheckpointError(
        f'Cannot read {path} as an .npz checkpoint ({type(error).__name__}: {error}). The file '
        'is probably truncated or corrupt: delete it and download it again.') from error


def write_npz(path: str | os.PathLike, arrays: Mapping[str, np.ndarray]) -> None:
  """Writes atomically: a crash never leaves a partial file under `path`."""
  path = os.fspath(path)
  directory = os.path.dirname(os.path.abspath(path))
  os.makedirs(directory, exist_ok=True)
  handle, tmp = tempfile.mkstemp(suffix='.npz.tmp', dir=directory)
  try:
    with os.fdopen(handle, 'wb') as f:
      np.savez(f, **{key: np.asarray(value) for key, value in arrays.items()})
    umask = os.umask(0)
    os.umask(umask)
    os.chmod(tmp, 0o666 & ~umask)  # mkstemp's 0600 would hide the file from other users.
    os.replace(tmp, path)
  except BaseException:
    if os.path.exists(tmp):
      os.remove(tmp)
    raise
