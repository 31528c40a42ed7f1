"""The notebooks in `notebooks/` execute top to bottom without errors.

They run in a fresh kernel with nbclient (in the notebooks' folder, as a user
would run them); the stored copies are not modified, and what the kernel
writes (IPython's profile, the notebooks' temporary folders) goes to pytest's
`tmp_path`, so a run leaves nothing behind. The kernel shares
tests/test_paper.py's XLA compilation cache (the same folder inside this
session's pytest temp dir), so `paper_figures.ipynb` (which runs the quick
modes of `benchmarks/paper/`) reuses its compiles.
"""

import os
import pathlib

from nbclient import NotebookClient
import nbformat
import pytest

from tests.helpers import ROOT

NOTEBOOKS = ROOT / 'notebooks'


def execute(name: str, monkeypatch, tmp_path) -> nbformat.NotebookNode:
  # tests/test_paper.py's session cache: `tmp_path_factory.getbasetemp()`.
  cache = tmp_path.parent / 'xla_cache'
  # The kernel inherits this environment: IPython would create
  # ~/.ipython/profile_default, and `tempfile.mkdtemp` a folder in /tmp.
  monkeypatch.setenv('IPYTHONDIR', str(tmp_path / 'ipython'))
  monkeypatch.setenv('TMPDIR', str(tmp_path))
  monkeypatch.setenv('JAX_COMPILATION_CACHE_DIR', str(cache))
  monkeypatch.setenv('JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS', '0')
  # This checkout, installed or not.
  monkeypatch.setenv('PYTHONPATH', os.pathsep.join(
      [str(ROOT)] + [p for p in [os.environ.get('PYTHONPATH')] if p]))
  nb = nbformat.read(NOTEBOOKS / name, as_version=4)
  client = NotebookClient(
      nb, timeout=240, kernel_name='python3',
      resources={'metadata': {'path': str(NOTEBOOKS)}},
  )
  client.execute()  # raises CellExecutionError on the first failing cell
  return nb


def outputs(nb, output_type=None):
  for cell in nb.cells:
    if cell.cell_type == 'code':
      for out in cell.get('outputs', []):
        if output_type is None or out.output_type == output_type:
          yield out


@pytest.mark.parametrize('name', ['quickstart.ipynb', 'paper_figures.ipynb'])
def test_stored_notebook_has_outputs(name):
  nb = nbformat.read(NOTEBOOKS / name, as_version=4)
  code = [c for c in nb.cells if c.cell_type == 'code']
  assert code and all(c.get('execution_count') for c in code), name
  assert not list(outputs(nb, 'error'))
  assert any('image/png' in o.get('data', {}) for o in outputs(nb))


def test_quickstart_executes(monkeypatch, tmp_path):
  nb = execute('quickstart.ipynb', monkeypatch, tmp_path)
  assert not list(outputs(nb, 'error'))
  images = [o for o in outputs(nb) if 'image/png' in o.get('data', {})]
  assert len(images) == 1


def test_paper_figures_executes(monkeypatch, tmp_path):
  nb = execute('paper_figures.ipynb', monkeypatch, tmp_path)
  assert not list(outputs(nb, 'error'))
  images = [o for o in outputs(nb) if 'image/png' in o.get('data', {})]
  assert len(images) == 3
  # The notebook's figures went to a temporary folder under tmp_path.
  assert list(tmp_path.glob('paper_figures_*/depth.png'))


def test_notebooks_folder_holds_the_two_notebooks():
  names = {p.name for p in pathlib.Path(NOTEBOOKS).glob('*.ipynb')}
  assert {'quickstart.ipynb', 'paper_figures.ipynb'} <= names
