"""A run's workdir: what lives in it, and the rules that keep one run in one workdir.

  config.json           the run's config; written once the workdir is known to hold no
                        other run's (atomically, as every file below but the logs)
  config_changes.jsonl  changes made on resume with explicit permission, one per line
  .lock                 held (flock) by the process training in the workdir
  checkpoints/          orbax checkpoints, named by completed epochs
  metrics.jsonl, tensorboard/
  export/               adapter.npz, adapter_config.json, merged.npz
  results.json          written last: its presence, parsed and complete, means finished
"""

from __future__ import annotations

import contextlib
import datetime
import difflib
import errno
import fcntl
import json
import os
import socket
from typing import Any, Iterator, Mapping, Sequence

import ml_collections

from mlae_jax.files import read_json, write_json
from mlae_jax.training.errors import WorkdirLocked

CONFIG_FILE = 'config.json'
CHANGES_FILE = 'config_changes.jsonl'
LOCK_FILE = '.lock'
CHECKPOINT_DIR = 'checkpoints'
METRICS_FILE = 'metrics.jsonl'
EXPORT_DIR = 'export'
RESULTS_FILE = 'results.json'
# What results.json must hold for the run to count as finished.
RESULT_KEYS = ('task', 'epochs', 'num_eval', 'final_epoch_accuracy',
               'best_of_evaluations_accuracy', 'best_of_evaluations_epoch')

# Fields a re-run may change freely: where files live, display, and the baselines
# trained beside the run (each in its own workdir, checked there).
UNCHECKED_FIELDS = ('progress_bar', 'cache_dir', 'download', 'data.data_dir', 'data.download',
                    'baselines')
# Fields a resumed run may change when asked to explicitly (`allow_changes`): they
# extend or re-schedule a run without changing what it has trained so far.
RESUMABLE_FIELDS = ('epochs', 'eval_every_epochs', 'eval_last_epochs', 'checkpoint_every_epochs',
                    'keep_checkpoints', 'eval_batch_size', 'export_merged')
_ABSENT = '<absent>'


class WorkdirConflict(ValueError):
  """A workdir holds another run (another config), or cannot hold this one."""


def _fields(tree: Mapping[str, Any], prefix: str = '') -> dict[str, Any]:
  """'group.field' -> value of a config as config.json stores it."""
  flat = {}
  for key, value in tree.items():
    if isinstance(value, Mapping):
      flat.update(_fields(value, f'{prefix}{key}.'))
    else:
      flat[f'{prefix}{key}'] = value
  return flat


def config_differences(saved: Mapping[str, Any],
                       config: ml_collections.ConfigDict) -> dict[str, tuple[Any, Any]]:
  """field -> (saved, new) for every field that differs, except UNCHECKED_FIELDS. A field
  only one side has (a config saved by another version) counts as a difference, shown
  as '<absent>' on the other side: it may have changed how the run trains."""
  old, new = _fields(saved), _fields(json.loads(config.to_json_best_effort()))
  return {key: (old.get(key, _ABSENT), new.get(key, _ABSENT)) for key in sorted(set(old) | set(new))
          if key not in UNCHECKED_FIELDS and old.get(key, _ABSENT) != new.get(key, _ABSENT)}


def describe_differences(differences: Mapping[str, tuple[Any, Any]], limit: int = 8) -> str:
  listed = [f'{key}: {old!r} there, {new!r} now' for key, (old, new) in differences.items()]
  more = f'; and {len(listed) - limit} more' if len(listed) > limit else ''
  return '; '.join(listed[:limit]) + more


def check_allowed(allow_changes: Sequence[str]) -> tuple[str, ...]:
  """`allow_changes` if every name is a RESUMABLE_FIELDS field, else a clear error."""
  for name in allow_changes:
    if name not in RESUMABLE_FIELDS:
      close = difflib.get_close_matches(name, RESUMABLE_FIELDS, n=1)
      hint = f' (did you mean {close[0]}?)' if close else ''
      raise WorkdirConflict(f'config.{name} cannot change within a run{hint}; fields that can: '
                            f'{", ".join(RESUMABLE_FIELDS)}.')
  return tuple(allow_changes)


def saved_config(workdir: str) -> dict[str, Any] | None:
  """The workdir's config.json, None if it has none; a clear error if unreadable."""
  file = os.path.join(workdir, CONFIG_FILE)
  if not os.path.exists(file):
    return None
  try:
    saved = read_json(file)
  except (OSError, ValueError) as error:
    raise WorkdirConflict(f'{file} is unreadable ({error}); the workdir cannot be checked. '
                          'Move the workdir away, or delete it to start over.') from None
  if not isinstance(saved, dict):
    raise WorkdirConflict(f'{file} is not a config (a JSON object); move the workdir away.')
  return saved


def check_config(workdir: str, config: ml_collections.ConfigDict,
                 allow_changes: Sequence[str] = ()) -> dict[str, tuple[Any, Any]]:
  """Raises WorkdirConflict if `workdir` holds a run of another config, listing the
  fields that differ; returns the differences `allow_changes` permits (to record)."""
  allowed = set(check_allowed(allow_changes))
  saved = saved_config(workdir)
  if saved is None:
    left = [name for name in (CHECKPOINT_DIR, RESULTS_FILE)
            if os.path.exists(os.path.join(workdir, name))]
    if left:
      raise WorkdirConflict(f'{workdir} holds {" and ".join(left)} but no {CONFIG_FILE}, so the '
                            'run it holds cannot be checked; move it away or delete it.')
    return {}
  differences = config_differences(saved, config)
  refused = {k: v for k, v in differences.items() if k not in allowed}
  if refused:
    resumable = [k for k in refused if k in RESUMABLE_FIELDS]
    hint = (f' To change {", ".join(resumable)} on resume, say so: --allow_changes='
            f'{",".join(resumable)}.' if resumable and len(resumable) == len(refused) else '')
    if any(_ABSENT in pair for pair in refused.values()):
      hint += (f' Fields shown as {_ABSENT!r} belong to another version of mlae_jax: finish '
               'the run with the version that started it, or start over.')
    raise WorkdirConflict(
        f'{workdir} holds a run with another config ({describe_differences(refused)}). Use '
        f'another workdir for other settings, or delete this one to start over.{hint}')
  shorter = differences.get('epochs')
  if shorter and isinstance(shorter[0], int) and shorter[1] < shorter[0]:
    raise WorkdirConflict(f'{workdir} holds a run of {shorter[0]} epochs; it cannot be '
                          f'shortened to {shorter[1]}. Use a new workdir.')
  return {k: v for k, v in differences.items() if k in allowed}


def prepare(workdir: str) -> None:
  """Creates `workdir` (and its parents), with a one-line error naming the path if it
  cannot be a writable folder."""
  if os.path.exists(workdir) and not os.path.isdir(workdir):
    raise WorkdirConflict(f'Workdir {workdir} is a file, not a folder; choose another path.')
  try:
    os.makedirs(workdir, exist_ok=True)
  except OSError as error:
    raise WorkdirConflict(f'Cannot create workdir {workdir}: {error.strerror} '
                          f'({error.filename}); choose another path.') from None
  if not os.access(workdir, os.W_OK | os.X_OK):
    raise WorkdirConflict(f'Workdir {workdir} is not writable; choose another path or fix its '
                          'permissions.')


def record_config(workdir: str, config: ml_collections.ConfigDict,
                  changes: Mapping[str, tuple[Any, Any]]) -> None:
  """Writes config.json (after `check_config`, once the run has resumed); allowed
  changes are appended to config_changes.jsonl, and the results of the run before them
  removed (the run is unfinished again until it reaches its new end)."""
  if changes:
    line = json.dumps({'time': datetime.datetime.now().isoformat(timespec='seconds'),
                       'changes': {k: {'from': old, 'to': new}
                                   for k, (old, new) in changes.items()}})
    with open(os.path.join(workdir, CHANGES_FILE), 'a') as f:
      f.write(line + '\n')
    if os.path.exists(os.path.join(workdir, RESULTS_FILE)):
      os.remove(os.path.join(workdir, RESULTS_FILE))
  write_json(os.path.join(workdir, CONFIG_FILE), json.loads(config.to_json_best_effort()))


def recorded_changes(workdir: str) -> list[dict[str, Any]]:
  """The allowed changes recorded in the workdir, oldest first."""
  file = os.path.join(workdir, CHANGES_FILE)
  if not os.path.exists(file):
    return []
  with open(file) as f:
    return [json.loads(line) for line in f if line.strip()]


def latest_checkpoint_epoch(workdir: str) -> int | None:
  """The epochs completed by the newest checkpoint in `workdir` (orbax names its steps
  by number; training numbers them by epoch), for progress messages only."""
  directory = os.path.join(workdir, CHECKPOINT_DIR)
  if not os.path.isdir(directory):
    return None
  epochs = [int(name) for name in os.listdir(directory) if name.isdigit()]
  return max(epochs, default=None)


def results_complete(workdir: str) -> bool:
  """Whether the workdir holds a results.json that parses and has every RESULT_KEYS."""
  try:
    results = read_json(os.path.join(workdir, RESULTS_FILE))
  except (OSError, ValueError):
    return False
  return isinstance(results, dict) and all(key in results for key in RESULT_KEYS)


@contextlib.contextmanager
def locked(workdir: str) -> Iterator[None]:
  """Holds the workdir's lock while the block runs: a second process is refused with
  who holds it. The operating system releases it when the holder exits, however it
  exits, so a killed run never leaves it stuck."""
  lock_path = os.path.join(workdir, LOCK_FILE)
  handle = open(lock_path, 'a+')
  try:
    try:
      fcntl.flock(handle, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except OSError as error:
      if error.errno not in (errno.EAGAIN, errno.EACCES, errno.EWOULDBLOCK):
        raise
      handle.seek(0)
      holder = handle.read().strip() or 'another process'
      raise WorkdirLocked(f'Workdir {workdir} is in use by {holder}; wait for that run to end '
                          'or stop it (a stopped run resumes from its last checkpoint).') from None
    handle.seek(0)
    handle.truncate()
    handle.write(f'process {os.getpid()} on {socket.gethostname()} since '
                 f'{datetime.datetime.now().isoformat(timespec="seconds")}\n')
    handle.flush()
    yield
  finally:
    handle.close()  # Closing releases the lock.
