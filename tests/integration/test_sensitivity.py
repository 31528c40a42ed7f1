"""The learning-rate sweep behind table 1 and figure 4.

`benchmarks/paper/sensitivity.py` and its tasks (`benchmarks/paper/tasks.py`):
the Frechet distance against SciPy, the figure-4 ratio, the decay-on-plateau
wiring of each optimizer, the quick mode end to end (in a subprocess, as in
tests/test_paper.py), and that the large (accelerator) configuration traces.
"""

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
import scipy.linalg

from benchmarks.paper import sensitivity
from benchmarks.paper import tasks
import fromage_jax
from tests import helpers


def test_frechet_distance_matches_scipy_sqrtm():
  rng = np.random.default_rng(0)
  x1 = rng.standard_normal((400, 6)) @ rng.standard_normal((6, 6))
  x2 = 0.5 + rng.standard_normal((300, 6)) @ rng.standard_normal((6, 6))
  mu1, cov1 = x1.mean(0), np.cov(x1, rowvar=False)
  mu2, cov2 = x2.mean(0), np.cov(x2, rowvar=False)
  expected = np.sum((mu1 - mu2) ** 2) + np.trace(
      cov1 + cov2 - 2 * scipy.linalg.sqrtm(cov1 @ cov2).real)
  stats1 = tasks.feature_stats(jnp.asarray(x1, jnp.float32))
  np.testing.assert_allclose(stats1[0], mu1, rtol=1e-4, atol=1e-5)
  np.testing.assert_allclose(stats1[1], cov1, rtol=1e-4, atol=1e-4)
  ref2 = tasks.frechet_reference(jnp.asarray(x2, jnp.float32))
  assert float(tasks.frechet_distance(*stats1, ref2)) == pytest.approx(
      expected, rel=1e-4)
  # A set against itself: 0, up to float32 rounding of its traces.
  ref1 = tasks.frechet_reference(jnp.asarray(x1, jnp.float32))
  assert abs(float(tasks.frechet_distance(*stats1, ref1))) < 1e-4 * np.trace(
      cov1)
  # Equal covariances: only the means' squared distance remains.
  shifted = (stats1[0] + 2.0, stats1[1])
  assert float(tasks.frechet_distance(*shifted, ref1)) == pytest.approx(
      4.0 * 6, rel=1e-3)


def test_best_and_ratios_count_diverged_runs_as_worst():
  figures = np.array([[2.0, 2.2], [1.0, 1.2], [np.nan, 1.0], [4.0, 4.4]])
  assert sensitivity.best_index(figures) == 1
  np.testing.assert_allclose(sensitivity.ratios(figures),
                             [1.1 / 2.1, 1.0, 0.0, 1.1 / 4.2])


def test_ratio_is_one_at_a_best_figure_of_zero():
  figures = np.array([[0.0, 0.0], [1e-3, 3e-3], [np.inf, np.nan]])
  np.testing.assert_array_equal(sensitivity.ratios(figures), [1.0, 0.0, 0.0])


def test_cross_entropy_matches_optax_and_stays_accurate_when_tiny():
  rng = np.random.default_rng(0)
  logits = jnp.asarray(rng.standard_normal((32, 10)), jnp.float32)
  labels = jnp.asarray(rng.integers(0, 10, 32), jnp.int32)
  np.testing.assert_allclose(
      tasks.cross_entropy(logits, labels),
      optax.softmax_cross_entropy_with_integer_labels(logits, labels),
      rtol=1e-5, atol=1e-6)
  # Margin 30: the loss is 9 * e^-30 (about 8.4e-13); the usual form says 0.
  confident = jnp.zeros((1, 10)).at[0, 3].set(30.0)
  label = jnp.array([3])
  assert float(optax.softmax_cross_entropy_with_integer_labels(
      confident, label)[0]) == 0.0
  assert float(tasks.cross_entropy(confident, label)[0]) == pytest.approx(
      9 * np.exp(-30.0), rel=1e-5)
  grads = jax.grad(lambda z: tasks.cross_entropy(z, labels).sum())(logits)
  assert np.all(np.isfinite(grads))


def test_log_grid_half_decades():
  assert sensitivity.log_grid(-2, 0) == (0.01, 0.03, 0.1, 0.3, 1.0)
  for name, grid in sensitivity.GRIDS.items():
    assert len(grid) >= 5, name
  assert sensitivity.FROMAGE_DEFAULT in sensitivity.GRIDS['Fromage']


@pytest.mark.parametrize('name', sensitivity.OPTIMIZERS)
def test_learning_rate_divided_by_10_after_patience_epochs(name):
  """Constant loss: the first epoch sets the best value, `patience` more
  epochs without improvement divide the learning rate by 10, from the last
  step of that epoch on; for Fromage inside both the step and the prefactor.
  """
  steps_per_epoch, patience, lr = 3, 2, 0.05
  tx = sensitivity.optimizer(name, lr, steps_per_epoch, patience)
  params = {'w': jnp.arange(1.0, 7.0).reshape(2, 3), 'b': jnp.zeros(3)}
  grads = {'w': jnp.array([[1.0, -2.0, 0.5], [0.0, 1.0, -1.0]]),
           'b': jnp.array([0.3, -0.1, 0.2])}

  def reference(lr):
    if name == 'Fromage':
      return fromage_jax.fromage(lr)
    return optax.adam(lr) if name == 'Adam' else optax.sgd(lr, momentum=0.9)

  decay_step = steps_per_epoch * (patience + 1) - 1
  state = tx.init(params)
  # SGD and Adam carry momenta: one reference run, scaled after the decay.
  ref = reference(lr)
  ref_state = ref.init(params)
  for step in range(decay_step + steps_per_epoch):
    updates, state = tx.update(grads, state, params, value=1.0)
    scale = 1.0 if step < decay_step else 0.1
    if name == 'Fromage':
      expected, _ = reference(scale * lr).update(grads, ref_state, params)
    else:
      expected, ref_state = ref.update(grads, ref_state, params)
      expected = jax.tree.map(lambda u, s=scale: s * u, expected)
    for key in params:
      np.testing.assert_allclose(updates[key], expected[key], rtol=2e-5,
                                 atol=1e-8, err_msg=f'step {step} {key}')


@pytest.mark.parametrize('name', sensitivity.OPTIMIZERS)
def test_at_most_three_decays(name):
  tx = sensitivity.optimizer(name, 0.01, steps_per_epoch=1, patience=1)
  params = {'w': jnp.ones(3)}
  state = tx.init(params)
  for _ in range(20):
    _, state = tx.update(params, state, params, value=1.0)
  scale = sensitivity.lr_scales({'model': state}, ('model',))['model']
  assert float(scale) == pytest.approx(sensitivity.MIN_SCALE)
  assert sensitivity.MIN_SCALE == pytest.approx(1e-3)


@pytest.fixture(scope='module')
def quick(tmp_path_factory, xla_cache):
  out = tmp_path_factory.mktemp('sensitivity')
  data = helpers.run_quick('sensitivity', out, xla_cache)
  data['summary'] = sensitivity.summarise(data['runs'])
  return data, out


def best_lr(data, task, name, key='train'):
  return data['summary']['tasks'][task][name][key]['best_lr']


def test_quick_sweep_covers_every_task_optimizer_lr_and_seed(quick):
  data, _ = quick
  cfg = data['config']
  assert set(data['runs']) == set(tasks.TASKS)
  for task, by_opt in data['runs'].items():
    assert set(by_opt) == set(sensitivity.OPTIMIZERS)
    for name, r in by_opt.items():
      shape = (len(cfg['grids'][name]), len(cfg['seeds']))
      for key in ('train', 'test'):
        figures = np.asarray(r[key], np.float64)
        assert figures.shape == shape, (task, name, key)
        assert np.all(figures[np.isfinite(figures)] > 0), (task, name, key)
      # The grid's middle learning rate never diverges, not even in 3 epochs.
      assert np.all(np.isfinite(np.asarray(r['train'])[len(r['lrs']) // 2]))
      assert set(r['curves']) == set(
          ['d', 'g', 'plateau_signal'] if task == 'gan' else ['model'])
      for curve in r['curves'].values():
        assert np.asarray(curve).shape == (cfg['tasks'][task]['epochs'],
                                           *shape)


@pytest.mark.parametrize('key', ['train', 'test'])
def test_quick_summary_follows_from_the_raw_figures(quick, key):
  data, _ = quick
  for task, by_opt in data['runs'].items():
    for name, r in by_opt.items():
      s = data['summary']['tasks'][task][name][key]
      figures = np.asarray(r[key], np.float64)
      mean = np.where(np.isfinite(figures), figures, np.inf).mean(axis=1)
      i = int(np.argmin(mean))
      assert s['best_lr'] == r['lrs'][i]
      np.testing.assert_allclose(
          s['ratio'], np.where(np.isfinite(mean), mean[i] / mean, 0))
      assert s['ratio'][i] == 1.0
  for name, a in data['summary']['across'][key].items():
    worst = np.min([data['summary']['tasks'][t][name][key]['ratio']
                    for t in data['runs']], axis=0)
    np.testing.assert_allclose(a['worst_ratio'], worst)
    assert a['best_single_worst'] == pytest.approx(worst.max())
    assert a['best_single_lr'] == a['lrs'][int(np.argmax(worst))]


def test_quick_training_makes_progress(quick):
  data, _ = quick
  for task in ('classifier', 'lm', 'autoencoder'):
    for name, r in data['runs'][task].items():
      i = r['lrs'].index(best_lr(data, task, name))
      curve = np.asarray(r['curves']['model'])[:, i]  # [epoch, seed]
      assert np.all(curve[-1] < 0.9 * curve[0]), (task, name)
  for name, r in data['runs']['classifier'].items():
    i = r['lrs'].index(best_lr(data, 'classifier', name))
    assert np.all(np.asarray(r['test_error'])[i] < 0.5), name  # chance: 0.9
  for name, r in data['runs']['gan'].items():
    fid = np.asarray(r['train'], np.float64)
    assert np.nanmin(fid) < 0.9 * np.nanmax(fid), name  # the lr matters
    # The plateau signal is the training FID after each epoch.
    np.testing.assert_allclose(np.asarray(r['curves']['plateau_signal'])[-1],
                               fid, rtol=1e-4)


def test_quick_plateau_decays_are_powers_of_ten(quick):
  data, _ = quick
  decays = []
  for by_opt in data['runs'].values():
    for r in by_opt.values():
      for scale in r['scales'].values():
        k = -np.log10(np.asarray(scale, np.float64))
        np.testing.assert_allclose(k, np.round(k), atol=1e-4)
        decays.append(k)
  assert max(np.max(k) for k in decays) >= 1  # patience 1: some decayed


def test_table1_has_each_optimizer_at_its_best_and_fromage_at_its_default(
    quick):
  """Table 1 shows each optimizer's best learning rate (by training figure)
  with its training and held-out figures over seeds, and Fromage also at
  0.01 where that is not its best."""
  data, _ = quick
  table1 = sensitivity.summary_tables(data['runs'], data['summary'],
                                      data['metrics'])[0]
  for task, by_opt in data['runs'].items():
    rows = [' | '.join(row) for row in table1.rows
            if f'{task} ({data["metrics"][task]})' in row]
    for name, r in by_opt.items():
      best = best_lr(data, task, name)
      shown = [best] + ([sensitivity.FROMAGE_DEFAULT] if name == 'Fromage'
                        and best != sensitivity.FROMAGE_DEFAULT else [])
      for lr in shown:
        i = r['lrs'].index(lr)
        figures = [sensitivity.mean_std(np.asarray(r[k], np.float64)[i])
                   for k in ('train', 'test')]
        assert sum(f'| {lr:g} |' in row and all(f in row for f in figures)
                   for row in rows) == 1, (task, name, lr)
    assert len(rows) == len(by_opt) + (
        best_lr(data, task, 'Fromage') != sensitivity.FROMAGE_DEFAULT)


def test_render_from_json_gives_the_same_table(quick, tmp_path):
  _, out = quick
  sensitivity.main(['--render', str(out / 'sensitivity.json'), '--out',
                    str(tmp_path)])
  assert (tmp_path / 'table1.md').read_text() == (
      out / 'table1.md').read_text()
  assert (tmp_path / 'sensitivity.png').stat().st_size > 10_000


@pytest.mark.parametrize('name', list(tasks.TASKS))
def test_large_configuration_traces(name):
  """The accelerator configuration builds and traces (no training here)."""
  task, _, patience = sensitivity.build(sensitivity.LARGE, name)
  init, epoch, _ = sensitivity.make_sweep(task, 'Fromage', patience)
  lrs = jnp.asarray([0.01, 0.1])
  params = jax.tree.map(lambda a: a[None], task.init(0))
  carry = jax.eval_shape(init, lrs, params, task.data)
  batches = jax.tree.map(lambda b: b[:1], task.batches(
      np.random.default_rng(0), 1))
  _, losses = jax.eval_shape(epoch, lrs, carry, batches, task.data)
  assert set(losses) == set(task.groups)
  for loss in losses.values():
    assert loss.shape == (2, 1)
