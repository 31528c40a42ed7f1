"""Relative steps over other optimizers' directions, as composition.

`optax.chain(direction, fromage_jax.fromage(eta))` moves every layer by
`eta` of its norm along Adam's, momentum's or Muon's direction. Such
directions are not orthogonal to the weights, so Fromage's prefactor no
longer holds the norms: `fromage_jax.norm_project_to_init()` after the chain
does. Tested on a small ReLU network with a zero-initialised bias and a stack
of three layers (one `[3, 12, 12]` leaf, `stacked_layer_axes('blocks')`);
every run is jitted, the long ones scanned.
"""

import jax
import jax.numpy as jnp
import numpy as np
import optax
from optax import contrib
import pytest

import fromage_jax

LAYER_AXES = fromage_jax.stacked_layer_axes('blocks')
# The layers in `layer_sum`'s order: keys sorted, the stack's layers in turn.
LAYERS = ('b_in', 'blocks[0]', 'blocks[1]', 'blocks[2]', 'w_in', 'w_out')
BIAS = LAYERS.index('b_in')
WEIGHTS = [i for i in range(len(LAYERS)) if i != BIAS]
# Float32 rounding of a norm held by rescaling every step (measured: 6 eps).
NORM_TOL = 16 * float(np.finfo(np.float32).eps)


def init_params(seed=0):
  k = jax.random.split(jax.random.key(seed), 3)
  return {
      'w_in': jax.random.normal(k[0], (6, 12)) / np.sqrt(6),
      'b_in': jnp.zeros(12),
      'blocks': jax.random.normal(k[1], (3, 12, 12)) * np.sqrt(2 / 12),
      'w_out': jax.random.normal(k[2], (12, 3)) / np.sqrt(12),
  }


def model(params, x):
  h = jax.nn.relu(x @ params['w_in'] + params['b_in'])
  h, _ = jax.lax.scan(lambda h, w: (jax.nn.relu(h @ w), None), h,
                      params['blocks'])
  return h @ params['w_out']


_rng = np.random.default_rng(42)
X = _rng.standard_normal((64, 6)).astype(np.float32)
Y = np.argmax(X @ _rng.standard_normal((6, 3)), -1)


def xent(params):
  """Separable labels: the weights' norms grow under these directions."""
  return optax.softmax_cross_entropy_with_integer_labels(
      model(params, X), Y).mean()


def decayed(params):
  """With a weight-decay term the directions lean on `W`: the norms
  shrink."""
  return xent(params) + 0.05 * sum(
      jnp.sum(jnp.square(w)) for w in jax.tree.leaves(params))


def _per_layer_muon_dims(updates):
  # scale_by_muon vmaps over the axes its dimension numbers leave out: with
  # the last two axes as (reduction, output), each layer of a `[L, d_in,
  # d_out]` stack is orthogonalised on its own, and a 2-D leaf as a whole.
  # (Its default, None, fails on a tree of several leaves.)
  return jax.tree.map(lambda _: contrib.MuonDimensionNumbers(-2, -1), updates)


def muon_direction():
  """Muon's orthogonalised momentum on the matrices (the 2-D leaves and the
  stack); the raw gradient on the bias, which `fromage` then rescales."""
  return optax.partition(
      {'muon': contrib.scale_by_muon(
          weight_dimension_numbers=_per_layer_muon_dims),
       'raw': optax.identity()},
      lambda p: jax.tree.map(lambda x: 'muon' if x.ndim >= 2 else 'raw', p))


DIRECTIONS = {
    'adam': optax.scale_by_adam,
    'momentum': lambda: optax.trace(0.9),
    'muon': muon_direction,
}


def relative_step(direction, learning_rate, *, project, p_bound=None):
  parts = [DIRECTIONS[direction](),
           fromage_jax.fromage(learning_rate, p_bound=p_bound,
                               layer_axes=LAYER_AXES)]
  if project:
    parts.append(fromage_jax.norm_project_to_init(layer_axes=LAYER_AXES))
  return optax.chain(*parts)


def layer_sum(tree):
  """Each layer's sum of an elementwise tree, in `LAYERS`' order."""
  return jnp.concatenate([
      jnp.atleast_1d(jnp.sum(x, axis=tuple(range(k == 'blocks', x.ndim))))
      for k, x in sorted(tree.items())])


def norms(tree):
  return jnp.sqrt(layer_sum(jax.tree.map(jnp.square, tree)))


def cosines(params, direction):
  """Each layer's `cos(W, d)`."""
  dot = layer_sum(jax.tree.map(jnp.multiply, params, direction))
  return dot / (norms(params) * norms(direction))


def relative_steps(updates, params):
  rel = fromage_jax.relative_update_norms(updates, params,
                                          layer_axes=LAYER_AXES)
  return layer_sum(rel)  # a sum over no axes: the per-layer values


def test_layer_bookkeeping_matches_the_library():
  params = init_params()
  updates = jax.tree.map(lambda w: 0.1 * w + 0.01, params)
  rel = fromage_jax.relative_update_norms(updates, params,
                                          layer_axes=LAYER_AXES)
  np.testing.assert_allclose(relative_steps(updates, params),
                             norms(updates) / norms(params), rtol=1e-6)
  assert rel['blocks'].shape == (3,)
  assert relative_steps(updates, params)[BIAS] == np.inf


def test_muon_direction_orthogonalises_each_stacked_layer_on_its_own():
  params = init_params()
  grads = jax.grad(xent)(params)
  direction = muon_direction()
  d, _ = direction.update(grads, direction.init(params), params)
  for layer in range(3):
    one = contrib.scale_by_muon()  # one matrix: the default dimensions
    expected, _ = one.update(grads['blocks'][layer],
                             one.init(params['blocks'][layer]))
    np.testing.assert_allclose(d['blocks'][layer], expected, atol=1e-5)
  np.testing.assert_array_equal(d['b_in'], grads['b_in'])
  # optax's default dimensions on the 3-D leaf mix the layers.
  mixed = contrib.scale_by_muon(
      weight_dimension_numbers=contrib.MuonDimensionNumbers())
  wrong, _ = mixed.update(grads['blocks'], mixed.init(params['blocks']))
  assert not np.allclose(wrong, d['blocks'], atol=1e-3)


SCHEDULES = {'constant': 0.05,
             'schedule': optax.exponential_decay(0.05, 30, 0.1)}


def _eta(schedule, t):
  return np.float64(schedule(t) if callable(schedule) else schedule)


@pytest.mark.parametrize('schedule', list(SCHEDULES))
@pytest.mark.parametrize('direction', list(DIRECTIONS))
def test_each_layer_moves_by_eta_t_of_its_norm(direction, schedule):
  """Unprojected: each layer's relative step is `eta_t` to second order
  (`|step - eta_t| <= eta_t**2`) and its new norm is `||W|| sqrt(1 - 2 eta_t
  cos(W, d) + eta_t**2) / sqrt(1 + eta_t**2)`. Projected: a held layer
  moves along the sphere of its norm, by the chord of the angle between `W`
  and `W + u`, which is `eta_t sin(W, d)` to second order: only the
  direction's part across `W` moves it. The free bias moves by `eta_t`."""
  lr = SCHEDULES[schedule]
  steps = 30
  ref = DIRECTIONS[direction]()  # the direction alone, in lockstep
  txs = [relative_step(direction, lr, project=p) for p in (False, True)]

  @jax.jit
  def run(params):
    def step(carry, _):
      ps, states, ref_state = carry
      grads = jax.grad(xent)(ps[0]), jax.grad(xent)(ps[1])
      out = []
      for k, tx in enumerate(txs):
        d, ref_state[k] = ref.update(grads[k], ref_state[k], ps[k])
        updates, states[k] = tx.update(grads[k], states[k], ps[k])
        new = optax.apply_updates(ps[k], updates)
        out.append((relative_steps(updates, ps[k]), cosines(ps[k], d),
                    norms(ps[k]), norms(new)))
        ps[k] = new
      return (ps, states, ref_state), out

    init = ([params, params], [tx.init(params) for tx in txs],
            [ref.init(params)] * 2)
    return jax.lax.scan(step, init, length=steps)[1]

  plain, projected = jax.device_get(run(init_params()))
  eta = np.array([_eta(lr, t) for t in range(steps)])[:, None]
  # From step 1 on: the bias is 0 before its first step.
  eta = eta[1:]
  rel, cos, before, after = (np.asarray(a, np.float64)[1:] for a in plain)
  assert np.all(np.abs(rel - eta) <= eta ** 2), np.max(
      np.abs(rel - eta) / eta ** 2)
  np.testing.assert_allclose(
      after, before * np.sqrt(1 - 2 * eta * cos + eta ** 2)
      / np.sqrt(1 + eta ** 2), rtol=2e-6)

  rel, cos, before, _ = (np.asarray(a, np.float64)[1:] for a in projected)
  w = WEIGHTS
  cos_angle = (1 - eta * cos) / np.sqrt(1 - 2 * eta * cos + eta ** 2)
  np.testing.assert_allclose(rel[:, w], np.sqrt(2 - 2 * cos_angle)[:, w],
                             rtol=1e-4)
  sin = np.sqrt(1 - cos ** 2)
  assert np.all(np.abs(rel[:, w] - (eta * sin)[:, w]) <= eta ** 2)
  # Here the directions lean on W enough that some held layer moves by
  # visibly less than eta.
  assert np.min(rel[:, w] / eta) < 0.9
  assert np.all(np.abs(rel[:, BIAS] - eta[:, 0]) <= eta[:, 0] ** 2)


CASES = {
    # Norms grow without bound; the clip is not used.
    'grow': (xent, None),
    # Norms shrink, which the clip (p_bound=1) cannot stop.
    'shrink': (decayed, 1.0),
}


@pytest.mark.parametrize('case', list(CASES))
@pytest.mark.parametrize('direction', list(DIRECTIONS))
def test_projection_holds_every_norm_where_the_chain_drifts(direction, case):
  loss, p_bound = CASES[case]
  steps = 1000
  txs = [relative_step(direction, 0.02, project=p, p_bound=p_bound)
         for p in (False, True)]

  @jax.jit
  def run(params):
    def step(carry, _):
      ps, states = carry
      out = []
      for k, tx in enumerate(txs):
        value, grads = jax.value_and_grad(loss)(ps[k])
        updates, states[k] = tx.update(grads, states[k], ps[k])
        ps[k] = optax.apply_updates(ps[k], updates)
        out.append((norms(ps[k]), value))
      return (ps, states), out

    init = ([params, params], [tx.init(params) for tx in txs])
    (ps, _), out = jax.lax.scan(step, init, length=steps)
    return out, [loss(p) for p in ps]

  params = init_params()
  (plain, projected), final = jax.device_get(run(params))
  target = np.asarray(norms(params))[WEIGHTS]
  held = np.asarray(projected[0])[:, WEIGHTS] / target  # [step, layer]
  assert np.all(np.isfinite(held))
  np.testing.assert_allclose(held, 1.0, rtol=0, atol=NORM_TOL)
  assert np.asarray(projected[0])[-1, BIAS] > 0  # left free: it learns
  drift = np.asarray(plain[0])[-1, WEIGHTS] / target
  if case == 'grow':
    assert np.max(drift) > 2.0, drift
    # The projected chain trains; this one, its norms blown up, does not.
    assert final[1] < 0.1 * projected[1][0]
    assert final[1] < 0.1 * final[0]
  else:
    assert np.max(np.asarray(plain[0])[:, WEIGHTS] / target) <= 1 + NORM_TOL
    assert np.min(drift) < 0.5, drift


@pytest.mark.parametrize('direction', list(DIRECTIONS))
def test_zero_initialised_bias_learns_with_and_without_projection(direction):
  """A linear fit whose targets have an offset: only the bias, zero at
  init, can reach below the best fit of the weights alone. The true weights
  have the initial weights' norm, so the projection does not stop the fit."""
  rng = np.random.default_rng(0)
  x = rng.standard_normal((128, 6)).astype(np.float32)
  w0 = rng.standard_normal((6, 3)).astype(np.float32) / np.sqrt(6)
  rotation, _ = np.linalg.qr(rng.standard_normal((6, 6)))
  offset = np.array([2.0, -1.0, 0.5], np.float32)
  y = x @ (rotation @ w0).astype(np.float32) + offset
  no_bias_fit = np.linalg.lstsq(x, y, rcond=None)[0]
  floor = np.mean(np.square(x @ no_bias_fit - y))  # weights alone

  def loss(params):
    return jnp.mean(jnp.square(x @ params['w'] + params['b'] - y))

  plain = optax.chain(DIRECTIONS[direction](), fromage_jax.fromage(0.02))
  projected = optax.chain(DIRECTIONS[direction](), fromage_jax.fromage(0.02),
                          fromage_jax.norm_project_to_init())
  txs = [plain, projected]

  @jax.jit
  def run(params):
    def step(carry, _):
      ps, states = carry
      for k, tx in enumerate(txs):
        updates, states[k] = tx.update(jax.grad(loss)(ps[k]), states[k],
                                       ps[k])
        ps[k] = optax.apply_updates(ps[k], updates)
      return (ps, states), None

    init = ([params, params], [tx.init(params) for tx in txs])
    return jax.lax.scan(step, init, length=500)[0][0]

  params = {'w': jnp.asarray(w0), 'b': jnp.zeros(3)}
  for trained in jax.device_get(run(params)):
    assert np.linalg.norm(trained['b']) > 0.5 * np.linalg.norm(offset)
    assert float(loss(trained)) < 0.1 * floor
    assert float(loss(trained)) < 0.1 * float(loss(params))
