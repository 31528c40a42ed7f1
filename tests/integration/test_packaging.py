"""The sdist and wheel `python -m build` makes: contents, metadata, twine check.

Builds without isolation (no download), with `build`, `twine` and the
`[build-system]` requirements that the test extra installs.
"""

from email.parser import HeaderParser
import shutil
import subprocess
import sys
import tarfile
import zipfile

import build
import pytest

from tests.helpers import ROOT


@pytest.fixture(scope='module')
def dists(tmp_path_factory):
  """`{'sdist': path, 'wheel': path}`, the wheel built from the sdist."""
  # The backend's own version first: an old setuptools fails on the metadata.
  unmet = [
      chain for req in build.ProjectBuilder(ROOT).build_system_requires
      for chain in build.check_dependency(req)
  ]
  assert not unmet, 'the build needs ' + ', '.join(
      ' -> '.join(c) for c in unmet)
  out = tmp_path_factory.mktemp('dist')
  # From a copy: building writes fromage_jax.egg-info into the source tree.
  src = shutil.copytree(ROOT, out / 'src', ignore=shutil.ignore_patterns(
      '.git', '*.egg-info', '__pycache__', '.*_cache', '.hypothesis',
      '.benchmarks', 'build', 'dist', 'demo_results',
  ))
  proc = subprocess.run(
      [sys.executable, '-m', 'build', '--no-isolation', '--outdir', str(out),
       str(src)],
      capture_output=True, text=True, timeout=600, check=False,
  )
  assert proc.returncode == 0, proc.stdout[-4000:] + proc.stderr[-4000:]
  (sdist,) = out.glob('*.tar.gz')
  (wheel,) = out.glob('*.whl')
  return {'sdist': sdist, 'wheel': wheel}


def _sdist_names(path):
  with tarfile.open(path) as tar:
    # Drop the leading `fromage_jax-<version>/`.
    return {n.split('/', 1)[1] for n in tar.getnames() if '/' in n}


def _wheel_names(path):
  with zipfile.ZipFile(path) as whl:
    return set(whl.namelist())


def _source_files(*dirs, pattern='*.py'):
  return {
      p.relative_to(ROOT).as_posix()
      for d in dirs for p in (ROOT / d).rglob(pattern)
      if '__pycache__' not in p.parts
  }


def test_wheel_holds_the_library_demo_and_examples_only(dists):
  names = _wheel_names(dists['wheel'])
  library = _source_files('fromage_jax')
  assert 'fromage_jax/testing.py' in library
  assert 'fromage_jax/demo.py' in library
  assert 'fromage_jax/examples/checkpointing.py' in library
  assert library | {'fromage_jax/py.typed'} <= names
  version = dists['wheel'].name.split('-')[1]
  others = {n.split('/', 1)[0] for n in names} - {'fromage_jax'}
  assert others == {f'fromage_jax-{version}.dist-info'}  # no tests/, ...


def test_sdist_holds_what_its_tests_need(dists):
  names = _sdist_names(dists['sdist'])
  tests = _source_files('tests')
  assert {'tests/conftest.py', 'tests/helpers.py',
          'tests/multidevice/worker.py'} <= tests
  assert tests <= names
  assert _source_files('fromage_jax', 'benchmarks') <= names
  assert _source_files('notebooks', pattern='*.ipynb') <= names
  assert {'LICENSE', 'CITATION.cff', 'CHANGELOG.md', 'README.md',
          'pyproject.toml', 'MANIFEST.in'} <= names


def test_metadata_is_what_the_package_index_shows(dists):
  with zipfile.ZipFile(dists['wheel']) as whl:
    (path,) = [n for n in whl.namelist() if n.endswith('.dist-info/METADATA')]
    meta = HeaderParser().parsestr(whl.read(path).decode())
  assert meta['License-Expression'] == 'Apache-2.0'
  assert meta.get_all('License-File') == ['LICENSE']
  assert meta['Author'] or meta['Author-email']
  assert meta['Keywords']
  classifiers = meta.get_all('Classifier')
  for minor in range(11, 14):  # requires-python >= 3.11
    assert f'Programming Language :: Python :: 3.{minor}' in classifiers
  assert 'Typing :: Typed' in classifiers
  assert any(url.startswith('Paper, https://arxiv.org/abs/2002.03432')
             for url in meta.get_all('Project-URL'))
  assert meta['Description-Content-Type'] == 'text/markdown'


def test_twine_check_passes(dists):
  proc = subprocess.run(
      [sys.executable, '-m', 'twine', 'check', '--strict',
       str(dists['sdist']), str(dists['wheel'])],
      capture_output=True, text=True, timeout=300, check=False,
  )
  assert proc.returncode == 0, proc.stdout + proc.stderr
