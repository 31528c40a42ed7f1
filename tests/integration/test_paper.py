"""The paper-figure scripts (`benchmarks/paper/`) in their quick modes.

Each script's `main(['--quick', ...])` runs in a subprocess into a temporary
folder (never over the committed results), with `--json` so that the numbers
behind its Markdown and PNG can be checked here. An XLA compilation cache in
the session's own pytest temp dir (`cache_dir`) lets the scripts share the
compiled functions they have in common, and leaves nothing in a shared place.
`python -m benchmarks.paper.<name> --help` checks the module entry points.
"""

import json
import os
import pathlib
import subprocess
import sys

import numpy as np
import pytest

from benchmarks.paper import depth as depth_script

ROOT = pathlib.Path(__file__).resolve().parent.parent


def cache_dir(tmp_path_factory) -> pathlib.Path:
  """One XLA cache per test session, inside pytest's temp dir."""
  path = tmp_path_factory.getbasetemp() / 'xla_cache'
  path.mkdir(exist_ok=True)
  return path


def jax_env(cache: pathlib.Path | None = None) -> dict:
  env = dict(os.environ)
  if cache is not None:
    env['JAX_COMPILATION_CACHE_DIR'] = str(cache)
    env['JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS'] = '0'
  env['PYTHONPATH'] = os.pathsep.join(
      [str(ROOT)] + [p for p in [env.get('PYTHONPATH')] if p])
  return env


def run_quick(name: str, out: pathlib.Path, cache: pathlib.Path,
              md_name: str | None = None) -> dict:
  """Runs `benchmarks.paper.<name> --quick` with XLA cache `cache`; checks
  its PNG and Markdown (`<md_name>.md`, by default `<name>.md`); returns its
  JSON."""
  md_name = md_name or name
  argv = ['--quick', '--out', str(out), '--json', str(out / f'{name}.json')]
  # Imported, not `-m`: functions defined in `__main__` would get other XLA
  # cache keys than the same functions imported by another script.
  code = (f'from benchmarks.paper import {name}; '
          f'{name}.main({argv!r})')
  proc = subprocess.run(
      [sys.executable, '-c', code],
      cwd=ROOT, env=jax_env(cache), capture_output=True, text=True,
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
  return run_quick('perturbation', tmp_path_factory.mktemp('perturbation'),
                   cache_dir(tmp_path_factory))


@pytest.fixture(scope='module')
def growth(tmp_path_factory):
  return run_quick('growth', tmp_path_factory.mktemp('growth'),
                   cache_dir(tmp_path_factory))


@pytest.fixture(scope='module')
def depth_run(tmp_path_factory):
  out = tmp_path_factory.mktemp('depth')
  return run_quick('depth', out, cache_dir(tmp_path_factory)), out


@pytest.fixture(scope='module')
def depth(depth_run):
  return depth_run[0]


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
      assert run['late_loss'] < 0.5 * run['first_loss']  # and it trains


def test_depth_accuracies_and_best_lr_per_init(depth):
  cfg = depth['config']
  runs = depth['runs']
  assert len(cfg['seeds']) >= 3
  assert set(runs) == {'Fromage', 'SGD (momentum 0.9)', 'Adam'}
  assert depth['inits'] == ['authors', 'he']
  for by_depth in runs.values():
    assert set(by_depth) == {str(d) for d in cfg['depths']}
    for r in by_depth.values():
      for key in ('acc', 'last_epoch_acc'):
        acc = np.asarray(r[key])
        assert acc.shape == (3, 2, len(cfg['seeds']))  # [lr, init, seed]
        assert np.all((acc >= 0) & (acc <= 1))
      acc = np.asarray(r['acc'])
      for i, kind in enumerate(depth['inits']):
        mean = acc[:, i].mean(1)
        j = int(np.argmax(mean))
        assert r['best'][kind]['lr'] == r['lrs'][j]
        assert r['best'][kind]['mean'] == pytest.approx(mean[j])
        assert r['best'][kind]['min'] == pytest.approx(acc[j, i].min())
    # A 1-hidden-layer network trains well in a few hundred steps.
    for kind in depth['inits']:
      assert by_depth[str(cfg['depths'][0])]['best'][kind]['mean'] > 0.8


def test_depth_authors_init_starves_the_input_layers(depth):
  norms = {k: np.asarray(v) for k, v in depth['grad_norms'].items()}
  for v in norms.values():
    assert v.shape == (len(depth['config']['seeds']),
                       depth['config']['grad_depth'])
  factors = {k: np.asarray(v) for k, v in depth['decay_per_layer'].items()}
  # PyTorch's default init: the gradient shrinks by about 2.5x a layer
  # toward the input (some layers underflow to 0); He's keeps it level.
  assert np.all(factors['authors'] > 2)
  assert np.all(np.abs(np.log(factors['he'])) < np.log(1.25))
  assert np.all(norms['he'] > 0)
  assert np.all(norms['authors'][:, 0] < 1e-6 * norms['authors'][:, -1])
  # Even at L = 5, SGD's smallest learning rate trains far worse from it.
  deepest = str(depth['config']['depths'][-1])
  sgd = np.asarray(depth['runs']['SGD (momentum 0.9)'][deepest]['acc'])[2]
  assert sgd[1].mean() > sgd[0].mean() + 0.3


def test_depth_render_from_json_gives_the_same_markdown(depth_run, tmp_path):
  data, out = depth_run
  _, md, _ = depth_script.render(data, str(tmp_path))
  assert pathlib.Path(md).read_text() == (out / 'depth.md').read_text()


@pytest.mark.parametrize('name', ['perturbation', 'growth', 'depth',
                                  'sensitivity'])
def test_scripts_run_as_modules(name):
  proc = subprocess.run(
      [sys.executable, '-m', f'benchmarks.paper.{name}', '--help'],
      cwd=ROOT, env=jax_env(), capture_output=True, text=True,
      timeout=120, check=False,
  )
  assert proc.returncode == 0, proc.stderr[-3000:]
  for flag in ('--quick', '--out', '--json'):
    assert flag in proc.stdout
