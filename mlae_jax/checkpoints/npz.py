"""Reading and writing flat `.npz` checkpoints, with errors that say what to do."""

from __future__ import annotations

import os
import zipfile
from typing import Mapping

import numpy as np

from mlae_jax.files import atomic_write


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


def check_finite(arrays: Mapping[str, np.ndarray], path: str | os.PathLike) -> None:
  """Raises CheckpointError naming the arrays of `path` that hold NaN or infinities."""
  bad = sorted(key for key, value in arrays.items()
               if np.issubdtype(np.asarray(value).dtype, np.floating)
               and not np.isfinite(value).all())
  if bad:
    shown = ', '.join(bad[:8]) + (f' ... and {len(bad) - 8} more' if len(bad) > 8 else '')
    raise CheckpointError(f'{os.fspath(path)} holds NaN or infinite values in {len(bad)} '
                          f'arrays: {shown}. The file is damaged or comes from a diverged '
                          'run; use another copy.')


def write_npz(path: str | os.PathLike, arrays: Mapping[str, np.ndarray]) -> None:
  """Writes atomically: a crash never leaves a partial file under `path`."""
  with atomic_write(path) as f:
    np.savez(f, **{key: np.asarray(value) for key, value in arrays.items()})
