"""Reading image files listed by a split file, with errors that name the file."""

from __future__ import annotations

import os
from typing import Callable, Iterator, Sequence

import numpy as np
from PIL import Image
from tqdm.auto import tqdm

from mlae_jax.data import parallel
from mlae_jax.data.task_data import Batch, padded_batches


def read_rgb(path: str) -> np.ndarray:
  """uint8 (H, W, 3) pixels of an image file, converted to RGB as torchvision's
  `default_loader` does (grey and palette images become 3 channels)."""
  try:
    with Image.open(path) as image:
      return np.asarray(image.convert('RGB'))
  except FileNotFoundError:
    raise FileNotFoundError(f'Image file {path} does not exist.') from None
  except (PermissionError, IsADirectoryError) as error:
    raise ValueError(f'Image file {path} cannot be read: {error.strerror}.') from None
  except (OSError, ValueError, SyntaxError) as error:  # PIL's errors for corrupt files.
    raise ValueError(f'Image file {path} cannot be decoded: {error}') from error


def check_exist(paths: Sequence[str], listed_in: str) -> None:
  """Raises FileNotFoundError naming the missing files (the first few and the count), so
  a broken list fails when loaded rather than in the middle of an evaluation."""
  missing = [path for path in paths if not os.path.isfile(path)]
  if missing:
    shown = ', '.join(missing[:5])
    more = f' and {len(missing) - 5} more' if len(missing) > 5 else ''
    raise FileNotFoundError(
        f'{len(missing)} of the {len(paths)} images listed in {listed_in} are missing: '
        f'{shown}{more}.')


def check_decodable(paths: Sequence[str], listed_in: str, workers: int | None = None) -> None:
  """Decodes every listed image once, in parallel with a progress bar, so that an
  unreadable or undecodable file (named in the error) stops a run before training, not
  at its first evaluation."""
  images = parallel.ordered_map(read_rgb, paths, workers)
  for _ in tqdm(images, total=len(paths), unit='image', desc=f'checking {listed_in}',
                leave=False, disable=None):  # disable=None: a bar on terminals, not in logs.
    pass


def streamed_eval_batches(load: Callable[[str], np.ndarray], paths: Sequence[str],
                          labels: Sequence[int], workers: int) -> Callable[[int], Iterator[Batch]]:
  """`TaskData.eval_batches` that decodes the listed files in order, on `workers` threads,
  as the batches are consumed."""
  def eval_batches(batch_size: int) -> Iterator[Batch]:
    return padded_batches(zip(parallel.ordered_map(load, paths, workers), labels), batch_size)
  return eval_batches
