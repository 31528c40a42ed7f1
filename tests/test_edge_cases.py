"""One test (or parametrised group) per row of SPEC.md's "Edge cases" table.

Expected values are computed independently in numpy float64 from the SPEC's
formulas, never by calling the package twice.
"""

import math

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

import fromage_jax as fj
from fromage_jax import testing as reference


def _np_fromage_layer(w, g, eta, w0=None, p_bound=None):
  """The float64 reference's update `W' - W` for one layer."""
  return reference.fromage_layer(w, g, eta, w0=w0, p_bound=p_bound) - w


def _rand(key, shape, dtype=jnp.float32):
  return jax.random.normal(jax.random.PRNGKey(key), shape, dtype)


# --- ||W|| = 0: plain step ---------------------------------------------------


@pytest.mark.parametrize('p_bound', [None, 2.0])
@pytest.mark.parametrize('eta', [0.01, 0.3])
def test_zero_norm_layer_takes_plain_step(eta, p_bound):
  params = {'w': _rand(0, (3, 4)), 'b': jnp.zeros((4,))}
  grads = {'w': _rand(1, (3, 4)), 'b': _rand(2, (4,))}
  tx = fj.fromage(eta, p_bound=p_bound)
  updates, _ = jax.jit(tx.update)(grads, tx.init(params), params)

  g_b = np.asarray(grads['b'], np.float64)
  expected_b = -eta * g_b / math.sqrt(1 + eta**2)
  np.testing.assert_allclose(updates['b'], expected_b, rtol=1e-6, atol=1e-8)
  # The bias really moves: by eta/sqrt(1+eta^2)*||g||, not ~1e-8.
  assert np.linalg.norm(np.asarray(updates['b'])) > 0.5 * eta * np.linalg.norm(
      g_b
  )
  # The non-zero layer uses the ratio as usual.
  expected_w = _np_fromage_layer(params['w'], grads['w'], eta)
  np.testing.assert_allclose(updates['w'], expected_w, rtol=1e-5, atol=1e-7)


def test_zero_norm_layer_learns_over_steps():
  """A zero-initialised bias trained towards a target actually gets there."""
  target = jnp.array([1.0, -2.0, 0.5])
  params = {'b': jnp.zeros(3)}
  tx = fj.fromage(0.1)
  state = tx.init(params)

  def loss(p):
    return jnp.sum((p['b'] - target) ** 2)

  @jax.jit
  def step(p, s):
    u, s = tx.update(jax.grad(loss)(p), s, p)
    return optax.apply_updates(p, u), s

  for _ in range(100):
    params, state = step(params, state)
  assert float(loss(params)) < 0.05 * float(jnp.sum(target**2))


# --- ||g|| = 0, ||W|| > 0 ------------------------------------------------------


@pytest.mark.parametrize('p_bound', [None, 1.5])
@pytest.mark.parametrize('eta', [0.01, 0.5])
def test_zero_gradient_shrinks_by_prefactor(eta, p_bound):
  params = {'w': _rand(3, (2, 5)), 'v': _rand(4, (7,))}
  grads = jax.tree.map(jnp.zeros_like, params)
  tx = fj.fromage(eta, p_bound=p_bound)
  updates, _ = tx.update(grads, tx.init(params), params)
  new = optax.apply_updates(params, updates)
  for k in params:
    expected = np.asarray(params[k], np.float64) / math.sqrt(1 + eta**2)
    np.testing.assert_allclose(new[k], expected, rtol=1e-6, atol=1e-7)
    assert np.all(np.isfinite(np.asarray(updates[k])))


# --- p_bound with ||W0|| = 0 ---------------------------------------------------


def test_p_bound_never_clips_zero_init_layer():
  p_bound = 1.0
  params = {'w': _rand(5, (3, 3)), 'b': jnp.zeros((3,))}
  w0_norm = float(jnp.linalg.norm(params['w']))
  tx = fj.fromage(0.1, p_bound=p_bound)
  state = tx.init(params)
  # loss = -||p||^2 / 2 pushes every layer outwards (g = -W), plus a constant
  # pull on the bias so that its first (plain) step is non-zero.
  def grad_fn(p):
    return {'w': -p['w'], 'b': -p['b'] - 1.0}

  @jax.jit
  def run(p, s):
    def body(carry, _):
      p, s = carry
      u, s = tx.update(grad_fn(p), s, p)
      return (optax.apply_updates(p, u), s), None
    (p, s), _ = jax.lax.scan(body, (p, s), None, length=200)
    return p, s

  params, state = run(params, state)
  b_norm = float(jnp.linalg.norm(params['b']))
  w_norm = float(jnp.linalg.norm(params['w']))
  assert np.isfinite(b_norm)
  # Growth ~ (1.1/sqrt(1.01))^200 ~ 7e7: far beyond any bound.
  assert b_norm > 1e4, b_norm
  # The bound is active for the layer with ||W0|| > 0.
  assert w_norm <= p_bound * w0_norm * (1 + 1e-5)
  assert w_norm >= p_bound * w0_norm * (1 - 1e-4)


# --- non-finite gradients --------------------------------------------------------


@pytest.mark.parametrize('bad', [np.nan, np.inf, -np.inf])
@pytest.mark.parametrize('p_bound', [None, 2.0])
def test_non_finite_gradient_only_affects_its_layer(bad, p_bound):
  params = {'a': _rand(6, (3, 4)), 'b': _rand(7, (4,)), 'c': _rand(8, (2,))}
  grads = {'a': _rand(9, (3, 4)), 'b': _rand(10, (4,)), 'c': _rand(11, (2,))}
  grads['b'] = grads['b'].at[1].set(bad)
  tx = fj.fromage(0.05, p_bound=p_bound)
  updates, _ = jax.jit(tx.update)(grads, tx.init(params), params)
  # Nothing is hidden: the affected layer's update is non-finite.
  assert not np.all(np.isfinite(np.asarray(updates['b'])))
  # The other layers are finite and exactly what the formula gives.
  for k in ('a', 'c'):
    expected = _np_fromage_layer(params[k], grads[k], 0.05)
    np.testing.assert_allclose(updates[k], expected, rtol=1e-5, atol=1e-7)


def test_apply_if_finite_skips_nan_step_and_training_continues():
  k1, k2 = jax.random.split(jax.random.PRNGKey(0))
  x = jax.random.normal(k1, (64, 5))
  teacher = jax.random.normal(k2, (5, 3))
  y = x @ teacher
  params = {'w': 0.5 * _rand(12, (5, 3)), 'b': jnp.zeros((3,))}

  def loss(p):
    return jnp.mean((x @ p['w'] + p['b'] - y) ** 2)

  tx = optax.apply_if_finite(fj.fromage(0.02), max_consecutive_errors=3)
  state = tx.init(params)

  @jax.jit
  def step(p, s, poison):
    g = jax.grad(loss)(p)
    g = {'w': g['w'], 'b': jnp.where(poison, jnp.nan, g['b'])}
    u, s = tx.update(g, s, p)
    return optax.apply_updates(p, u), s

  for _ in range(30):
    params, state = step(params, state, False)
  loss_before = float(loss(params))
  before = params
  params, state = step(params, state, True)
  # Skipped: params unchanged and finite, the error counted.
  jax.tree.map(
      lambda a, b: np.testing.assert_array_equal(np.asarray(a), np.asarray(b)),
      params, before,
  )
  assert int(state.notfinite_count) == 1
  assert int(state.total_notfinite) == 1
  losses = []
  for _ in range(30):
    params, state = step(params, state, False)
    losses.append(float(loss(params)))
  assert int(state.notfinite_count) == 0
  assert all(np.isfinite(losses))
  assert losses[-1] < 0.9 * loss_before
  assert losses[5] < loss_before


# --- params=None ------------------------------------------------------------------


@pytest.mark.parametrize(
    'name, make',
    [
        ('fromage', lambda: fj.fromage(0.1)),
        ('fromage', lambda: fj.fromage(0.1, p_bound=2.0)),
        ('scale_by_frobenius_ratio', fj.scale_by_frobenius_ratio),
        ('prefactor_correction', lambda: fj.prefactor_correction(0.1)),
        ('norm_clip_to_init', lambda: fj.norm_clip_to_init(2.0)),
    ],
)
def test_params_none_raises(name, make):
  tx = make()
  params = {'w': jnp.ones((2, 2))}
  state = tx.init(params)
  with pytest.raises(ValueError) as info:
    tx.update(params, state, None)
  msg = str(info.value)
  assert name in msg
  assert 'requires params' in msg or 'params are required' in msg, msg


def test_params_none_raises_fromage_on_plateau():
  tx = fj.fromage_on_plateau(0.1)
  params = {'w': jnp.ones((2, 2))}
  state = tx.init(params)
  with pytest.raises(ValueError, match='requires params'):
    tx.update(params, state, None, value=1.0)


# --- structure / shape mismatch ------------------------------------------------


_PARAMS = {'layer': {'w': jnp.ones((2, 3)), 'b': jnp.ones((3,))}}


@pytest.mark.parametrize('jit', [False, True])
@pytest.mark.parametrize(
    'bad_updates, error, needle',
    [
        ({'layer': {'w': jnp.ones((2, 3)), 'b': jnp.ones((4,))}}, ValueError,
         "['layer']['b']"),
        ({'layer': {'w': jnp.ones((3, 2)), 'b': jnp.ones((3,))}}, ValueError,
         "['layer']['w']"),
        ({'layer': {'w': jnp.ones((2, 3)), 'b': jnp.ones((3,), jnp.complex64)}},
         TypeError, "['layer']['b']"),
        ({'layer': {'w': jnp.ones((2, 3)), 'bias': jnp.ones((3,))}},
         ValueError, "['layer']['bias']"),
        ({'layer': {'w': jnp.ones((2, 3))}}, ValueError, "['layer']['b']"),
    ],
    ids=['shape_b', 'shape_w', 'complex_for_real', 'renamed', 'missing'],
)
@pytest.mark.parametrize('p_bound', [None, 2.0])
def test_mismatch_raises_at_trace_time_naming_leaf(
    bad_updates, error, needle, jit, p_bound
):
  tx = fj.fromage(0.1, p_bound=p_bound)
  state = tx.init(_PARAMS)
  update = jax.jit(tx.update) if jit else tx.update
  with pytest.raises(error) as info:
    update(bad_updates, state, _PARAMS)
  msg = str(info.value)
  assert needle in msg, msg
  assert 'fromage_jax' in msg, msg


@pytest.mark.parametrize(
    'make',
    [lambda: fj.prefactor_correction(0.1), lambda: fj.norm_clip_to_init(2.0)],
)
@pytest.mark.parametrize('jit', [False, True])
def test_later_transforms_check_shapes_too(make, jit):
  tx = make()
  state = tx.init(_PARAMS)
  bad = {'layer': {'w': jnp.ones((2, 3)), 'b': jnp.ones((5,))}}
  update = jax.jit(tx.update) if jit else tx.update
  with pytest.raises(ValueError) as info:
    update(bad, state, _PARAMS)
  assert "['layer']['b']" in str(info.value)


# --- integer / bool leaves ---------------------------------------------------------


_MAKERS = [
    lambda: fj.fromage(0.1),
    lambda: fj.fromage(0.1, p_bound=2.0),
    fj.scale_by_frobenius_ratio,
    lambda: fj.prefactor_correction(0.1),
    lambda: fj.norm_clip_to_init(2.0),
]


@pytest.mark.parametrize('dtype', [jnp.int32, jnp.int8, jnp.uint8, jnp.bool_])
@pytest.mark.parametrize('make', _MAKERS)
def test_int_and_bool_params_raise_type_error_naming_leaf(make, dtype):
  params = {'dense': {'w': jnp.ones((2, 2))}, 'emb': {'ids': jnp.ones(3, dtype)}}
  tx = make()
  with pytest.raises(TypeError) as info:
    tx.init(params)
  assert 'ids' in str(info.value) and 'emb' in str(info.value), info.value


@pytest.mark.parametrize('dtype', [jnp.int32, jnp.bool_])
@pytest.mark.parametrize('jit', [False, True])
def test_int_and_bool_leaves_raise_type_error_in_update(dtype, jit):
  """Even if init was skipped (state built from float params)."""
  float_params = {'emb': {'ids': jnp.ones(3)}}
  int_params = {'emb': {'ids': jnp.ones(3, dtype)}}
  for make in _MAKERS:
    tx = make()
    state = tx.init(float_params)
    update = jax.jit(tx.update) if jit else tx.update
    with pytest.raises(TypeError) as info:
      update(int_params, state, int_params)
    assert 'ids' in str(info.value), info.value


@pytest.mark.parametrize(
    'make', [lambda: fj.prefactor_correction(0.1), lambda: fj.norm_clip_to_init(2)]
)
def test_int_updates_with_float_params_raise_type_error(make):
  params = {'emb': {'ids': jnp.ones(3)}}
  tx = make()
  with pytest.raises(TypeError) as info:
    tx.update({'emb': {'ids': jnp.ones(3, jnp.int32)}}, tx.init(params), params)
  assert 'ids' in str(info.value)


# --- complex leaves -----------------------------------------------------------------


@pytest.mark.parametrize('p_bound', [None, 1.01])
@pytest.mark.parametrize('jit', [False, True])
def test_complex_leaves_use_abs_squared_norms(jit, p_bound):
  eta = 0.2
  def c(k, shape):
    return (_rand(k, shape) + 1j * _rand(k + 100, shape)).astype(jnp.complex64)

  params = {'z': c(20, (3, 4)), 'x': _rand(21, (5,)), 'zb': jnp.zeros(
      (2,), jnp.complex64)}
  grads = {'z': c(22, (3, 4)), 'x': _rand(23, (5,)), 'zb': c(24, (2,))}
  tx = fj.fromage(eta, p_bound=p_bound)
  update = jax.jit(tx.update) if jit else tx.update
  updates, _ = update(grads, tx.init(params), params)
  assert updates['z'].dtype == jnp.complex64
  assert updates['zb'].dtype == jnp.complex64
  for k in params:
    w = np.asarray(params[k])
    expected = _np_fromage_layer(w, np.asarray(grads[k]), eta, w, p_bound)
    np.testing.assert_allclose(
        np.asarray(updates[k]), expected, rtol=1e-5, atol=1e-6
    )
  # Relative step of the complex layer is ~eta (|z|^2 norms, not real parts).
  rel = np.linalg.norm(np.asarray(updates['z'])) / np.linalg.norm(
      np.asarray(params['z'])
  )
  assert abs(rel - eta) < eta**2


# --- hyperparameter validation -------------------------------------------------------


_BAD_LR = [-0.1, -1e-9, float('nan'), float('inf'), -float('inf')]
_BAD_P = [0.0, -1.0, float('nan'), float('inf'), -float('inf')]


@pytest.mark.parametrize('lr', _BAD_LR)
@pytest.mark.parametrize(
    'make',
    [
        lambda lr: fj.fromage(lr),
        lambda lr: fj.prefactor_correction(lr),
        lambda lr: fj.fromage_on_plateau(lr),
    ],
    ids=['fromage', 'prefactor_correction', 'fromage_on_plateau'],
)
def test_bad_learning_rate_raises_at_construction(make, lr):
  with pytest.raises(ValueError, match='learning_rate'):
    make(lr)


@pytest.mark.parametrize('p', _BAD_P)
@pytest.mark.parametrize(
    'make',
    [
        lambda p: fj.fromage(0.01, p_bound=p),
        lambda p: fj.norm_clip_to_init(p),
        lambda p: fj.fromage_on_plateau(0.01, p_bound=p),
    ],
    ids=['fromage', 'norm_clip_to_init', 'fromage_on_plateau'],
)
def test_bad_p_bound_raises_at_construction(make, p):
  with pytest.raises(ValueError, match='p_bound'):
    make(p)


_NOT_NUMBERS = [None, '0.01', True, [0.01], 1j]


@pytest.mark.parametrize('value', _NOT_NUMBERS, ids=repr)
@pytest.mark.parametrize(
    'make',
    [
        lambda v: fj.fromage(v),
        lambda v: fj.prefactor_correction(v),
        lambda v: fj.fromage_on_plateau(v),
        lambda v: fj.fromage(0.01, p_bound=v if v is not None else 'x'),
        lambda v: fj.norm_clip_to_init(v),
        lambda v: fj.fromage_on_plateau(0.01, factor=v),
    ],
    ids=['fromage', 'prefactor_correction', 'fromage_on_plateau',
         'fromage_p_bound', 'norm_clip_to_init', 'plateau_factor'],
)
def test_hyperparameter_of_wrong_type_raises_type_error_when_built(make, value):
  with pytest.raises(TypeError, match='must be'):
    make(value)


def test_non_scalar_learning_rate_raises_value_error_when_built():
  with pytest.raises(ValueError, match='scalar'):
    fj.fromage(jnp.array([0.01, 0.02]))


@pytest.mark.parametrize(
    'kwargs, error',
    [
        (dict(factor=0.0), ValueError), (dict(factor=1.0), ValueError),
        (dict(patience=-1), ValueError), (dict(patience=2.5), TypeError),
        (dict(cooldown=-1), ValueError), (dict(accumulation_size=0), ValueError),
        (dict(rtol=-1e-4), ValueError), (dict(atol=float('nan')), ValueError),
        (dict(min_scale=2.0), ValueError),
    ],
    ids=repr,
)
def test_bad_plateau_settings_raise_when_built(kwargs, error):
  with pytest.raises(error, match=next(iter(kwargs))):
    fj.fromage_on_plateau(0.01, **kwargs)


def test_good_hyperparameters_of_other_number_types_are_accepted():
  for lr in (0, 1, np.float32(0.01), jnp.asarray(0.01), np.int64(1)):
    fj.fromage(lr)
  fj.fromage(0.01, p_bound=np.float64(2.0))
  fj.fromage_on_plateau(0.01, patience=np.int32(3), factor=np.float32(0.5))


def test_zero_learning_rate_is_accepted_and_is_identity():
  params = {'w': _rand(30, (3,))}
  tx = fj.fromage(0.0)
  updates, _ = tx.update(_rand(31, (3,)), tx.init(params['w']), params['w'])
  np.testing.assert_allclose(updates, 0.0, atol=1e-7)


@pytest.mark.parametrize(
    'make',
    [
        lambda s: fj.fromage(s),
        lambda s: fj.fromage(s, p_bound=3.0),
        lambda s: optax.chain(
            fj.scale_by_frobenius_ratio(),
            optax.scale_by_learning_rate(s),
            fj.prefactor_correction(s),
        ),
    ],
)
def test_schedule_is_accepted_and_uses_eta_t(make):
  schedule = optax.exponential_decay(0.3, transition_steps=1, decay_rate=0.5)
  tx = make(schedule)
  w = _rand(32, (4,))
  state = tx.init(w)
  for t in range(3):
    g = _rand(33 + t, (4,))
    updates, state = tx.update(g, state, w)
    expected = _np_fromage_layer(w, g, 0.3 * 0.5**t)
    np.testing.assert_allclose(updates, expected, rtol=1e-5, atol=1e-7)
    w = optax.apply_updates(w, updates)


def test_fromage_on_plateau_accepts_schedule():
  schedule = optax.linear_schedule(0.1, 0.01, 10)
  tx = fj.fromage_on_plateau(schedule)
  w = _rand(40, (3,))
  g = _rand(41, (3,))
  updates, _ = tx.update(g, tx.init(w), w, value=1.0)
  np.testing.assert_allclose(
      updates, _np_fromage_layer(w, g, 0.1), rtol=1e-5, atol=1e-7
  )


# --- optax.masked / MaskedNode ---------------------------------------------------------


@pytest.mark.parametrize('p_bound', [None, 2.0])
@pytest.mark.parametrize('jit', [False, True])
def test_masked_leaves_pass_through(p_bound, jit):
  eta = 0.1
  params = {
      'w': _rand(50, (2, 3)),
      'b': jnp.zeros((3,)),
      'frozen': _rand(51, (4,)),
      'step': jnp.array(7, jnp.int32),
  }
  grads = {
      'w': _rand(52, (2, 3)),
      'b': _rand(53, (3,)),
      'frozen': _rand(54, (4,)),
      'step': jnp.array(3, jnp.int32),
  }
  mask = {'w': True, 'b': True, 'frozen': False, 'step': False}
  tx = optax.masked(fj.fromage(eta, p_bound=p_bound), mask)
  state = tx.init(params)
  update = jax.jit(tx.update) if jit else tx.update
  updates, _ = update(grads, state, params)
  # Masked-out leaves: the incoming updates, untouched.
  np.testing.assert_array_equal(updates['frozen'], grads['frozen'])
  np.testing.assert_array_equal(updates['step'], grads['step'])
  assert updates['step'].dtype == jnp.int32
  # The rest: Fromage.
  for k in ('w', 'b'):
    expected = _np_fromage_layer(params[k], grads[k], eta)
    np.testing.assert_allclose(updates[k], expected, rtol=1e-5, atol=1e-7)


# --- empty pytree ------------------------------------------------------------------------


@pytest.mark.parametrize('jit', [False, True])
@pytest.mark.parametrize('p_bound', [None, 2.0])
@pytest.mark.parametrize(
    'empty', [{}, [], (), {'a': {}}, {'a': []}], ids=repr
)
def test_empty_pytree(empty, p_bound, jit):
  tx = fj.fromage(0.1, p_bound=p_bound)
  state = tx.init(empty)
  update = jax.jit(tx.update) if jit else tx.update
  updates, new_state = update(empty, state, empty)
  assert jax.tree.structure(updates) == jax.tree.structure(empty)
  assert jax.tree.leaves(updates) == []
  assert jax.tree.structure(new_state) == jax.tree.structure(state)
