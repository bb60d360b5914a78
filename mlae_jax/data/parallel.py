"""Order-keeping parallel map for host image work (decoding, resizing).

PIL and numpy release the GIL for most of their pixel work, so a few threads keep the
evaluation stream ahead of the device without multiprocessing.
"""

from __future__ import annotations

import collections
import concurrent.futures
import os
from typing import Callable, Iterable, Iterator, TypeVar

import numpy as np
from tqdm.auto import tqdm

In = TypeVar('In')
Out = TypeVar('Out')


def default_workers() -> int:
  """Threads for image work: the CPU count, at most 8."""
  return max(1, min(8, os.cpu_count() or 1))


def ordered_map(fn: Callable[[In], Out], items: Iterable[In], workers: int | None = None,
                window: int | None = None) -> Iterator[Out]:
  """Yields fn(item) for each item, in input order, computing up to `window` ahead on
  `workers` threads. An exception in fn is raised when its result is reached."""
  workers = workers or default_workers()
  if workers == 1:
    yield from map(fn, items)
    return
  window = window or 4 * workers
  with concurrent.futures.ThreadPoolExecutor(workers) as pool:
    pending: collections.deque = collections.deque()
    try:
      for item in items:
        pending.append(pool.submit(fn, item))
        if len(pending) >= window:
          yield pending.popleft().result()
      while pending:
        yield pending.popleft().result()
    finally:
      for future in pending:
        future.cancel()


def map_into_array(fn: Callable[[In], np.ndarray], items: Iterable[In], count: int,
                   shape: tuple[int, ...], workers: int | None = None,
                   desc: str | None = None) -> np.ndarray:
  """uint8 array (count, *shape) of fn(item) for `count` items, filled in place so a large
  training set is never held twice (list + stacked copy); a progress bar when `desc`."""
  out = np.empty((count,) + tuple(shape), np.uint8)
  filled = 0
  values = ordered_map(fn, items, workers)
  if desc:
    values = tqdm(values, total=count, unit='image', desc=desc, leave=False,
                  disable=None)  # A bar on terminals, not in logs.
  for index, value in enumerate(values):
    if index >= count:
      raise ValueError(f'More than the expected {count} items.')
    out[index] = value
    filled = index + 1
  if filled != count:
    raise ValueError(f'Expected {count} items, got {filled}.')
  return out
