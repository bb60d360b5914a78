"""Files written whole or not at all: a temporary name in the same folder, then a rename.

A reader (a resumed run, the sweep runner, a results table) never sees half a file, and
a failed write (a full disk, a lost mount) leaves the previous file, if any, in place.
"""

from __future__ import annotations

import contextlib
import json
import os
import tempfile
from typing import IO, Any, Iterator


@contextlib.contextmanager
def atomic_write(path: str | os.PathLike, mode: str = 'wb') -> Iterator[IO]:
  """Yields a file to write; on success it replaces `path` (readable as the umask
  allows), on any error it is removed and `path` is untouched."""
  path = os.fspath(path)
  directory = os.path.dirname(os.path.abspath(path))
  os.makedirs(directory, exist_ok=True)
  handle, tmp = tempfile.mkstemp(prefix=f'.{os.path.basename(path)}.', suffix='.tmp',
                                 dir=directory)
  try:
    with os.fdopen(handle, mode) as f:
      yield f
      f.flush()
      os.fsync(f.fileno())
    umask = os.umask(0)
    os.umask(umask)
    os.chmod(tmp, 0o666 & ~umask)  # mkstemp's 0600 would hide the file from other users.
    os.replace(tmp, path)
  except BaseException:
    if os.path.exists(tmp):
      os.remove(tmp)
    raise


def write_json(path: str | os.PathLike, value: Any) -> None:
  """`value` as indented JSON, atomically. NaN and infinities are refused (they are not
  JSON, and no result should hold them)."""
  text = json.dumps(value, indent=2, allow_nan=False) + '\n'
  with atomic_write(path, 'w') as f:
    f.write(text)


def read_json(path: str | os.PathLike) -> Any:
  with open(path) as f:
    return json.load(f)
