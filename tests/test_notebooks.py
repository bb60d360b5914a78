"""The Colab notebooks run top to bottom in small mode, as CI runs them, and are what
notebooks/build_notebooks.py generates (outputs cleared)."""

import importlib.util
import os
import re
import sys
import time

import pytest

nbclient = pytest.importorskip('nbclient')
nbformat = pytest.importorskip('nbformat')

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
NOTEBOOK_DIR = os.path.join(REPO, 'notebooks')
NAMES = ('quick_start', 'pytorch_cross_check', 'analysis')


def _generator():
  spec = importlib.util.spec_from_file_location(
      'build_notebooks', os.path.join(NOTEBOOK_DIR, 'build_notebooks.py'))
  module = importlib.util.module_from_spec(spec)
  spec.loader.exec_module(module)
  return module


def test_notebooks_are_generated_and_cleared():
  generator = _generator()
  assert set(generator.NOTEBOOKS) == set(NAMES)
  for name in NAMES:
    with open(os.path.join(NOTEBOOK_DIR, f'{name}.ipynb')) as f:
      committed = f.read()
    assert committed == generator.render(name), (
        f'{name}.ipynb is stale: run python notebooks/build_notebooks.py')
    notebook = nbformat.reads(committed, as_version=4)
    assert all(not cell.get('outputs') for cell in notebook.cells if cell.cell_type == 'code')
    assert f'notebooks/{name}.ipynb' in notebook.cells[0].source  # The Colab link.


def test_python3_kernel_is_this_interpreter():
  """The 'python3' kernel runs this venv's Python: ipykernel's built-in spec (command
  'python', which jupyter_client replaces by sys.executable), unless another spec of
  that name shadows it."""
  from jupyter_client.kernelspec import KernelSpecManager

  command = KernelSpecManager().get_kernel_spec('python3').argv[0]
  assert command in ('python', 'python3', sys.executable), (
      f"The 'python3' kernelspec runs {command}, not {sys.executable}; remove that kernelspec "
      "or run `python -m ipykernel install --user` from this environment.")


@pytest.mark.parametrize('name', NAMES)
def test_notebook_runs_in_small_mode(name, tmp_path):
  """Executes every cell in a fresh python3 kernel of this interpreter; a cell error
  fails the test. The kernel works in a temporary directory (the notebooks write
  runs/ and checkpoints/ there) and imports mlae_jax from this checkout."""
  with open(os.path.join(NOTEBOOK_DIR, f'{name}.ipynb')) as f:
    notebook = nbformat.read(f, as_version=4)
  python_path = os.pathsep.join(p for p in (REPO, os.environ.get('PYTHONPATH')) if p)
  env = dict(os.environ, MLAE_NOTEBOOK_SMALL='1', PYTHONPATH=python_path,
             MLAE_JAX_CACHE=str(tmp_path / 'cache'))
  client = nbclient.NotebookClient(notebook, kernel_name='python3', timeout=600,
                                   resources={'metadata': {'path': str(tmp_path)}})
  started = time.time()
  client.execute(env=env)
  print(f'{name}: {time.time() - started:.1f} s in small mode')
  outputs = ''.join(output.get('text', '') for cell in notebook.cells
                    for output in cell.get('outputs', []))
  assert 'mode: small' in outputs
  if name != 'pytorch_cross_check':  # The training notebooks measure their runs' time first.
    assert re.search(r'about \d+ (seconds|minutes) for \d+ epochs on \d+ x \S+ \(', outputs)
