"""The paper-figure scripts (`benchmarks/paper/`) in their quick modes.

Each script's `main(['--quick', ...])` runs in a subprocess into a temporary
folder (never over the committed results) and writes its JSON there, so that
the numbers behind its Markdown and PNG can be checked here. `python -m benchmarks.paper.<name> --help` checks the
module entry points.
"""

import importlib
import json
import subprocess
import sys

import jax
import numpy as np
import pytest

from benchmarks import common
from benchmarks import render
from tests import helpers

SCRIPTS = ('perturbation', 'growth', 'depth')


@pytest.fixture(scope='module')
def quick_runs(tmp_path_factory, xla_cache):
  """`runs(name)`: the JSON and folder of script `name`'s quick run, made
  once."""
  done = {}

  def runs(name):
    if name not in done:
      out = tmp_path_factory.mktemp(name)
      done[name] = helpers.run_quick(name, out, xla_cache), out
    return done[name]

  return runs


@pytest.fixture
def perturbation(quick_runs):
  return quick_runs('perturbation')[0]


@pytest.fixture
def growth(quick_runs):
  return quick_runs('growth')[0]


@pytest.fixture
def depth(quick_runs):
  return quick_runs('depth')[0]


@pytest.mark.parametrize('name', SCRIPTS)
def test_quick_json_records_its_run(quick_runs, name):
  data, _ = quick_runs(name)
  module = importlib.import_module(data['script'])
  assert module.NAME == name
  assert data['mode'] == 'quick'
  assert data['config'] == json.loads(json.dumps(
      common.to_jsonable(module.QUICK)))
  assert data['versions']['jax'] == jax.__version__
  assert data['wall'] > 0 and data['machine'] and data['date']


@pytest.mark.parametrize('name', SCRIPTS)
def test_page_and_figure_are_the_json_rendered_again(quick_runs, name,
                                                     tmp_path):
  data, out = quick_runs(name)
  page = render.render(out / f'{name}.json', tmp_path / f'{name}.md')
  assert page.read_text() == (out / f'{name}.md').read_text()
  assert (tmp_path / f'{name}.png').stat().st_size > 10_000


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


def test_growth_figure_follows_the_prediction(growth):
  """The curves the figure draws: LARS's norms compound as
  `(1 + eta**2)**(t/2)`, Fromage's stay put."""
  for run in growth['runs'].values():
    steps = np.asarray(run['curve']['step'])
    ratios = np.asarray(run['curve']['norm_ratio'])  # [step, layer]
    assert ratios.shape == (len(steps), growth['config']['depth'])
    want = ((1 + run['eta']**2) ** (steps / 2) if run['rule'] == 'lars'
            else np.ones(len(steps)))
    np.testing.assert_allclose(ratios, np.broadcast_to(want[:, None],
                                                       ratios.shape),
                               rtol=1e-2)


@pytest.mark.parametrize('name', ['perturbation', 'growth', 'depth',
                                  'sensitivity', 'directions'])
def test_scripts_run_as_modules(name):
  proc = subprocess.run(
      [sys.executable, '-m', f'benchmarks.paper.{name}', '--help'],
      cwd=helpers.ROOT, env=helpers.jax_env(), capture_output=True,
      text=True, timeout=120, check=False,
  )
  assert proc.returncode == 0, proc.stderr[-3000:]
