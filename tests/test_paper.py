"""The paper-figure scripts (`benchmarks/paper/`) in their quick modes.

Each script's `main(['--quick', ...])` runs in a subprocess into a temporary
folder (never over the committed results), with `--json` so that the numbers
behind its Markdown and PNG can be checked here. A persistent XLA compilation
cache (in the system temp dir, shared with tests/test_notebooks.py, whose
`paper_figures.ipynb` runs the same quick configurations from the same
imported modules) saves the compile time of configurations already seen.
`python -m benchmarks.paper.<name> --help` checks the module entry points.
"""

import json
import os
import pathlib
import subprocess
import sys
import tempfile

import numpy as np
import pytest

ROOT = pathlib.Path(__file__).resolve().parent.parent
CACHE_DIR = os.path.join(tempfile.gettempdir(), 'fromage_jax_paper_xla_cache')


def cached_jax_env() -> dict:
  env = dict(os.environ)
  env['JAX_COMPILATION_CACHE_DIR'] = CACHE_DIR
  env['JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS'] = '0'
  env['PYTHONPATH'] = os.pathsep.join(
      [str(ROOT)] + [p for p in [env.get('PYTHONPATH')] if p])
  return env


def run_quick(name: str, out: pathlib.Path, md_name: str | None = None) -> dict:
  """Runs `benchmarks.paper.<name> --quick`; checks its PNG and Markdown
  (`<md_name>.md`, by default `<name>.md`); returns its JSON."""
  md_name = md_name or name
  argv = ['--quick', '--out', str(out), '--json', str(out / f'{name}.json')]
  # Imported, not `-m`: functions defined in `__main__` would get other XLA
  # cache keys than the notebook's.
  code = (f'from benchmarks.paper import {name}; '
          f'{name}.main({argv!r})')
  proc = subprocess.run(
      [sys.executable, '-c', code],
      cwd=ROOT, env=cached_jax_env(), capture_output=True, text=True,
      timeout=300, check=False,
  )
  assert proc.returncode == 0, proc.stderr[-3000:]
  assert os.path.getsize(out / f'{name}.png') > 10_000
  md = (out / f'{md_name}.md').read_text()
  assert md.startswith('# ') and 'Figure' in md.splitlines()[0]
  assert f'![{name}]({name}.png)' in md
  assert 'Mode: quick' in md and 'Machine:' in md
  assert 'wall time' in md.lower()
  return json.loads((out / f'{name}.json').read_text())


@pytest.fixture(scope='module')
def perturbation(tmp_path_factory):
  return run_quick('perturbation', tmp_path_factory.mktemp('perturbation'))


@pytest.fixture(scope='module')
def growth(tmp_path_factory):
  return run_quick('growth', tmp_path_factory.mktemp('growth'))


@pytest.fixture(scope='module')
def depth(tmp_path_factory):
  return run_quick('depth', tmp_path_factory.mktemp('depth'))


def test_perturbation_gradient_change_grows_with_eta(perturbation):
  assert set(perturbation['depths']) == {'2', '16'}
  for ckpts in perturbation['depths'].values():
    assert len(ckpts) >= 2
    for ck in ckpts:
      change = np.asarray(ck['change'])
      assert np.all(np.isfinite(change))
      # Increasing along the slice: overall, and in most consecutive steps.
      assert change[-1] > 10 * change[0]
      assert np.mean(np.diff(change) > 0) >= 0.8
      # Small perturbations change the gradient little (it is continuous).
      assert change[0] < 0.1 * change[-1]


def test_perturbation_deep_network_breaks_down_much_faster(perturbation):
  d2, d16 = perturbation['depths']['2'], perturbation['depths']['16']
  for a, b in zip(d2, d16, strict=True):
    assert b['change'][-1] > 100 * a['change'][-1]
    assert b['loss'][-1] > 10 * b['loss'][0]  # the loss blows up at eta = 1


def test_perturbation_drt_prediction_is_the_formula(perturbation):
  etas = np.asarray(perturbation['config']['etas'])
  for depth, ckpts in perturbation['depths'].items():
    for ck in ckpts:
      np.testing.assert_allclose(ck['drt'], (1 + etas) ** int(depth) - 1,
                                 rtol=2e-3)


def test_perturbation_training_makes_progress(perturbation):
  for ckpts in perturbation['depths'].values():
    assert ckpts[-1]['loss0'] < ckpts[0]['loss0']


def test_growth_lars_compounds_fromage_stays_flat(growth):
  steps = growth['config']['steps']
  for eta in growth['config']['etas']:
    lars = growth['runs'][f'lars/{eta:g}']
    fromage = growth['runs'][f'fromage/{eta:g}']
    pred = (1 + eta**2) ** (steps / 2)
    assert pred > 2
    np.testing.assert_allclose(lars['prediction'], pred, rtol=1e-6)
    np.testing.assert_allclose(lars['final_norm_ratio'], pred, rtol=1e-2)
    np.testing.assert_allclose(fromage['final_norm_ratio'], 1.0, atol=1e-3)
    for run in (lars, fromage):
      assert run['max_cos'] < 1e-4  # the layers are scale-invariant
      assert run['last_loss'] < 0.5 * run['first_loss']  # and it trains


def test_depth_accuracies_bounds_and_best_lr(depth):
  cfg = depth['config']
  runs = depth['runs']
  assert set(runs) == {'Fromage', 'SGD (momentum 0.9)', 'Adam'}
  for d in cfg['depths']:
    np.testing.assert_allclose(depth['bound'][str(d)], 2 ** (1 / d) - 1,
                               rtol=1e-5)
  for name, by_depth in runs.items():
    for r in by_depth.values():
      acc = np.asarray(r['acc'])
      assert acc.shape == (3, len(cfg['seeds']))
      assert np.all((acc >= 0) & (acc <= 1))
      assert r['best_acc'] == pytest.approx(acc.mean(1).max())
      assert r['best_lr'] == r['lrs'][int(np.argmax(acc.mean(1)))]
    # Even a few epochs train a 2-layer network well.
    assert by_depth['2']['best_acc'] > 0.8, name
  # Fromage at 0.001 moves each layer by 0.1% a step: far too slow here.
  fromage2 = np.asarray(runs['Fromage']['2']['acc']).mean(1)
  assert fromage2[0] > fromage2[2] + 0.3


@pytest.mark.parametrize('name', ['perturbation', 'growth', 'depth',
                                  'sensitivity'])
def test_scripts_run_as_modules(name):
  proc = subprocess.run(
      [sys.executable, '-m', f'benchmarks.paper.{name}', '--help'],
      cwd=ROOT, env=cached_jax_env(), capture_output=True, text=True,
      timeout=120, check=False,
  )
  assert proc.returncode == 0, proc.stderr[-3000:]
  for flag in ('--quick', '--out', '--json'):
    assert flag in proc.stdout
