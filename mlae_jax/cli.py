"""Command-line plumbing of the entry points: flags that cannot be parsed (a missing
config file, a misspelled `--config.*` field, a value of the wrong type) end the
command with one line naming the file or the nearest valid field, not a traceback."""

from __future__ import annotations

import difflib
import importlib.util
import os
import sys
from typing import Any, Callable, Sequence

from absl import flags


def _config_file(argv: Sequence[str]) -> tuple[str, str]:
  """(path, argument) of `--config=path[:argument]`."""
  spec = next((a.split('=', 1)[1] for a in argv if a.startswith('--config=')), '')
  path, _, argument = spec.partition(':')
  return path, argument


def _load(path: str, argument: str) -> Any:
  spec = importlib.util.spec_from_file_location('mlae_jax_cli_config', path)
  module = importlib.util.module_from_spec(spec)
  spec.loader.exec_module(module)
  return module.get_config(argument) if argument else module.get_config()


def explain(error: Exception, argv: Sequence[str], base: Any = None,
            names: Sequence[str] = ('config',)) -> str:
  """What is wrong with the config flags: the config file (when `base` is None, the
  `--config=` file's config is the base), or the first `--<name>.<field>` (for the
  config flags `names`) that is not a field of `base`, with the nearest valid one."""
  if base is None:
    path, argument = _config_file(argv)
    if not os.path.isfile(path):
      return f'Cannot load config file {path!r}: no such file (e.g. configs/vtab.py:svhn).'
    try:
      base = _load(path, argument)
    except Exception as load_error:  # pylint: disable=broad-except  # Reported, not raised.
      return f'Cannot load config file {path}: {type(load_error).__name__}: {load_error}'
  for item in argv:
    name = next((n for n in names if item.startswith(f'--{n}.')), None)
    if name is None:
      continue
    field = item[len(f'--{name}.'):].split('=', 1)[0]
    node, parts = base, field.split('.')
    for depth, part in enumerate(parts):
      if not hasattr(node, 'keys') or part not in node:
        close = difflib.get_close_matches(part, list(node.keys()) if hasattr(node, 'keys')
                                          else [], n=1, cutoff=0.5)
        suggestion = '.'.join(parts[:depth] + close[:1] + parts[depth + 1:])
        hint = f'; did you mean {name}.{suggestion}?' if close else '.'
        return f'Unknown config field {name}.{field} (in {item}){hint}'
      node = node[part]
  first = str(error).strip().splitlines()
  return f'Bad flags: {type(error).__name__}: {first[0] if first else ""}'


def one_line(message: str) -> str:
  """`message` folded onto one line (messages from other libraries may span several)."""
  return ' '.join(line.strip() for line in str(message).splitlines() if line.strip())


def exit_with(error: BaseException | str) -> None:
  """Ends the command with status 1 and one line saying what is wrong."""
  sys.exit(f'mlae_jax: {one_line(error)}')


def config_value(read: Callable[[], Any], base: Any = None,
                 names: Sequence[str] = ('config',)) -> Any:
  """`read()` (a config flag's value, which ml_collections builds lazily), or the end
  of the command with one line saying what is wrong with the config flags."""
  try:
    return read()
  except Exception as error:  # pylint: disable=broad-except  # Config files run code.
    exit_with(explain(error, sys.argv, base, names))


def flags_parser(base: Any = None,
                 names: Sequence[str] = ('config',)) -> Callable[[list[str]], list[str]]:
  """A `flags_parser` for `absl.app.run` that turns flag errors into one line; `base`
  and `names` as `explain` takes them."""
  def parse(argv: list[str]) -> list[str]:
    try:
      return flags.FLAGS(argv)
    except flags.Error as error:  # absl's own: a value of the wrong type, an unknown flag.
      message = str(error).strip()
      if '\n' in message:  # A config file that raised: its traceback, folded into the text.
        message = explain(error, argv, base, names)
      exit_with(message)
    except Exception as error:  # pylint: disable=broad-except  # Config files run code.
      exit_with(explain(error, argv, base, names))
  return parse
