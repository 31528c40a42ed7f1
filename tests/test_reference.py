"""fromage_jax against the float64 NumPy oracle in fromage_jax.testing."""

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

import fromage_jax
from fromage_jax import testing as ref

STEPS = 50
# float32: each step's arithmetic is a handful of roundings of O(|W|) values
# (eps 6e-8), so one step from identical inputs agrees to ~1e-6 of the
# layer's scale; 1e-5 leaves room and still sees any error of order eta**2.
STEP_RTOL = 1e-5
# After 50 steps the float32 and float64 trajectories drift apart by the
# accumulated per-step roundings (50 * ~1e-6), not more: Fromage's step only
# depends on directions and norms, it does not amplify errors.
TRAJ_RTOL = 2e-4
X64_RTOL = 1e-12


# ---------------------------------------------------------------- helpers


def _np(tree):
  return jax.tree.map(np.asarray, tree)


def assert_tree_close(got, want, rtol, what=''):
  """Each leaf within `rtol` times the leaf's largest |entry| (per leaf)."""
  got_l, got_def = jax.tree.flatten(_np(got))
  want_l, want_def = jax.tree.flatten(_np(want))
  assert got_def == want_def, (got_def, want_def)
  for path_leaf, g, w in zip(
      jax.tree_util.tree_flatten_with_path(_np(want))[0], got_l, want_l,
      strict=True,
  ):
    path = jax.tree_util.keystr(path_leaf[0])
    assert g.shape == w.shape, (what, path, g.shape, w.shape)
    scale = max(float(np.max(np.abs(w), initial=0.0)), 1e-30)
    err = float(np.max(np.abs(np.asarray(g) - w), initial=0.0))
    assert err <= rtol * scale, f'{what} {path}: err {err:.3g} > {rtol} * {scale:.3g}'


def _rand(rng, shape, dtype=np.float32):
  if np.issubdtype(dtype, np.complexfloating):
    return (rng.normal(size=shape) + 1j * rng.normal(size=shape)).astype(dtype)
  return rng.normal(size=shape).astype(dtype)


def make_params(rng, dtype=np.float32):
  """A small multi-leaf tree with the SPEC's edge cases.

  'dense/b' is zero-initialised; 'frozen' always gets a zero gradient;
  'stack' is a [L, d_in, d_out] stack of 3 layers whose slice 1 starts at 0.
  """
  stack = _rand(rng, (3, 4, 2), dtype)
  stack[1] = 0
  return {
      'dense': {'w': _rand(rng, (4, 3), dtype), 'b': np.zeros(3, dtype)},
      'frozen': _rand(rng, (5,), dtype),
      'stack': stack,
  }


STACK_PREFIX = {'dense': None, 'frozen': None, 'stack': (0,)}


def make_grads(rng, params, pull=0.0):
  """Random gradients; zero on 'frozen' and on slice 2 of 'stack'.

  `pull` adds `-pull * params` so the steps grow the norms (for p_bound).
  """
  def g(w):
    return (_rand(rng, w.shape, w.dtype) - pull * np.asarray(w)).astype(w.dtype)

  grads = jax.tree.map(g, params)
  grads['frozen'] = np.zeros_like(params['frozen'])
  grads['stack'][2] = 0
  return grads


def run_against_reference(
    opt, params0, eta_fn, *, seed=0, steps=STEPS, p_bound=None,
    layer_axes=None, pull=0.0, step_rtol=STEP_RTOL, traj_rtol=TRAJ_RTOL,
):
  """Runs `opt` (jitted) and the reference on the same gradient sequence.

  Checks every step from the same params (step_rtol), and the two
  independent trajectories at the end (traj_rtol). Gradients are drawn from
  the jax trajectory's params (for `pull`) and fed to both.

  Returns:
    The number of layer-steps the reference clipped.
  """
  rng = np.random.default_rng(seed)
  opt_state = opt.init(jax.tree.map(jnp.asarray, params0))
  init_norms = ref.layer_norms(params0, layer_axes)

  @jax.jit
  def step(params, state, grads):
    updates, state = opt.update(grads, state, params)
    return optax.apply_updates(params, updates), state, updates

  params = jax.tree.map(jnp.asarray, params0)
  ref_params = params0
  clipped = 0
  for t in range(steps):
    grads = make_grads(rng, _np(params), pull)
    eta = eta_fn(t)
    new_params, opt_state, updates = step(params, opt_state, grads)
    for u, w in zip(
        jax.tree.leaves(updates), jax.tree.leaves(params), strict=True
    ):
      assert u.dtype == w.dtype and u.shape == w.shape
    want, n = ref.fromage_step(
        _np(params), grads, eta, p_bound=p_bound, init_norms=init_norms,
        layer_axes=layer_axes, return_num_clipped=True,
    )
    clipped += n
    assert_tree_close(new_params, want, step_rtol, f'step {t}')
    ref_params = ref.fromage_step(
        ref_params, grads, eta, p_bound=p_bound, init_norms=init_norms,
        layer_axes=layer_axes,
    )
    params = new_params
  assert_tree_close(params, ref_params, traj_rtol, f'after {steps} steps')
  return clipped


def linear_eta(t, init=0.2, end=0.01, steps=40):
  """optax.linear_schedule(init, end, steps), written out independently."""
  return init + (end - init) * min(t, steps) / steps


# ----------------------------------------------------------- full optimizer


def test_constant_lr_matches_reference():
  params = make_params(np.random.default_rng(1))
  run_against_reference(fromage_jax.fromage(0.1), params, lambda t: 0.1)


def test_default_lr_is_0_01():
  params = make_params(np.random.default_rng(2))
  run_against_reference(
      fromage_jax.fromage(), params, lambda t: 0.01, steps=10
  )


def test_schedule_matches_reference():
  # eta_t = schedule(count) with count = 0 on the first update; a different
  # eta every step, so an off-by-one in the count or a prefactor that uses
  # another eta than the step shows up at once.
  params = make_params(np.random.default_rng(3))
  schedule = optax.linear_schedule(0.2, 0.01, 40)
  run_against_reference(fromage_jax.fromage(schedule), params, linear_eta)


def test_exponential_decay_schedule_matches_reference():
  params = make_params(np.random.default_rng(4))
  schedule = optax.exponential_decay(0.3, transition_steps=5, decay_rate=0.5)
  run_against_reference(
      fromage_jax.fromage(schedule), params,
      lambda t: 0.3 * 0.5 ** (t / 5), steps=20,
  )


@pytest.mark.parametrize('p_bound', [1.0, 1.3])
def test_p_bound_matches_reference_and_clips(p_bound):
  params = make_params(np.random.default_rng(5))
  clipped = run_against_reference(
      fromage_jax.fromage(0.1, p_bound=p_bound), params, lambda t: 0.1,
      p_bound=p_bound, pull=2.0,
  )
  assert clipped > 0  # the bound was active, so the test exercises it


def test_p_bound_with_stacked_layers_and_schedule():
  params = make_params(np.random.default_rng(6))
  schedule = optax.linear_schedule(0.2, 0.01, 40)
  clipped = run_against_reference(
      fromage_jax.fromage(schedule, p_bound=1.2, layer_axes=STACK_PREFIX),
      params, linear_eta, p_bound=1.2, layer_axes=STACK_PREFIX, pull=2.0,
  )
  assert clipped > 0


def test_p_bound_never_clips_zero_initialised_layer():
  # ||W0|| = 0: bound 0 would pin the bias to zero; the SPEC says: never clip.
  params = make_params(np.random.default_rng(7))
  opt = fromage_jax.fromage(0.1, p_bound=1.0, layer_axes=STACK_PREFIX)
  state = opt.init(params)
  update = jax.jit(opt.update)
  p = jax.tree.map(jnp.asarray, params)
  rng = np.random.default_rng(0)
  for _ in range(5):
    u, state = update(make_grads(rng, _np(p), 2.0), state, p)
    p = optax.apply_updates(p, u)
  assert float(jnp.linalg.norm(p['dense']['b'])) > 0.05
  assert float(jnp.linalg.norm(p['stack'][1])) > 0.05  # zero slice at init
  # ... while layers with ||W0|| > 0 stay within the bound.
  w0 = np.linalg.norm(params['dense']['w'])
  assert float(jnp.linalg.norm(p['dense']['w'])) <= w0 * (1 + 1e-6)


@pytest.mark.parametrize(
    'layer_axes',
    [
        STACK_PREFIX,
        lambda p: {k: ((0,) if k == 'stack' else None) for k in p},
    ],
    ids=['prefix', 'callable'],
)
def test_stacked_layers_match_reference(layer_axes):
  params = make_params(np.random.default_rng(8))
  run_against_reference(
      fromage_jax.fromage(0.1, layer_axes=layer_axes), params,
      lambda t: 0.1, layer_axes=layer_axes,
  )


def test_layer_axes_tuple_for_every_leaf():
  rng = np.random.default_rng(9)
  stack = _rand(rng, (3, 4, 2))
  stack[1] = 0
  params = {'a': stack, 'b': _rand(rng, (2, 3, 5)), 'c': _rand(rng, (4,))}
  opt = fromage_jax.fromage(0.1, layer_axes=(0,))
  state = opt.init(params)
  update = jax.jit(opt.update)
  p = jax.tree.map(jnp.asarray, params)
  for _ in range(10):
    grads = jax.tree.map(lambda w: _rand(rng, w.shape), params)
    grads['b'][1] = 0
    want = ref.fromage_step(_np(p), grads, 0.1, layer_axes=(0,))
    u, state = update(grads, state, p)
    p = optax.apply_updates(p, u)
    assert_tree_close(p, want, STEP_RTOL)


def test_two_layer_axes():
  # A [2, 3, 4, 5] leaf with layer_axes=(0, 1): 6 layers of 4x5.
  rng = np.random.default_rng(10)
  params = {'w': _rand(rng, (2, 3, 4, 5))}
  params['w'][0, 2] = 0
  opt = fromage_jax.fromage(0.1, p_bound=1.1, layer_axes=(0, 1))
  state = opt.init(params)
  update = jax.jit(opt.update)
  init_norms = ref.layer_norms(params, (0, 1))
  p = jax.tree.map(jnp.asarray, params)
  for _ in range(5):
    grads = {'w': _rand(rng, (2, 3, 4, 5)) - 2 * np.asarray(p['w'])}
    want = ref.fromage_step(
        _np(p), grads, 0.1, p_bound=1.1, init_norms=init_norms,
        layer_axes=(0, 1),
    )
    u, state = update(grads, state, p)
    p = optax.apply_updates(p, u)
    assert_tree_close(p, want, STEP_RTOL)


def test_stacked_leaf_equals_separate_leaves():
  # SPEC: with layer_axes=(0,) an [L, ...] leaf gives exactly the updates of
  # L separate leaves.
  rng = np.random.default_rng(11)
  w = _rand(rng, (3, 4, 2))
  w[1] = 0
  g = _rand(rng, (3, 4, 2))
  g[2] = 0
  stacked = fromage_jax.fromage(0.1, p_bound=1.5, layer_axes=(0,))
  separate = fromage_jax.fromage(0.1, p_bound=1.5)
  u_st, _ = jax.jit(stacked.update)(g, stacked.init(w), w)
  ws, gs = list(w), list(g)
  u_sep, _ = jax.jit(separate.update)(gs, separate.init(ws), ws)
  np.testing.assert_allclose(
      np.asarray(u_st), np.stack([np.asarray(u) for u in u_sep]),
      rtol=1e-6, atol=1e-7,
  )


def test_complex_leaves_match_reference():
  rng = np.random.default_rng(12)
  params = {
      'z': _rand(rng, (4, 3), np.complex64),
      'zb': np.zeros(3, np.complex64),
      'x': _rand(rng, (3,)),
  }
  opt = fromage_jax.fromage(0.1, p_bound=1.2)
  state = opt.init(params)
  update = jax.jit(opt.update)
  init_norms = ref.layer_norms(params)
  p = jax.tree.map(jnp.asarray, params)
  ref_p = params
  clipped = 0
  for _ in range(30):
    grads = jax.tree.map(
        lambda w: (_rand(rng, w.shape, w.dtype) - 2 * np.asarray(w)).astype(
            w.dtype
        ),
        _np(p),
    )
    want, n = ref.fromage_step(
        _np(p), grads, 0.1, p_bound=1.2, init_norms=init_norms,
        return_num_clipped=True,
    )
    clipped += n
    u, state = update(grads, state, p)
    assert u['z'].dtype == jnp.complex64
    p = optax.apply_updates(p, u)
    assert_tree_close(p, want, STEP_RTOL)
    ref_p = ref.fromage_step(
        ref_p, grads, 0.1, p_bound=1.2, init_norms=init_norms
    )
  assert clipped > 0
  assert_tree_close(p, ref_p, TRAJ_RTOL)


def test_float64_under_x64_matches_reference_tightly():
  with jax.enable_x64(True):
    params = make_params(np.random.default_rng(13), np.float64)
    params['c'] = _rand(np.random.default_rng(14), (2, 3), np.complex128)
    # optax's schedules return float32 even under x64 (and XLA may round
    # them differently inside jit), so use a float64 schedule here; the float32
    # tests check optax's own schedules.
    def schedule(count):
      return 0.2 + (0.01 - 0.2) * jnp.minimum(count, 40) / 40

    assert schedule(jnp.int32(3)).dtype == jnp.float64
    layer_axes = STACK_PREFIX | {'c': None}
    opt = fromage_jax.fromage(schedule, p_bound=1.2, layer_axes=layer_axes)
    clipped = run_against_reference(
        opt, params, linear_eta, p_bound=1.2,
        layer_axes=layer_axes, pull=2.0,
        step_rtol=X64_RTOL, traj_rtol=X64_RTOL * 100,
    )
    assert clipped > 0


def test_fromage_is_exactly_the_chain():
  params = make_params(np.random.default_rng(15))
  grads = make_grads(np.random.default_rng(16), params, pull=2.0)
  # The bound is active on this step (so the fused clip is compared too).
  _, n = ref.fromage_step(
      params, grads, 0.2, p_bound=1.1, return_num_clipped=True,
      init_norms=ref.layer_norms(params, STACK_PREFIX), layer_axes=STACK_PREFIX,
  )
  assert n > 0
  lr = optax.linear_schedule(0.2, 0.01, 40)
  chain = optax.chain(
      fromage_jax.scale_by_frobenius_ratio(layer_axes=STACK_PREFIX),
      optax.scale_by_learning_rate(lr),
      fromage_jax.prefactor_correction(lr),
      fromage_jax.norm_clip_to_init(1.1, layer_axes=STACK_PREFIX),
  )
  opt = fromage_jax.fromage(lr, p_bound=1.1, layer_axes=STACK_PREFIX)
  s1, s2 = opt.init(params), chain.init(params)
  update1, update2 = jax.jit(opt.update), jax.jit(chain.update)
  for _ in range(3):
    u1, s1 = update1(grads, s1, params)
    u2, s2 = update2(grads, s2, params)
    # The same formula, possibly evaluated in another order (a fused
    # implementation): float32 roundings of O(|W|) values only, so compare
    # the new params (a shrink-only update W * (1/sqrt(1+eta^2) - 1) is a
    # small difference of such values).
    assert_tree_close(
        optax.apply_updates(params, u1), optax.apply_updates(params, u2), 1e-6
    )


@pytest.mark.parametrize('p_bound', [None, 1.05])
def test_layers_of_many_sizes_stacked_or_not(p_bound):
  # Small and large layers (XLA reduces them with different kernels), zero
  # layers and sub-stacks, with and without stacking.
  rng = np.random.default_rng(19)
  stack = _rand(rng, (3, 64, 64))
  stack[1] = 0
  params = {
      'dense': {'small': _rand(rng, (63, 65)), 'large': _rand(rng, (64, 64)),
                'b': np.zeros(5000, np.float32),
                'substack': _rand(rng, (3, 40, 40))},
      'frozen': _rand(rng, (4100,)),
      'stack': stack,
  }
  layer_axes = {'dense': {'small': None, 'large': None, 'b': None,
                          'substack': (0,)},
                'frozen': None, 'stack': (0,)}
  clipped = run_against_reference(
      fromage_jax.fromage(0.1, p_bound=p_bound, layer_axes=layer_axes),
      params, lambda t: 0.1, p_bound=p_bound, layer_axes=layer_axes,
      pull=2.0, steps=10,
  )
  assert (clipped > 0) == (p_bound is not None)


def test_relative_step_is_about_eta():
  # The paper's equation 6: ||W' - W|| / ||W|| = eta + O(eta**2).
  params = make_params(np.random.default_rng(17))
  grads = make_grads(np.random.default_rng(18), params)
  eta = 0.01
  opt = fromage_jax.fromage(eta)
  u, _ = jax.jit(opt.update)(grads, opt.init(params), params)
  rel = fromage_jax.relative_update_norms(u, params)
  assert abs(float(rel['dense']['w']) - eta) < 2 * eta**2
  # 'stack' is one layer here (no layer_axes): it too moves by about eta.
  assert abs(float(rel['stack']) - eta) < 2 * eta**2
  # The zero-gradient layer only shrinks: relative move 1 - 1/sqrt(1+eta^2).
  np.testing.assert_allclose(
      float(rel['frozen']), 1 - 1 / np.sqrt(1 + eta**2), rtol=1e-2
  )


# ------------------------------------------------------ standalone transforms


def test_scale_by_frobenius_ratio_matches_reference():
  rng = np.random.default_rng(19)
  params = make_params(rng)
  params['z'] = _rand(rng, (3, 2), np.complex64)
  grads = make_grads(rng, params)
  layer_axes = STACK_PREFIX | {'z': None}
  tx = fromage_jax.scale_by_frobenius_ratio(layer_axes=layer_axes)
  u, _ = jax.jit(tx.update)(grads, tx.init(params), params)
  want = ref.frobenius_ratio_direction(params, grads, layer_axes)
  assert_tree_close(u, want, STEP_RTOL)
  # Sanity of the oracle itself on the edge cases it encodes.
  np.testing.assert_allclose(want['dense']['b'], grads['dense']['b'])  # r = 1
  assert np.all(want['frozen'] == 0)
  np.testing.assert_allclose(
      np.linalg.norm(want["dense"]["w"]),
      np.linalg.norm(params["dense"]["w"].astype(np.float64)),
      rtol=1e-12,
  )


@pytest.mark.parametrize('schedule', [False, True])
def test_prefactor_correction_matches_reference(schedule):
  rng = np.random.default_rng(20)
  params = make_params(rng)
  lr = optax.linear_schedule(0.2, 0.01, 40) if schedule else 0.3
  eta_fn = linear_eta if schedule else (lambda t: 0.3)
  tx = fromage_jax.prefactor_correction(lr)
  state = tx.init(params)
  update = jax.jit(tx.update)
  for t in range(6):
    u_in = make_grads(rng, params)
    u, state = update(u_in, state, params)
    got = optax.apply_updates(jax.tree.map(jnp.asarray, params), u)
    assert_tree_close(got, ref.prefactor(params, u_in, eta_fn(t)), STEP_RTOL)


def test_norm_clip_to_init_matches_reference():
  rng = np.random.default_rng(21)
  params0 = make_params(rng)
  tx = fromage_jax.norm_clip_to_init(1.5, layer_axes=STACK_PREFIX)
  state = tx.init(params0)
  init_norms = ref.layer_norms(params0, STACK_PREFIX)
  update = jax.jit(tx.update)
  total_clipped = 0
  total_layers = 0
  for scale in (0.05, 0.5, 2.0, 5.0):
    params = jax.tree.map(lambda w: w + _rand(rng, w.shape) * 0.1, params0)
    u_in = jax.tree.map(lambda w, s=scale: _rand(rng, w.shape) * s, params0)
    u, state = update(u_in, state, params)
    got = optax.apply_updates(jax.tree.map(jnp.asarray, params), u)
    new = jax.tree.map(lambda w, d: w.astype(np.float64) + d, params, u_in)
    want, n = ref.clip_to_init(new, init_norms, 1.5, STACK_PREFIX)
    total_clipped += n
    total_layers += 6  # w, b, frozen, 3 stack slices
    assert_tree_close(got, want, STEP_RTOL)
    # zero-initialised layers are never clipped, however large.
    np.testing.assert_allclose(got['dense']['b'], new['dense']['b'], rtol=1e-6)
    np.testing.assert_allclose(got['stack'][1], new['stack'][1], rtol=1e-6)
  assert 0 < total_clipped < total_layers  # some clipped, some not


# ------------------------------------------------------------- diagnostics


@pytest.mark.parametrize('layer_axes', [None, STACK_PREFIX])
def test_deep_relative_trust_matches_reference(layer_axes):
  rng = np.random.default_rng(22)
  params = make_params(rng)
  other = jax.tree.map(lambda w: w + 0.1 * _rand(rng, w.shape), params)
  got = fromage_jax.deep_relative_trust(params, other, layer_axes=layer_axes)
  want = ref.deep_relative_trust(params, other, layer_axes)
  np.testing.assert_allclose(float(got), want, rtol=1e-5)


def test_deep_relative_trust_closed_form():
  # Every layer with ||W|| > 0 moved by exactly eta relative to its norm:
  # (1 + eta)**L - 1; zero layers are left out.
  rng = np.random.default_rng(23)
  params = make_params(rng)  # 'dense/b' and 'stack'[1] are zero
  eta = 0.03
  other = jax.tree.map(lambda w: w * (1 + eta), params)
  # Per leaf: dense/w, frozen, stack(one layer) -> 3 layers; dense/b excluded.
  np.testing.assert_allclose(
      float(fromage_jax.deep_relative_trust(params, other)),
      (1 + eta) ** 3 - 1, rtol=1e-5,
  )
  # Stacked: dense/w, frozen, stack slices 0 and 2 -> 4 layers.
  np.testing.assert_allclose(
      float(fromage_jax.deep_relative_trust(params, other, STACK_PREFIX)),
      (1 + eta) ** 4 - 1, rtol=1e-5,
  )


@pytest.mark.parametrize('layer_axes', [None, STACK_PREFIX])
def test_relative_update_norms_matches_reference(layer_axes):
  rng = np.random.default_rng(24)
  params = make_params(rng)
  params['dense']['b'] = _rand(rng, (3,))
  params['stack'][1] = _rand(rng, (4, 2))
  updates = jax.tree.map(lambda w: 0.1 * _rand(rng, w.shape), params)
  got = fromage_jax.relative_update_norms(updates, params, layer_axes=layer_axes)
  want = ref.relative_update_norms(updates, params, layer_axes)
  assert_tree_close(got, want, 1e-5)
  expected_shape = (3,) if layer_axes else ()
  assert np.shape(got['stack']) == expected_shape


def test_relative_update_norms_zero_params_is_inf():
  got = fromage_jax.relative_update_norms(
      {'b': jnp.ones(3)}, {'b': jnp.zeros(3)}
  )
  assert np.isinf(float(got['b']))


def test_descent_learning_rate_bound_matches_formula():
  depths = np.array([1, 2, 5, 16, 50, 1000])
  for cos in (1.0, 0.5, 0.0, -0.5):
    got = np.asarray(fromage_jax.descent_learning_rate_bound(depths, cos))
    np.testing.assert_allclose(
        got, ref.descent_learning_rate_bound(depths, cos), rtol=1e-5, atol=1e-7
    )
  # Known values: one layer, aligned step: eta < 1; cos = 0: no descent room.
  np.testing.assert_allclose(
      float(fromage_jax.descent_learning_rate_bound(1)), 1.0, rtol=1e-6
  )
  assert float(fromage_jax.descent_learning_rate_bound(7, 0.0)) == 0.0
