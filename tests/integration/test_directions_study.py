"""The study of relative steps over Adam's and Muon's directions.

`benchmarks/paper/directions.py`: its optimizers (the decay on plateau
reaching `eta` inside the step and the prefactor, Muon's split of the
leaves), its use of sensitivity.py's sweep, and its quick mode end to end
(in a subprocess, as in tests/test_paper.py).
"""

import json

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

from benchmarks.paper import directions
from benchmarks.paper import sensitivity
from benchmarks.paper import tasks
from tests import helpers


def test_relative_methods_share_one_grid():
  for cfg in (directions.FULL, directions.QUICK):
    grids = {cfg['grids'][n] for n in directions.RELATIVE}
    assert len(grids) == 1
    assert set(cfg['grids']) == set(directions.OPTIMIZERS)
  shared = directions.FULL['grids']['Fromage']
  assert shared[0] == pytest.approx(1e-4) and shared[-1] == pytest.approx(1)
  assert len(shared) == 9  # half-decades
  assert directions.DEFAULT in shared
  # The same tasks, epochs and seeds as the table-1 sweep.
  assert directions.FULL['tasks'] == sensitivity.FULL['tasks']
  assert directions.FULL['seeds'] == sensitivity.FULL['seeds']


PARAMS = {'w': jnp.arange(1.0, 7.0).reshape(2, 3), 'b': jnp.zeros(3)}
GRADS = {'w': jnp.array([[1.0, -2.0, 0.5], [0.0, 1.0, -1.0]]),
         'b': jnp.array([0.3, -0.1, 0.2])}


@pytest.mark.parametrize('name', [n for n in directions.RELATIVE
                                  if n != 'Fromage'])
def test_plateau_divides_eta_inside_step_and_prefactor(name):
  """Constant loss: after `patience` epochs without improvement the update
  is that of the chain built with `eta / 10`, from the last step of that
  epoch on; not the undecayed update scaled by 1/10 (reduce_on_plateau
  chained after), which also scales the prefactor's shrink."""
  steps_per_epoch, patience, lr = 3, 2, 0.3
  tx = directions.optimizer(name, lr, steps_per_epoch, patience)
  decay_step = steps_per_epoch * (patience + 1) - 1
  state = tx.init(PARAMS)
  # The direction's state does not depend on eta: one reference state.
  ref_state = directions.relative(name, lr).init(PARAMS)
  params = PARAMS
  for step in range(decay_step + steps_per_epoch):
    updates, state = tx.update(GRADS, state, params, value=1.0)
    scale = 1.0 if step < decay_step else 0.1
    expected, new_ref_state = directions.relative(name, scale * lr).update(
        GRADS, ref_state, params)
    for key in params:
      np.testing.assert_allclose(updates[key], expected[key], rtol=2e-5,
                                 atol=1e-7, err_msg=f'step {step} {key}')
    if scale < 1:
      scaled, _ = directions.relative(name, lr).update(GRADS, ref_state,
                                                       params)
      assert not np.allclose(updates['w'], 0.1 * scaled['w'], rtol=1e-3)
    ref_state = new_ref_state
    params = optax.apply_updates(params, updates)
  scales = sensitivity.lr_scales({'model': state}, ('model',))['model']
  assert float(scales) == pytest.approx(0.1)


@pytest.mark.parametrize('name', directions.OPTIMIZERS)
def test_every_method_decays_at_most_three_times(name):
  tx = directions.optimizer(name, 0.01, steps_per_epoch=1, patience=1)
  state = tx.init(PARAMS)
  for _ in range(20):
    _, state = tx.update(GRADS, state, PARAMS, value=1.0)
  scale = sensitivity.lr_scales({'model': state}, ('model',))['model']
  assert float(scale) == pytest.approx(sensitivity.MIN_SCALE)


def test_projected_chains_hold_the_norms_in_training():
  params = PARAMS
  for name in ('rel(Adam)+proj', 'rel(Muon)+proj'):
    tx = directions.optimizer(name, 0.1, steps_per_epoch=2, patience=3)
    state = tx.init(params)
    p = params
    for step in range(10):
      grads = jax.tree.map(lambda w, s=step: w + jnp.cos(w + s), p)
      updates, state = tx.update(grads, state, p, value=1.0)
      p = optax.apply_updates(p, updates)
    np.testing.assert_allclose(jnp.linalg.norm(p['w']),
                               jnp.linalg.norm(params['w']), rtol=1e-6)
    assert float(jnp.linalg.norm(p['b'])) > 0  # zero at init: free


def test_muon_direction_takes_the_matrices_and_passes_the_rest_raw():
  """On the CNN: the 2-D head kernel gets Muon's orthogonalised momentum;
  the 4-D conv kernels and the biases keep their raw gradient."""
  task = tasks.classifier(width=4)
  params = task.init(0)['model']
  grads = jax.tree.map(lambda w: jnp.sin(3 * w) + 0.1, params)
  direction = directions.muon_direction()
  d, _ = jax.jit(direction.update)(grads, direction.init(params), params)
  leaves = jax.tree_util.tree_flatten_with_path(params)[0]
  assert {x.ndim for _, x in leaves} == {1, 2, 4}
  for (path, w), g, u in zip(leaves, jax.tree.leaves(grads),
                             jax.tree.leaves(d), strict=True):
    if w.ndim == 2:
      sv = np.linalg.svd(np.asarray(u), compute_uv=False)
      # Newton-Schulz's quintic takes every singular value near 1.
      assert 0.5 < sv.min() and sv.max() < 1.5, (path, sv)
      assert not np.allclose(u, g)
    else:
      np.testing.assert_array_equal(u, g, err_msg=str(path))


def test_sensitivity_is_left_as_it_was():
  directions.summarise({})
  assert sensitivity.optimizer is directions._SENSITIVITY_OPTIMIZER
  assert sensitivity.OPTIMIZERS == ('Fromage', 'SGD', 'Adam')
  assert sensitivity.NAME == 'sensitivity'


@pytest.fixture(scope='module')
def quick(tmp_path_factory, xla_cache):
  out = tmp_path_factory.mktemp('directions')
  data = helpers.run_quick('directions', out, xla_cache)
  data['summary'] = directions.summarise(data['runs'])
  return data, out, (out / 'directions.md').read_text()


def test_quick_sweep_covers_every_task_method_lr_and_seed(quick):
  data, _, _ = quick
  cfg = data['config']
  assert set(data['runs']) == set(directions.QUICK['tasks'])
  for task, by_opt in data['runs'].items():
    assert list(by_opt) == list(directions.OPTIMIZERS)
    for name, r in by_opt.items():
      assert r['lrs'] == list(cfg['grids'][name])
      shape = (len(r['lrs']), len(cfg['seeds']))
      for key in ('train', 'test'):
        figures = np.asarray(r[key], np.float64)
        assert figures.shape == shape, (task, name, key)
        assert np.all(figures[np.isfinite(figures)] > 0), (task, name, key)
      # The grid's middle learning rate trains without diverging.
      assert np.all(np.isfinite(np.asarray(r['train'])[len(r['lrs']) // 2]))
      for curve in r['curves'].values():
        assert np.asarray(curve).shape == (cfg['tasks'][task]['epochs'],
                                           *shape)


def test_quick_training_makes_progress_for_every_method(quick):
  data, _, _ = quick
  for task in data['runs']:
    for name, r in data['runs'][task].items():
      i = r['lrs'].index(
          data['summary']['tasks'][task][name]['train']['best_lr'])
      curve = np.asarray(r['curves']['model'])[:, i]  # [epoch, seed]
      assert np.all(curve[-1] < 0.9 * curve[0]), (task, name)


@pytest.mark.parametrize('split', ['train', 'test'])
def test_quick_headline_follows_from_the_raw_figures(quick, split):
  """Each method's best single learning rate maximises its worst ratio over
  the tasks; the table quotes each task's ratio there, to the method's own
  best and to the best of every method."""
  data, _, md = quick
  runs = data['runs']
  for name in directions.OPTIMIZERS:
    means = {t: sensitivity.error(r[name][split]).mean(axis=1)
             for t, r in runs.items()}
    own = {t: m.min() / m for t, m in means.items()}
    worst = np.min(list(own.values()), axis=0)
    lrs = runs['classifier'][name]['lrs']
    i = int(np.argmax(worst))
    across = data['summary']['across'][split][name]
    assert across['best_single_lr'] == lrs[i]
    cells = []
    for t, m in means.items():
      best_any = min(sensitivity.error(r[split]).mean(axis=1).min()
                     for r in runs[t].values())
      cells.append(f'{own[t][i]:.2f} / {best_any / m[i]:.2f}')
    assert f'| **{lrs[i]:g}** | ' + ' | '.join(cells) + ' |' in md, name


def test_render_from_json_gives_the_same_markdown(quick, tmp_path):
  data, out, md = quick
  runs_only = {k: v for k, v in data.items() if k != 'summary'}
  path = tmp_path / 'run.json'
  path.write_text(json.dumps(runs_only))
  directions.main(['--render', str(path), '--out', str(tmp_path)])
  assert (tmp_path / 'directions.md').read_text() == md
  assert (tmp_path / 'directions.png').stat().st_size > 10_000


def test_runs_of_some_tasks_each_merge_into_the_same_markdown(quick, tmp_path):
  data, _, md = quick
  paths = []
  for names in (['autoencoder'], ['classifier']):
    part = dict(data, **{key: {t: data[key][t] for t in names}
                         for key in ('runs', 'metrics', 'settings',
                                     'tasks_meta')})
    part.pop('summary')
    paths.append(tmp_path / f'{names[0]}.json')
    paths[-1].write_text(json.dumps(part))
  out = tmp_path / 'merged'
  directions.main(['--render', *map(str, paths), '--out', str(out)])
  assert (out / 'directions.md').read_text() == md


def test_cut_names_what_was_left_out():
  cfg = dict(directions.FULL, tasks=dict(
      directions.FULL['tasks'], lm=dict(epochs=12, patience=5)))
  runs = {t: {} for t in ('classifier', 'lm')}
  cut = directions.cut(dict(mode='full', config=cfg, runs=runs))
  for left_out in ('gan', 'autoencoder', 'lm', '12', '24'):
    assert left_out in cut
  assert 'classifier' not in cut
  full = dict(mode='full', config=directions.FULL,
              runs={t: {} for t in directions.FULL['tasks']})
  assert directions.cut(full) not in cut
  assert not any(t in directions.cut(full) for t in directions.FULL['tasks'])
