"""The public transforms one by one: `scale_by_frobenius_ratio`,
`prefactor_correction`, `norm_clip_to_init` and `norm_project_to_init`,
against the float64 oracle (`fromage_jax.testing`) and the paper's figure 2.
"""

import math

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

import fromage_jax as fj
from fromage_jax import testing
from tests import helpers

# -------------------------------------------------- scale_by_frobenius_ratio ---


def test_scale_by_frobenius_ratio_matches_reference():
  rng = np.random.default_rng(19)
  params = helpers.reference_params(rng)
  params['z'] = helpers.draw(rng, (3, 2), np.complex64)
  grads = helpers.reference_grads(rng, params)
  layer_axes = helpers.STACK_PREFIX | {'z': None}
  tx = fj.scale_by_frobenius_ratio(layer_axes=layer_axes)
  u, _ = jax.jit(tx.update)(grads, tx.init(params), params)
  want = testing.frobenius_ratio_direction(params, grads, layer_axes)
  helpers.assert_trees_close_to_scale(u, want, helpers.STEP_RTOL)
  # Sanity of the oracle itself on the edge cases it encodes.
  np.testing.assert_allclose(want['dense']['b'], grads['dense']['b'])  # r = 1
  assert np.all(want['frozen'] == 0)
  np.testing.assert_allclose(
      np.linalg.norm(want["dense"]["w"]),
      np.linalg.norm(params["dense"]["w"].astype(np.float64)),
      rtol=1e-12,
  )


def _below_floor(rng, params, floor):
  """Reference gradients, with every other leaf's norm pushed under
  `floor` (some layers below it, some above)."""
  grads = helpers.reference_grads(rng, params)
  leaves, treedef = jax.tree.flatten(grads)
  return treedef.unflatten([
      g * (floor / 10 / max(np.linalg.norm(g), 1e-30)) if i % 2 else g
      for i, g in enumerate(leaves)])


@pytest.mark.parametrize('p_bound', [None, 1.5])
def test_grad_norm_floor_matches_reference(p_bound):
  """`||W|| / max(||g||, floor)`, in the transform and in both forms of the
  alias, stacked layers included."""
  floor = 1e-3
  rng = np.random.default_rng(23)
  params = helpers.reference_params(rng)
  grads = _below_floor(rng, params, floor)
  axes = helpers.STACK_PREFIX
  tx = fj.scale_by_frobenius_ratio(grad_norm_floor=floor, layer_axes=axes)
  u, _ = jax.jit(tx.update)(grads, tx.init(params), params)
  want = testing.frobenius_ratio_direction(params, grads, axes, floor)
  helpers.assert_trees_close_to_scale(u, want, helpers.STEP_RTOL)
  tx = fj.fromage(0.1, p_bound=p_bound, grad_norm_floor=floor,
                  layer_axes=axes)
  u, _ = jax.jit(tx.update)(grads, tx.init(params), params)
  want = testing.fromage_step(
      params, grads, 0.1, p_bound=p_bound, grad_norm_floor=floor,
      init_norms=testing.layer_norms(params, axes), layer_axes=axes)
  helpers.assert_trees_close_to_scale(optax.apply_updates(params, u), want,
                                      helpers.STEP_RTOL)


def test_grad_norm_floor_shrinks_small_steps_and_frees_zero_layers():
  """Below the floor a layer's step shrinks in proportion to its gradient;
  above it nothing changes; a zero-initialised layer takes the plain step
  whatever its gradient's norm."""
  floor = 1e-2
  params = {'w': jnp.array([3.0, 4.0]), 'b': jnp.zeros(2)}
  tx = fj.scale_by_frobenius_ratio(grad_norm_floor=floor)
  for scale in (1.0, 1e-3, 1e-5):
    grads = {'w': jnp.array([0.6, -0.8]) * scale,
             'b': jnp.array([1.0, 1.0]) * scale}
    u, _ = tx.update(grads, tx.init(params), params)
    relative = float(jnp.linalg.norm(u['w']) / 5.0)
    np.testing.assert_allclose(relative, min(1.0, scale / floor), rtol=1e-5)
    np.testing.assert_allclose(u['b'], grads['b'], rtol=1e-6)


# ------------------------------------------------------ prefactor_correction ---


@pytest.mark.parametrize('schedule', [False, True])
def test_prefactor_correction_matches_reference(schedule):
  rng = np.random.default_rng(20)
  params = helpers.reference_params(rng)
  lr = optax.linear_schedule(0.2, 0.01, 40) if schedule else 0.3
  eta_fn = helpers.linear_eta if schedule else (lambda t: 0.3)
  tx = fj.prefactor_correction(lr)
  state = tx.init(params)
  update = jax.jit(tx.update)
  for t in range(6):
    u_in = helpers.reference_grads(rng, params)
    u, state = update(u_in, state, params)
    got = optax.apply_updates(jax.tree.map(jnp.asarray, params), u)
    helpers.assert_trees_close_to_scale(got, testing.prefactor(params, u_in, eta_fn(t)), helpers.STEP_RTOL)


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


# --------------------------------------------------------- norm_clip_to_init ---


def test_norm_clip_to_init_matches_reference():
  rng = np.random.default_rng(21)
  params0 = helpers.reference_params(rng)
  tx = fj.norm_clip_to_init(1.5, layer_axes=helpers.STACK_PREFIX)
  state = tx.init(params0)
  init_norms = testing.layer_norms(params0, helpers.STACK_PREFIX)
  update = jax.jit(tx.update)
  total_clipped = 0
  total_layers = 0
  for scale in (0.05, 0.5, 2.0, 5.0):
    params = jax.tree.map(lambda w: w + helpers.draw(rng, w.shape) * 0.1, params0)
    u_in = jax.tree.map(lambda w, s=scale: helpers.draw(rng, w.shape) * s, params0)
    u, state = update(u_in, state, params)
    got = optax.apply_updates(jax.tree.map(jnp.asarray, params), u)
    new = jax.tree.map(lambda w, d: w.astype(np.float64) + d, params, u_in)
    want, n = testing.clip_to_init(new, init_norms, 1.5, helpers.STACK_PREFIX)
    total_clipped += n
    total_layers += 6  # w, b, frozen, 3 stack slices
    helpers.assert_trees_close_to_scale(got, want, helpers.STEP_RTOL)
    # zero-initialised layers are never clipped, however large.
    np.testing.assert_allclose(got['dense']['b'], new['dense']['b'], rtol=1e-6)
    np.testing.assert_allclose(got['stack'][1], new['stack'][1], rtol=1e-6)
  assert 0 < total_clipped < total_layers  # some clipped, some not


def _float_leaves(state):
  return [
      x for x in jax.tree.leaves(state)
      if jnp.issubdtype(x.dtype, jnp.inexact)
  ]


def _state_bytes(state):
  return sum(x.size * x.dtype.itemsize for x in jax.tree.leaves(state))


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


# ------------------------------------------------------ norm_project_to_init ---


def test_norm_project_to_init_matches_reference():
  rng = np.random.default_rng(25)
  params0 = helpers.reference_params(rng)
  tx = fj.norm_project_to_init(1.2, layer_axes=helpers.STACK_PREFIX)
  state = tx.init(params0)
  init_norms = testing.layer_norms(params0, helpers.STACK_PREFIX)
  update = jax.jit(tx.update)
  for scale in (0.05, 0.5, 2.0):
    params = jax.tree.map(lambda w: w + helpers.draw(rng, w.shape) * 0.1,
                          params0)
    u_in = jax.tree.map(lambda w, s=scale: helpers.draw(rng, w.shape) * s,
                        params0)
    u, state = update(u_in, state, params)
    got = optax.apply_updates(jax.tree.map(jnp.asarray, params), u)
    new = jax.tree.map(lambda w, d: w.astype(np.float64) + d, params, u_in)
    want = testing.project_to_init(new, init_norms, 1.2, helpers.STACK_PREFIX)
    helpers.assert_trees_close_to_scale(got, want, helpers.STEP_RTOL)
    # Layers with ||W0|| > 0 sit on 1.2 ||W0||, above and below it before.
    np.testing.assert_allclose(
        np.linalg.norm(np.asarray(got['dense']['w'])),
        1.2 * np.linalg.norm(params0['dense']['w']), rtol=1e-6)
    # Zero-initialised layers are free.
    np.testing.assert_allclose(got['dense']['b'], new['dense']['b'], rtol=1e-6)
    np.testing.assert_allclose(got['stack'][1], new['stack'][1], rtol=1e-6)


def test_norm_project_to_init_holds_every_norm_over_many_steps():
  """Steps that would grow or shrink the layers (a pull towards or away from
  0): every norm stays at its target to float32 rounding."""
  params = {'w': helpers.normal(0, (8, 8)), 'v': helpers.normal(1, (16,))}
  tx = optax.chain(optax.sgd(0.3), fj.norm_project_to_init())
  target = {k: float(jnp.linalg.norm(w)) for k, w in params.items()}

  @jax.jit
  def run(params):
    def body(carry, sign):
      p, s = carry
      g = jax.tree.map(lambda w: sign * w + 0.1 * jnp.ones_like(w), p)
      u, s = tx.update(g, s, p)
      p = optax.apply_updates(p, u)
      return (p, s), jax.tree.map(jnp.linalg.norm, p)
    signs = jnp.where(jnp.arange(1000) % 7 < 3, 1.0, -1.0)
    return jax.lax.scan(body, (params, tx.init(params)), signs)[1]

  norms = run(params)
  for k, n in norms.items():
    np.testing.assert_allclose(np.asarray(n), target[k], rtol=2e-6)


def test_norm_project_to_init_leaves_an_all_zero_layer_alone():
  params = jnp.ones(3)
  tx = fj.norm_project_to_init()
  updates, _ = tx.update(-params, tx.init(params), params)
  np.testing.assert_array_equal(optax.apply_updates(params, updates), 0.0)
