"""Invariants from SPEC.md's "Numerics and invariants", checked with chex and
hypothesis, and the paper's figure 2 (scale-invariant layers)."""

import functools
import math

import chex
from hypothesis import given
from hypothesis import settings
from hypothesis import strategies as st
import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

import fromage_jax as fj

_LOW = [jnp.float32, jnp.bfloat16, jnp.float16]


def _params(dtype=jnp.float32, seed=0):
  ks = jax.random.split(jax.random.PRNGKey(seed), 4)
  return {
      'dense': {
          'w': jax.random.normal(ks[0], (4, 3)).astype(dtype),
          'b': jnp.zeros((3,), dtype),
      },
      'out': jax.random.normal(ks[1], (3,)).astype(dtype),
      'scale': jnp.asarray(1.5, dtype),
  }


def _float_leaves(state):
  return [
      x for x in jax.tree.leaves(state)
      if jnp.issubdtype(x.dtype, jnp.inexact)
  ]


def _grads(params, seed):
  leaves, treedef = jax.tree.flatten(params)
  keys = jax.random.split(jax.random.PRNGKey(seed), len(leaves))
  return treedef.unflatten([
      jax.random.normal(k, x.shape).astype(x.dtype)
      for k, x in zip(keys, leaves, strict=True)
  ])


def _np_step(w, g, eta):
  w = np.asarray(w, np.float64)
  g = np.asarray(g, np.float64)
  nw, ng = np.linalg.norm(w), np.linalg.norm(g)
  r = nw / ng if (nw > 0 and ng > 0) else 1.0
  return (w - eta * r * g) / math.sqrt(1 + eta**2) - w


# --- dtypes --------------------------------------------------------------------


@pytest.mark.parametrize('p_bound', [None, 2.0])
@pytest.mark.parametrize('dtype', _LOW)
def test_update_dtypes_follow_params_and_norm_state_is_f32(dtype, p_bound):
  params = _params(dtype)
  tx = fj.fromage(0.05, p_bound=p_bound)
  state = tx.init(params)
  step = jax.jit(tx.update)
  for t in range(3):
    updates, state = step(_grads(params, t), state, params)
    chex.assert_trees_all_equal_shapes_and_dtypes(updates, params)
    chex.assert_tree_all_finite(updates)
    params = optax.apply_updates(params, updates)
    chex.assert_trees_all_equal_shapes_and_dtypes(params, _params(dtype))
  # The state's layout is the package's business; its float leaves (the
  # norms at init, with p_bound) must be f32 scalars, one per layer.
  floats = _float_leaves(state)
  assert len(floats) == (4 if p_bound is not None else 0)
  for leaf in floats:
    assert leaf.dtype == jnp.float32, leaf.dtype
    assert leaf.size == 1
  counts = [x for x in jax.tree.leaves(state) if x.dtype == jnp.int32]
  assert counts and all(c.shape == () for c in counts)


@pytest.mark.parametrize('dtype', [jnp.bfloat16, jnp.float16])
def test_low_precision_update_matches_f32_arithmetic(dtype):
  """The norm ratio is computed in f32: the bf16/f16 update is the f64
  formula, rounded once to the low dtype (up to a couple of ulps)."""
  w = jax.random.normal(jax.random.PRNGKey(1), (64,)).astype(dtype)
  # A gradient whose f16 squared norm would overflow (>65504).
  g = (300.0 * jax.random.normal(jax.random.PRNGKey(2), (64,))).astype(dtype)
  tx = fj.fromage(0.1)
  updates, _ = tx.update(g, tx.init(w), w)
  assert updates.dtype == dtype
  chex.assert_tree_all_finite(updates)
  expected = _np_step(np.asarray(w, np.float32), np.asarray(g, np.float32), 0.1)
  np.testing.assert_allclose(
      np.asarray(updates, np.float32), expected, rtol=2e-2, atol=2e-3
  )


def test_float64_under_x64():
  with jax.enable_x64(True):
    w = jax.random.normal(jax.random.PRNGKey(3), (5, 4), jnp.float64)
    g = jax.random.normal(jax.random.PRNGKey(4), (5, 4), jnp.float64)
    params = {'w': w, 'w32': w.astype(jnp.float32)}
    grads = {'w': g, 'w32': g.astype(jnp.float32)}
    tx = fj.fromage(0.01, p_bound=2.0)
    state = tx.init(params)
    updates, state = jax.jit(tx.update)(grads, state, params)
    assert updates['w'].dtype == jnp.float64
    assert updates['w32'].dtype == jnp.float32
    assert sorted(str(x.dtype) for x in _float_leaves(state)) == [
        'float32', 'float64']
    expected = _np_step(w, g, 0.01)
    # float64 arithmetic: far tighter than float32 could give.
    np.testing.assert_allclose(updates['w'], expected, rtol=1e-12, atol=1e-14)


# --- shapes / dtypes stable across steps ------------------------------------------


def _make_txs():
  sched = optax.cosine_decay_schedule(0.1, 50)
  return {
      'plain': fj.fromage(0.05),
      'p_bound': fj.fromage(0.05, p_bound=1.5),
      'schedule': fj.fromage(sched, p_bound=1.5),
      'inject': optax.inject_hyperparams(fj.fromage)(
          learning_rate=0.05, p_bound=1.5
      ),
      'plateau': None,
  }


@pytest.mark.parametrize('dtype', [jnp.float32, jnp.bfloat16])
@pytest.mark.parametrize(
    'name', ['plain', 'p_bound', 'schedule', 'inject', 'plateau']
)
def test_state_and_update_shapes_dtypes_stable(name, dtype):
  params = _params(dtype)
  if name == 'plateau':
    tx = fj.fromage_on_plateau(0.05, patience=1, p_bound=1.5)
    step = jax.jit(lambda g, s, p: tx.update(g, s, p, value=jnp.float32(1.0)))
  else:
    tx = _make_txs()[name]
    step = jax.jit(tx.update)
  state0 = tx.init(params)
  state = state0
  first_updates = None
  for t in range(4):
    updates, state = step(_grads(params, t), state, params)
    chex.assert_trees_all_equal_shapes_and_dtypes(updates, params)
    if first_updates is None:
      first_updates = updates
    chex.assert_trees_all_equal_shapes_and_dtypes(updates, first_updates)
    chex.assert_trees_all_equal_shapes_and_dtypes(state, state0)
    params = optax.apply_updates(params, updates)
  # The state really advanced (so the comparison was not vacuous).
  assert not all(
      np.array_equal(np.asarray(a), np.asarray(b))
      for a, b in zip(jax.tree.leaves(state), jax.tree.leaves(state0),
                      strict=True)
  )


# --- state size: one scalar per layer -------------------------------------------------


def _state_bytes(state):
  return sum(x.size * x.dtype.itemsize for x in jax.tree.leaves(state))


@pytest.mark.parametrize('n_layers', [1, 5, 20])
@pytest.mark.parametrize('p_bound', [None, 2.0])
def test_state_is_o_layers_not_o_params(n_layers, p_bound):
  params = {
      f'l{i}': jnp.ones((16, 8 + i % 3), jnp.float32) for i in range(n_layers)
  }
  n_params = sum(x.size for x in jax.tree.leaves(params))
  tx = fj.fromage(0.01, p_bound=p_bound)
  # Shapes only: the state after init and after a step.
  state = jax.eval_shape(tx.init, params)
  _, state = jax.eval_shape(tx.update, params, state, params)
  float_elems = sum(
      x.size for x in jax.tree.leaves(state)
      if jnp.issubdtype(x.dtype, jnp.floating)
  )
  int_leaves = [
      x for x in jax.tree.leaves(state) if jnp.issubdtype(x.dtype, jnp.integer)
  ]
  assert all(x.size == 1 for x in int_leaves)
  expected = n_layers if p_bound is not None else 0
  assert float_elems == expected
  assert _state_bytes(state) <= 8 * n_layers + 4 * len(int_leaves) + 8
  assert _state_bytes(state) < n_params  # never O(params)


@pytest.mark.parametrize('layer_axes', [(0,), (-3,)])
def test_state_one_scalar_per_stacked_layer(layer_axes):
  n_stack = 6
  params = {
      'stack': jnp.ones((n_stack, 8, 8)),
      'bias': jnp.ones((n_stack, 8)),
      'head': jnp.ones((8, 2)),
  }
  axes = {'stack': layer_axes, 'bias': (0,), 'head': None}
  tx = fj.fromage(0.01, p_bound=2.0, layer_axes=axes)
  state = tx.init(params)
  norms = _float_leaves(state)
  assert sorted(x.size for x in norms) == [1, n_stack, n_stack]
  n_layers = 2 * n_stack + 1
  float_elems = sum(
      x.size for x in jax.tree.leaves(state)
      if jnp.issubdtype(x.dtype, jnp.floating)
  )
  assert float_elems == n_layers
  assert _state_bytes(state) <= 8 * n_layers + 8
  # The per-slice norms at init: 8 for each [8, 8] slice of ones,
  # sqrt(8) for each bias slice, 4 for the head.
  got = sorted((np.ravel(np.asarray(x)).tolist() for x in norms),
               key=lambda v: (len(v), v[0]))
  np.testing.assert_allclose(got[0], [4.0], rtol=1e-6)
  np.testing.assert_allclose(got[1], [math.sqrt(8)] * n_stack, rtol=1e-6)
  np.testing.assert_allclose(got[2], [8.0] * n_stack, rtol=1e-6)


# --- lax.cond and compile-once ------------------------------------------------------


@pytest.mark.parametrize('dtype', _LOW)
@pytest.mark.parametrize('p_bound', [None, 2.0])
def test_update_inside_lax_cond_traces(dtype, p_bound):
  params = _params(dtype)
  tx = fj.fromage(optax.linear_schedule(0.1, 0.01, 10), p_bound=p_bound)
  state = tx.init(params)

  @jax.jit
  def maybe_step(pred, grads, state, params):
    return jax.lax.cond(
        pred,
        lambda: tx.update(grads, state, params),
        lambda: (jax.tree.map(jnp.zeros_like, params), state),
    )

  g = _grads(params, 0)
  upd_t, state_t = maybe_step(True, g, state, params)
  upd_f, state_f = maybe_step(False, g, state, params)
  chex.assert_trees_all_equal_shapes_and_dtypes(upd_t, params)
  chex.assert_trees_all_equal_shapes_and_dtypes(state_t, state)
  # The branches really differ.
  chex.assert_trees_all_equal(upd_f, jax.tree.map(jnp.zeros_like, params))
  assert float(jnp.abs(upd_t['out'].astype(jnp.float32)).sum()) > 0
  chex.assert_trees_all_equal(state_f, state)


@pytest.mark.parametrize('dtype', _LOW)
def test_jitted_step_compiles_once(dtype):
  params = _params(dtype)
  tx = fj.fromage(optax.exponential_decay(0.1, 5, 0.5), p_bound=3.0)
  state = tx.init(params)
  traces = []

  def loss(p):
    return sum(jnp.sum(jnp.sin(x.astype(jnp.float32))) for x in
               jax.tree.leaves(p))

  @jax.jit
  def step(p, s):
    traces.append(1)
    u, s = tx.update(jax.grad(loss)(p), s, p)
    return optax.apply_updates(p, u), s

  for _ in range(25):
    params, state = step(params, state)
  assert len(traces) == 1
  if hasattr(step, '_cache_size'):
    assert step._cache_size() == 1
  chex.assert_trees_all_equal_shapes_and_dtypes(params, _params(dtype))


# --- hypothesis properties ------------------------------------------------------------

_SHAPES = st.sampled_from([(3,), (2, 3), (4, 4), (2, 3, 2), (17,)])


def _arr(seed, shape, dtype=np.float32, scale=1.0):
  return (scale * np.random.default_rng(seed).standard_normal(shape)).astype(
      dtype
  )


@settings(deadline=None, max_examples=30)
@given(
    shape=_SHAPES,
    seed=st.integers(0, 2**31 - 1),
    eta=st.floats(1e-4, 0.1),
    w_scale=st.floats(1e-2, 1e2),
)
def test_relative_step_size_is_eta(shape, seed, eta, w_scale):
  w = _arr(seed, shape, scale=w_scale)
  g = _arr(seed + 1, shape)
  tx = fj.fromage(eta)
  updates, _ = tx.update(jnp.asarray(g), tx.init(jnp.asarray(w)),
                         jnp.asarray(w))
  ratio = np.linalg.norm(np.asarray(updates, np.float64)) / np.linalg.norm(
      w.astype(np.float64)
  )
  # Exact value, in float64: W' - W = W (1/s - 1) - eta r g / s.
  w64, g64 = w.astype(np.float64), g.astype(np.float64)
  s = math.sqrt(1 + eta**2)
  r = np.linalg.norm(w64) / np.linalg.norm(g64)
  exact = np.linalg.norm(w64 * (1 / s - 1) - eta * r * g64 / s) / np.linalg.norm(
      w64
  )
  assert abs(ratio - exact) <= 1e-4 * exact + 2e-6, (ratio, exact)
  # Equation 6: eta up to second order.
  assert abs(exact - eta) <= 0.6 * eta**2
  assert abs(ratio - eta) <= eta**2 + 2e-6


@settings(deadline=None, max_examples=30)
@given(
    shape=_SHAPES,
    seed=st.integers(0, 2**31 - 1),
    log_c=st.floats(-6, 6),
    p_bound=st.sampled_from([None, 1.0, 2.0]),
)
def test_gradient_scale_invariance(shape, seed, log_c, p_bound):
  c = 10.0**log_c
  params = {'w': jnp.asarray(_arr(seed, shape)), 'b': jnp.zeros((3,))}
  grads = {'w': jnp.asarray(_arr(seed + 1, shape)),
           'b': jnp.asarray(_arr(seed + 2, (3,)))}
  scaled = {'w': grads['w'] * jnp.float32(c), 'b': grads['b']}
  tx = fj.fromage(0.05, p_bound=p_bound)
  state = tx.init(params)
  u1, _ = tx.update(grads, state, params)
  u2, _ = tx.update(scaled, state, params)
  np.testing.assert_allclose(u2['w'], u1['w'], rtol=2e-5, atol=1e-7)
  np.testing.assert_array_equal(u2['b'], u1['b'])
  # And the update is not trivially zero. (With p_bound=1 a step that would
  # grow W is clipped back onto its norm, leaving only the part orthogonal to
  # W, which is small when g is nearly parallel to W.)
  floor = 0.01 if p_bound is None else 0.0
  assert float(jnp.linalg.norm(u1['w'])) > floor * float(
      jnp.linalg.norm(params['w'])
  )


@jax.jit
def _run_bounded(w0, b0, eta, p_bound, key):
  tx = fj.fromage(eta, p_bound=p_bound)
  params = {'w': w0, 'b': b0}
  state = tx.init(params)

  def body(carry, k):
    p, s = carry
    k1, k2 = jax.random.split(k)
    # Outward push (g = -W) plus noise: the bound is hit and stays active.
    g = {
        'w': -p['w'] + 0.3 * jnp.linalg.norm(p['w']) * jax.random.normal(
            k1, p['w'].shape) / math.sqrt(p['w'].size),
        'b': -p['b'] + 0.3 * jnp.linalg.norm(p['b']) * jax.random.normal(
            k2, p['b'].shape) / math.sqrt(p['b'].size),
    }
    u, s = tx.update(g, s, p)
    p = optax.apply_updates(p, u)
    return (p, s), (jnp.linalg.norm(p['w']), jnp.linalg.norm(p['b']))

  _, norms = jax.lax.scan(body, (params, state), jax.random.split(key, 150))
  return norms


@settings(deadline=None, max_examples=20)
@given(
    seed=st.integers(0, 2**31 - 1),
    eta=st.floats(0.01, 0.2),
    p_bound=st.floats(1.0, 3.0),
)
def test_p_bound_bounds_every_layer_norm(seed, eta, p_bound):
  # One shape: eta and p_bound are traced, so this compiles once.
  w0 = jnp.asarray(_arr(seed, (3, 4)))
  b0 = jnp.asarray(_arr(seed + 1, (5,), scale=0.1))
  w_norms, b_norms = _run_bounded(
      w0, b0, jnp.float32(eta), jnp.float32(p_bound),
      jax.random.PRNGKey(seed % 1000),
  )
  w_bound = p_bound * float(np.linalg.norm(np.asarray(w0, np.float64)))
  b_bound = p_bound * float(np.linalg.norm(np.asarray(b0, np.float64)))
  assert float(jnp.max(w_norms)) <= w_bound * (1 + 1e-5)
  assert float(jnp.max(b_norms)) <= b_bound * (1 + 1e-5)
  # The bound was reached, so the check is not vacuous.
  assert float(w_norms[-1]) >= w_bound * (1 - 1e-3)


_ALL_SHAPES = st.sampled_from([(), (1,), (0,), (3, 0), (5,), (2, 3), (2, 1, 3)])


@settings(deadline=None, max_examples=30)
@given(
    shapes=st.lists(_ALL_SHAPES, min_size=1, max_size=4),
    dtype=st.sampled_from(['float32', 'bfloat16', 'float16']),
    seed=st.integers(0, 2**31 - 1),
    p_bound=st.sampled_from([None, 2.0]),
)
def test_shapes_and_dtypes_random_trees(shapes, dtype, seed, p_bound):
  dtype = jnp.dtype(dtype)
  params = {f'l{i}': jnp.asarray(_arr(seed + i, s)).astype(dtype)
            for i, s in enumerate(shapes)}
  grads = {f'l{i}': jnp.asarray(_arr(seed + 50 + i, s)).astype(dtype)
           for i, s in enumerate(shapes)}
  tx = fj.fromage(0.1, p_bound=p_bound)
  state0 = tx.init(params)
  updates, state = tx.update(grads, state0, params)
  chex.assert_trees_all_equal_shapes_and_dtypes(updates, params)
  chex.assert_trees_all_equal_shapes_and_dtypes(state, state0)
  chex.assert_tree_all_finite(updates)
  for k, w in params.items():
    if w.size == 0:
      continue
    expected = _np_step(np.asarray(w, np.float32),
                        np.asarray(grads[k], np.float32), 0.1)
    if p_bound is None:  # 2x the norm is never reached in one step at 0.1
      tol = 1e-5 if dtype == jnp.float32 else 2e-2
      np.testing.assert_allclose(np.asarray(updates[k], np.float32), expected,
                                 rtol=tol, atol=tol)


@functools.partial(jax.jit, static_argnums=(0,))
def _stacked_vs_separate(p_bound, stacked, grads):
  n_stack = stacked.shape[0]
  tx_s = fj.fromage(0.1, p_bound=p_bound, layer_axes=(0,))
  tx_l = fj.fromage(0.1, p_bound=p_bound)
  sep = [stacked[i] for i in range(n_stack)]
  s_s, s_l = tx_s.init(stacked), tx_l.init(sep)
  out_s, out_l = [], []
  for g in grads:
    u_s, s_s = tx_s.update(g, s_s, stacked)
    u_l, s_l = tx_l.update([g[i] for i in range(n_stack)], s_l, sep)
    out_s.append(u_s)
    out_l.append(jnp.stack(u_l))
    stacked = optax.apply_updates(stacked, u_s)
    sep = optax.apply_updates(sep, u_l)
  return out_s, out_l


@settings(deadline=None, max_examples=20)
@given(
    # Few distinct shapes: each one compiles `_stacked_vs_separate` once.
    n_stack=st.sampled_from([1, 3]),
    inner=st.just((2, 3)),
    seed=st.integers(0, 2**31 - 1),
    p_bound=st.sampled_from([None, 1.05]),
    zero_layer=st.booleans(),
)
def test_stacked_leaf_equals_separate_leaves(
    n_stack, inner, seed, p_bound, zero_layer
):
  w = _arr(seed, (n_stack, *inner))
  if zero_layer:
    w[0] = 0.0  # a zero-norm slice takes the plain step on its own
  grads = [jnp.asarray(_arr(seed + 7 + t, (n_stack, *inner)))
           for t in range(3)]
  out_s, out_l = _stacked_vs_separate(p_bound, jnp.asarray(w), grads)
  for u_s, u_l in zip(out_s, out_l, strict=True):
    # Up to float32 rounding of W' - W (|W| ~ 1): reductions may differ in
    # order between the two layouts.
    np.testing.assert_allclose(
        np.asarray(u_s), np.asarray(u_l), rtol=1e-5, atol=1e-6
    )
  # Non-vacuous: each slice moved by eta relative to its own norm.
  if p_bound is None:
    for i in range(int(zero_layer), n_stack):
      rel = np.linalg.norm(np.asarray(out_s[0][i])) / np.linalg.norm(w[i])
      assert abs(rel - 0.1) <= 0.1**2, (i, rel)


# --- the paper's figure 2: scale-invariant layers --------------------------------------


def _scale_invariant_run(tx, steps, seed=0):
  """Trains W on random gradients projected orthogonal to W (the gradient of
  any loss of W/||W||); returns ||W_t|| for t = 0..steps."""
  w = jax.random.normal(jax.random.PRNGKey(seed), (8, 8))
  state = tx.init(w)

  def body(carry, k):
    w, s = carry
    g = jax.random.normal(k, w.shape)
    g = g - jnp.vdot(g, w) / jnp.vdot(w, w) * w
    u, s = tx.update(g, s, w)
    w = optax.apply_updates(w, u)
    return (w, s), jnp.linalg.norm(w)

  _, norms = jax.jit(lambda w, s: jax.lax.scan(
      body, (w, s), jax.random.split(jax.random.PRNGKey(seed + 1), steps)))(
          w, state)
  return np.concatenate([[float(jnp.linalg.norm(w))], np.asarray(norms)])


def test_figure2_fromage_keeps_scale_invariant_norm_constant():
  eta, steps = 0.01, 2000
  fromage_norms = _scale_invariant_run(fj.fromage(eta), steps)
  rel = np.abs(fromage_norms / fromage_norms[0] - 1)
  assert rel.max() < 1e-3, rel.max()

  lars = optax.chain(
      fj.scale_by_frobenius_ratio(), optax.scale_by_learning_rate(eta)
  )
  lars_norms = _scale_invariant_run(lars, steps)
  for t in (250, 500, 1000, 2000):
    curve = (1 + eta**2) ** (t / 2)
    got = lars_norms[t] / lars_norms[0]
    assert abs(got / curve - 1) < 2e-3, (t, got, curve)
  # The LARS curve has grown measurably, Fromage's has not.
  assert lars_norms[-1] / lars_norms[0] > 1.09


def test_figure2_with_a_real_scale_invariant_loss():
  """Same, with the gradient of loss(W) = sum((W/||W|| - target)^2)."""
  eta = 0.01
  target = jax.random.normal(jax.random.PRNGKey(7), (6, 5))
  target = target / jnp.linalg.norm(target)

  def loss(w):
    return jnp.sum((w / jnp.linalg.norm(w) - target) ** 2)

  def run(tx, steps=300):
    w = 3.0 * jax.random.normal(jax.random.PRNGKey(8), (6, 5))
    state = tx.init(w)

    def body(carry, _):
      w, s = carry
      u, s = tx.update(jax.grad(loss)(w), s, w)
      w = optax.apply_updates(w, u)
      return (w, s), (jnp.linalg.norm(w), loss(w))

    (_, _), (norms, losses) = jax.jit(
        lambda w, s: jax.lax.scan(body, (w, s), None, length=steps))(w, state)
    return float(jnp.linalg.norm(w)), np.asarray(norms), np.asarray(losses)

  n0, norms, losses = run(fj.fromage(eta))
  # Stops before W/||W|| reaches the target (then the gradient is only noise).
  assert losses[-1] < losses[0]
  np.testing.assert_allclose(norms / n0, 1.0, rtol=1e-4)
  n0, norms, _ = run(optax.chain(
      fj.scale_by_frobenius_ratio(), optax.scale_by_learning_rate(eta)))
  np.testing.assert_allclose(
      norms / n0, (1 + eta**2) ** (np.arange(1, 301) / 2), rtol=1e-4
  )
