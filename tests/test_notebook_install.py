"""The notebooks' install and storage cells decide right in each environment. Their
sources come from notebooks/build_notebooks.py and run here, as a kernel would run
them after the settings cell, under a faked Colab (`google.colab` in sys.modules),
faked import outcomes (importlib.util.find_spec) and a recording subprocess.run."""

import ast
import contextlib
import importlib.machinery
import importlib.util
import io
import os
import re
import shlex
import subprocess
import sys
import types

import pytest

from mlae_jax.checkpoints.download import default_cache_dir

pytest.importorskip('nbformat')  # The generator writes notebooks with it.

REPO_ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
FORK = 'someone/mlae_jax'


def _generator():
  spec = importlib.util.spec_from_file_location(
      'build_notebooks', os.path.join(REPO_ROOT, 'notebooks', 'build_notebooks.py'))
  module = importlib.util.module_from_spec(spec)
  spec.loader.exec_module(module)
  return module


GENERATOR = _generator()


def _install_requires() -> list[str]:
  """setup.py's install_requires, read here independently of the generator."""
  with open(os.path.join(REPO_ROOT, 'setup.py')) as f:
    source = f.read()
  block = re.search(r'install_requires=(\[.*?\]),\n', source, re.S).group(1)
  return ast.literal_eval(block)


class RecordingRun:
  """Stands in for subprocess.run: records each command, returns `returncode`."""

  def __init__(self, returncode: int = 0):
    self.commands: list[list[str]] = []
    self.returncode = returncode

  def __call__(self, command, *args, **kwargs):
    self.commands.append(list(command))
    return subprocess.CompletedProcess(command, self.returncode)


def _fake_environment(monkeypatch, *, colab: bool, present: dict[str, bool],
                      returncode: int = 0) -> tuple[RecordingRun, list[str]]:
  """Colab or not, the import outcome of each module in `present`, a recording
  subprocess.run; returns it and the list that records Drive mounts."""
  mounts: list[str] = []
  if colab:
    colab_module = types.ModuleType('google.colab')
    colab_module.drive = types.SimpleNamespace(mount=mounts.append)
    monkeypatch.setitem(sys.modules, 'google.colab', colab_module)
  else:
    monkeypatch.delitem(sys.modules, 'google.colab', raising=False)
  real_find_spec = importlib.util.find_spec

  def find_spec(name, package=None):
    if name in present:
      return importlib.machinery.ModuleSpec(name, None) if present[name] else None
    return real_find_spec(name, package)

  monkeypatch.setattr(importlib.util, 'find_spec', find_spec)
  run = RecordingRun(returncode)
  monkeypatch.setattr(subprocess, 'run', run)
  return run, mounts


def _run_install(monkeypatch, *, colab: bool, installed: bool, tensorflow: bool,
                 repo: str | None = None, extras: tuple[str, ...] = (),
                 returncode: int = 0) -> tuple[list[list[str]], RuntimeError | None]:
  """Runs the settings cell, then the install cell (with REPO set to `repo`, as a user
  edits it); returns the pip commands it ran and the RuntimeError it raised, if any."""
  run, _ = _fake_environment(monkeypatch, colab=colab, returncode=returncode,
                             present={'mlae_jax': installed, 'tensorflow': tensorflow})
  source = GENERATOR.install(extras)
  if repo is not None:
    source, count = re.subn(r'^REPO = .*$', f'REPO = {repo!r}', source, flags=re.M)
    assert count == 1
  namespace: dict = {}
  with contextlib.redirect_stdout(io.StringIO()):  # Its 'mode: ...' line.
    exec(GENERATOR.settings(training=False), namespace)
  assert namespace['IN_COLAB'] == colab
  try:
    exec(source, namespace)
  except RuntimeError as error:
    return run.commands, error
  return run.commands, None


@pytest.mark.parametrize('colab', [False, True])
def test_importable_package_installs_nothing(monkeypatch, capsys, colab):
  """Even in Colab with the placeholder REPO: a kernel run from a checkout (as CI) or
  with mlae_jax installed gets no pip call and one line saying so."""
  commands, error = _run_install(monkeypatch, colab=colab, installed=True, tensorflow=True)
  assert commands == [] and error is None
  assert capsys.readouterr().out.strip().splitlines() == [
      'mlae_jax imports already (installed, or run from a checkout): nothing to install.']


@pytest.mark.parametrize('extras, command', [((), 'pip install -e .'),
                                             (('timm',), 'pip install -e . timm')])
def test_outside_colab_asks_for_a_checkout_install(monkeypatch, extras, command):
  commands, error = _run_install(monkeypatch, colab=False, installed=False, tensorflow=True,
                                 repo=FORK, extras=extras)
  assert commands == []
  assert 'outside Colab this cell installs nothing' in str(error)
  assert f'`{command}`' in str(error)


def test_placeholder_repository_in_colab_is_a_clear_error(monkeypatch):
  assert GENERATOR.GITHUB_REPO == GENERATOR.PLACEHOLDER_REPO  # Until one is published.
  commands, error = _run_install(monkeypatch, colab=True, installed=False, tensorflow=True)
  assert commands == []
  message = str(error)
  assert f"REPO = '{GENERATOR.PLACEHOLDER_REPO}' is a placeholder" in message
  assert "Set REPO in this cell to the 'owner/name' of your fork" in message
  assert '\n' not in message  # One paragraph.


@pytest.mark.parametrize('extras', [(), ('timm',)])
def test_colab_tensorflow_is_kept(monkeypatch, capsys, extras):
  """With TensorFlow importable: mlae_jax without its dependencies, then setup.py's
  requirements except tensorflow-cpu (and the notebook's extras)."""
  commands, error = _run_install(monkeypatch, colab=True, installed=False, tensorflow=True,
                                 repo=FORK, extras=extras)
  assert error is None
  pip = [sys.executable, '-m', 'pip', 'install', '-q']
  requires = _install_requires()
  assert any(r.startswith('tensorflow-cpu') for r in requires)
  assert commands == [
      pip + ['--no-deps', f'mlae_jax @ git+https://github.com/{FORK}'],
      pip + [r for r in requires if not r.startswith('tensorflow-cpu')] + list(extras)]
  assert capsys.readouterr().out.strip() == f'Installed mlae_jax from https://github.com/{FORK}.'


def test_colab_without_tensorflow_installs_with_dependencies(monkeypatch):
  commands, error = _run_install(monkeypatch, colab=True, installed=False, tensorflow=False,
                                 repo=FORK, extras=('timm',))
  assert error is None
  assert commands == [[sys.executable, '-m', 'pip', 'install', '-q',
                           f'mlae_jax @ git+https://github.com/{FORK}', 'timm']]


def test_failed_pip_run_names_the_command(monkeypatch):
  commands, error = _run_install(monkeypatch, colab=True, installed=False, tensorflow=True,
                                 repo=FORK, returncode=1)
  assert len(commands) == 1  # Stops at the first failure.
  assert str(error) == 'pip failed (its output is above): ' + shlex.join(
      [sys.executable, '-m', 'pip', 'install', '-q', '--no-deps',
       f'mlae_jax @ git+https://github.com/{FORK}'])


def _run_storage(monkeypatch, *, colab: bool, use_drive: bool) -> tuple[dict, list[str]]:
  """Runs the training notebooks' settings cell with USE_DRIVE set, then the storage cell."""
  _, mounts = _fake_environment(monkeypatch, colab=colab, present={})
  monkeypatch.delenv('MLAE_JAX_CACHE', raising=False)
  settings, count = re.subn(r'^USE_DRIVE = .*$', f'USE_DRIVE = {use_drive}',
                            GENERATOR.settings(training=True), flags=re.M)
  assert count == 1
  namespace: dict = {}
  exec(settings, namespace)
  exec(GENERATOR.STORAGE, namespace)
  return namespace, mounts


def test_without_drive_runs_stay_in_the_working_directory(monkeypatch, tmp_path):
  monkeypatch.chdir(tmp_path)
  namespace, mounts = _run_storage(monkeypatch, colab=True, use_drive=False)
  assert namespace['ROOT'] == str(tmp_path)
  assert mounts == [] and 'MLAE_JAX_CACHE' not in os.environ


def test_drive_in_colab_holds_runs_and_checkpoint_cache(monkeypatch):
  namespace, mounts = _run_storage(monkeypatch, colab=True, use_drive=True)
  assert mounts == ['/content/drive']
  assert namespace['ROOT'] == '/content/drive/MyDrive/mlae_jax'
  assert os.environ['MLAE_JAX_CACHE'] == '/content/drive/MyDrive/mlae_jax/cache'
  assert default_cache_dir() == os.environ['MLAE_JAX_CACHE']


def test_drive_outside_colab_is_a_clear_error(monkeypatch):
  with pytest.raises(RuntimeError, match='works only in Google Colab. Set USE_DRIVE = False'):
    _run_storage(monkeypatch, colab=False, use_drive=True)
  assert 'MLAE_JAX_CACHE' not in os.environ


def test_readme_badge_uses_the_generator_repository():
  """The README's Colab link names the repository the notebooks install from, and says
  so while that is the placeholder."""
  with open(os.path.join(REPO_ROOT, 'README.md')) as f:
    readme = f.read()
  links = re.findall(r'colab\.research\.google\.com/github/([^/]+/[^/]+)/', readme)
  assert links and set(links) == {GENERATOR.GITHUB_REPO}
  if GENERATOR.GITHUB_REPO == GENERATOR.PLACEHOLDER_REPO:
    assert f'`{GENERATOR.PLACEHOLDER_REPO}` in the links is a placeholder' in readme
