"""The main job, `python -m fromage_jax.demo`, on a short run."""

import os
import subprocess
import sys

import numpy as np

from fromage_jax import demo


def test_demo_short_run_trains_and_writes_outputs(tmp_path):
  results = demo.main(['--epochs', '4', '--out', str(tmp_path)])
  assert set(results) == set(demo.optimizers(steps_per_epoch=22))
  for name, r in results.items():
    assert len(r['curve']) == len(r['test_curve']) == 4
    assert r['curve'][-1] < r['curve'][0], name
    assert r['test_curve'][-1] < r['test_curve'][0], name
    assert r['test_curve'][-1] == r['test_loss'], name
    assert r['train_acc'] > 0.9, name
  # Zero-initialised biases learn with fromage_jax, stay ~frozen with optax's.
  assert results['fromage_jax.fromage(0.01)']['bias_norm'] > 1e-3
  assert results['optax.fromage(0.01)']['bias_norm'] < 1e-5
  assert os.path.getsize(tmp_path / 'demo_loss.png') > 10_000
  table = (tmp_path / 'demo_results.md').read_text()
  for name in results:
    assert f'`{name}`' in table


def test_demo_runs_as_a_module(tmp_path):
  proc = subprocess.run(
      [sys.executable, '-m', 'fromage_jax.demo', '--epochs', '1', '--out',
       str(tmp_path)],
      capture_output=True, text=True, timeout=300, check=False,
  )
  assert proc.returncode == 0, proc.stderr
  assert '| `optax.sgd(0.1)` |' in proc.stdout


def test_figure_shows_held_out_curves_and_says_where_the_axis_is_floored():
  results = {
      'a': dict(curve=[1.0, 0.0], test_curve=[2.0, 1.5]),
      'b': dict(curve=[1.0, 0.5], test_curve=[2.0, 1.0]),
  }
  fig = demo.figure(results)
  train, held_out = fig.axes
  assert 'training' in train.get_title()
  assert 'held-out' in held_out.get_title()
  for ax, key in ((train, 'curve'), (held_out, 'test_curve')):
    assert ax.get_yscale() == 'log'
    assert 'below 1e-10 drawn at 1e-10' in ax.get_ylabel()
    lines = ax.get_lines()
    assert [line.get_label() for line in lines] == list(results)
    np.testing.assert_array_equal(
        lines[1].get_ydata(), results['b'][key]
    )
  # A loss of exactly 0 is drawn at the floor.
  np.testing.assert_array_equal(train.get_lines()[0].get_ydata(), [1.0, 1e-10])


def test_help_names_the_module_and_explains_every_option():
  parser = demo.arguments()
  assert parser.format_usage().startswith('usage: python -m fromage_jax.demo')
  options = [a for a in parser._actions if a.option_strings]
  assert len(options) == 7  # --help and the six settings
  for action in options:
    assert action.help, action.option_strings
