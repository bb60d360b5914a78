"""Orbax checkpoints of a run: the trained subtree, optimizer state and history.

The frozen backbone is not saved (it is the pre-trained file), so a ViT-B/16
checkpoint holds about 1 MB of adapters and head instead of 330 MB. Orbax writes a
checkpoint under a temporary name and renames it when complete, so a half-written one
is never taken for a checkpoint; one damaged later (a lost file, a bad disk, NaN
values) is set aside and the newest intact one restored instead.
"""

from __future__ import annotations

import contextlib
import logging
import os
import re
import sys
import threading
import traceback
from typing import Any, Iterator

import jax
import numpy as np
import orbax.checkpoint as ocp

from mlae_jax.training.errors import CheckpointsDamaged, OutputWriteError
from mlae_jax.training.steps import TrainState

DAMAGED_SUFFIX = '.damaged'


class RunCheckpoints:
  """Saves after whole epochs (the checkpoint's number is the epochs completed) and
  restores the newest intact one."""

  def __init__(self, directory: str, keep: int = 2):
    self.directory = os.path.abspath(directory)
    self._keep = keep
    os.makedirs(self.directory, exist_ok=True)
    self._manager = self._open()

  def _open(self) -> ocp.CheckpointManager:
    # This process alone reads and writes them (process 0 of a job of several): no
    # waiting for the others at orbax's barriers.
    alone = ocp.options.MultiprocessingOptions(primary_host=jax.process_index(),
                                               active_processes={jax.process_index()})
    return ocp.CheckpointManager(self.directory, options=ocp.CheckpointManagerOptions(
        max_to_keep=self._keep, create=False, multiprocessing_options=alone))

  def save(self, epoch: int, state: TrainState, history: dict[str, Any]) -> None:
    """Writes the checkpoint after `epoch`; a failed write (full disk, I/O error) is an
    OutputWriteError that names the directory, and leaves the older checkpoints intact."""
    try:
      with _quiet_background_failures():
        self._manager.save(epoch, args=ocp.args.Composite(
            state=ocp.args.StandardSave(_as_tree(jax.device_get(state))),
            history=ocp.args.JsonSave(history)))
        self._manager.wait_until_finished()
    except Exception as error:  # pylint: disable=broad-except  # Orbax wraps OS errors.
      raise OutputWriteError(
          f'Cannot write the checkpoint after epoch {epoch} to {self.directory}: '
          f'{_reason(error)}. Free disk space or fix the folder, then re-run the same '
          f'command: it resumes from the last checkpoint written '
          f'({self.latest_intact_hint()}).') from error

  def latest_intact_hint(self) -> str:
    steps = [s for s in self._manager.all_steps()
             if os.path.isdir(os.path.join(self.directory, str(s)))]
    return f'after epoch {max(steps)}' if steps else 'none yet: it starts over'

  def restore_latest(self, template: TrainState) -> tuple[int, TrainState, dict[str, Any]] | None:
    """(epoch, state, history) of the newest checkpoint that restores whole and holds
    finite values, shaped and placed like `template`; None if there is none. A damaged
    newer one is renamed `<epoch>.damaged` with a warning naming it; if every one is
    damaged, CheckpointsDamaged names the directory."""
    damaged = []
    for epoch in sorted(self._manager.all_steps(), reverse=True):
      try:
        with _quiet_background_failures():
          state, history = self._restore(epoch, template)
      except MemoryError:
        raise
      except Exception as error:  # pylint: disable=broad-except  # Any damage: try older.
        damaged.append((epoch, f'{type(error).__name__}: {_first_line(error)}'))
        continue
      if damaged:
        self._set_aside(damaged)
      return epoch, state, history
    if damaged:
      listed = '; '.join(f'{os.path.join(self.directory, str(e))}: {why}' for e, why in damaged)
      raise CheckpointsDamaged(
          f'No checkpoint in {self.directory} can be restored ({listed}). Delete '
          f'{self.directory} to start the run over.')
    return None

  def _restore(self, epoch: int, template: TrainState) -> tuple[TrainState, dict[str, Any]]:
    abstract = jax.tree.map(ocp.utils.to_shape_dtype_struct, _as_tree(template))
    restored = self._manager.restore(epoch, args=ocp.args.Composite(
        state=ocp.args.StandardRestore(abstract), history=ocp.args.JsonRestore()))
    tree, history = restored['state'], restored['history']
    if not (isinstance(history, dict) and isinstance(history.get('train'), list)
            and isinstance(history.get('eval'), list)):
      raise ValueError('its history is not {"train": [...], "eval": [...]}')
    nonfinite = [jax.tree_util.keystr(path) for path, leaf in
                 jax.tree_util.tree_leaves_with_path(tree['trainable'])
                 if not np.isfinite(np.asarray(leaf)).all()]
    if nonfinite:
      raise ValueError(f'NaN or infinite values in {", ".join(nonfinite[:5])}')
    return TrainState(tree['step'], tree['trainable'], tree['opt_state']), history

  def _set_aside(self, damaged: list[tuple[int, str]]) -> None:
    """Renames damaged checkpoints out of orbax's sight (kept, for a look or to rename
    back after a passing fault), so the next save after that epoch can be written."""
    self._manager.close()
    try:
      for epoch, why in damaged:
        source = os.path.join(self.directory, str(epoch))
        target = source + DAMAGED_SUFFIX
        while os.path.exists(target):
          target += '_'
        os.replace(source, target)
        message = (f'Checkpoint {source} is damaged ({why}); set aside as {target}, '
                   'resuming from an older one.')
        logging.warning(message)
        print(f'mlae_jax: warning: {message}', file=sys.stderr)
    finally:
      self._manager = self._open()

  def close(self) -> None:
    self._manager.close()


@contextlib.contextmanager
def _quiet_background_failures() -> Iterator[None]:
  """While orbax reads or writes: a failure of its worker threads is raised by the call
  itself (and reported in one line, or handled), so their error logs are held back, and
  their echoes of it (callbacks that find the call's event loop closed) are dropped."""
  _drop_closed_loop_echoes()
  logger = logging.getLogger('absl')
  level = logger.level
  logger.setLevel(logging.CRITICAL)
  try:
    yield
  finally:
    logger.setLevel(level)


def _is_closed_loop_echo(error: BaseException | None, trace: Any) -> bool:
  """asyncio's 'Event loop is closed', raised by the event loop itself."""
  if not (isinstance(error, RuntimeError) and str(error) == 'Event loop is closed'):
    return False
  frames = traceback.extract_tb(trace)
  return bool(frames) and frames[-1].filename.endswith(os.path.join('asyncio', 'base_events.py'))


def _drop_closed_loop_echoes() -> None:
  """Installs (once per process) hooks that drop the 'Event loop is closed' errors that
  orbax's worker threads raise after a failed call, and pass every other error on."""
  if getattr(sys.unraisablehook, 'drops_closed_loop_echoes', False):
    return
  unraisable, thread = sys.unraisablehook, threading.excepthook

  def unraisable_hook(args):
    if not _is_closed_loop_echo(args.exc_value, args.exc_traceback):
      unraisable(args)

  def thread_hook(args):
    if not _is_closed_loop_echo(args.exc_value, args.exc_traceback):
      thread(args)

  unraisable_hook.drops_closed_loop_echoes = True
  sys.unraisablehook, threading.excepthook = unraisable_hook, thread_hook


def _reason(error: BaseException) -> str:
  """The operating system's reason for a failed write ('No space left on device'), found
  in the exception chain or in tensorstore's error text; else the error's first line."""
  seen = error
  while seen is not None:
    if isinstance(seen, OSError) and seen.strerror:
      return seen.strerror
    seen = seen.__cause__ or seen.__context__
  match = re.search(r"os_error_code='(\d+)'", str(error))
  if match:
    return os.strerror(int(match.group(1)))
  return f'{type(error).__name__}: {_first_line(error)}'


def _first_line(error: BaseException) -> str:
  text = str(error).strip().splitlines()
  return text[0][:300] if text else ''


def _as_tree(state: TrainState) -> dict[str, Any]:
  return {'step': state.step, 'trainable': state.trainable, 'opt_state': state.opt_state}
