"""The main job, `python -m fromage_jax.demo`, on a short run."""

import os
import subprocess
import sys

import jax
import jax.numpy as jnp
import numpy as np
import optax

from fromage_jax import demo


def test_demo_short_run_trains_and_writes_outputs(tmp_path, capsys):
  results = demo.main(['--epochs', '4', '--out', str(tmp_path)])
  names = list(demo.optimizers(steps_per_epoch=22, epochs=4))
  assert list(results) == names
  for name, r in results.items():
    assert len(r['curve']) == len(r['test_curve']) == 4
    assert r['curve'][-1] < r['curve'][0], name
    assert r['test_curve'][-1] < r['test_curve'][0], name
    assert r['test_curve'][-1] == r['test_loss'], name
    assert r['train_acc'] > 0.9, name
  # Zero-initialised biases learn with fromage_jax, stay ~frozen with optax's.
  for name in names[:3]:
    assert results[name]['bias_norm'] > 1e-3, name
  assert results['optax.fromage(0.01)']['bias_norm'] < 1e-5
  assert os.path.getsize(tmp_path / 'demo_loss.png') > 10_000
  table = (tmp_path / 'demo_results.md').read_text()
  for name in results:
    assert f'`{name}`' in table
  # The table is printed and, after it, what constant eta does.
  out = capsys.readouterr().out
  assert out.index(demo.CONSTANT_ETA) > out.index(f'`{names[-1]}`')


def test_demo_runs_as_a_module():
  proc = subprocess.run(
      [sys.executable, '-m', 'fromage_jax.demo', '--help'],
      capture_output=True, text=True, timeout=300, check=False,
  )
  assert proc.returncode == 0, proc.stderr


def test_headline_eta_decays_and_the_ablation_keeps_it():
  """The headline rows decay eta over the run; the ablation's does not."""
  steps, epochs = 5, 6
  txs = demo.optimizers(steps_per_epoch=steps, epochs=epochs)
  params = {'w': jnp.ones((4, 3)), 'b': jnp.ones(3)}
  relative = {}
  for name, tx in txs.items():
    if not name.startswith('fromage_jax.'):
      continue
    tx = optax.with_extra_args_support(tx)
    state, p, sizes = tx.init(params), params, []
    for t in range(steps * epochs):
      grads = jax.tree.map(lambda x, t=t: jnp.cos(x + t), p)
      # A loss that never improves: the plateau decays as it would at a
      # minimum.
      updates, state = tx.update(grads, state, p, value=1.0)
      sizes.append(float(jnp.linalg.norm(updates['w']) /
                         jnp.linalg.norm(p['w'])))
      p = optax.apply_updates(p, updates)
    relative[name] = sizes
  decayed, ablation = list(relative)[:2], list(relative)[2]
  for name in decayed:
    assert relative[name][-1] < 0.2 * relative[name][0], name
  # eta, up to the prefactor's second-order term.
  np.testing.assert_allclose(relative[ablation], 0.01, rtol=1e-2)


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
