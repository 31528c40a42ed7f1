"""fromage_jax.fromage_on_plateau: the paper's "divide eta by 10 on plateau".

Expected values come from a float64 numpy transcription of SPEC.md's formula
with eta_t = s_t * learning_rate(t), where s_t is tracked by an independent
numpy model of optax.contrib.reduce_on_plateau's rule (accumulation_size=1).
"""

import jax
import jax.numpy as jnp
import numpy as np
import optax
from optax import contrib
import pytest

import fromage_jax
from fromage_jax.testing import fromage_layer as np_fromage
from tests import helpers


class NpPlateau:
  """reduce_on_plateau's rule: the scale for the step whose loss is `v`."""

  def __init__(self, factor, patience, rtol=1e-4, atol=0.0, cooldown=0,
               min_scale=0.0):
    self.factor, self.patience = factor, patience
    self.rtol, self.atol = rtol, atol
    self.cooldown, self.min_scale = cooldown, min_scale
    self.best, self.bad, self.cool, self.scale = np.inf, 0, 0, 1.0

  def __call__(self, v):
    improved = v < (1 - self.rtol) * self.best - self.atol
    if improved:
      self.best = v
    bad = 0 if improved else self.bad + 1
    if self.cool > 0:
      self.bad, self.cool = 0, self.cool - 1
    elif bad == self.patience:
      self.scale = max(self.scale * self.factor, self.min_scale)
      self.bad, self.cool = 0, self.cooldown
    else:
      self.bad = bad
    return self.scale


def make_params(seed=0):
  k1, k2, k3 = jax.random.split(jax.random.PRNGKey(seed), 3)
  return {
      'w': jax.random.normal(k1, (4, 3)),
      'v': jax.random.normal(k2, (5,)),
      'b': 0.1 * jax.random.normal(k3, (3,)),
  }


apply = jax.jit(optax.apply_updates)


# --------------------------------------------------------------------------
# the formula
# --------------------------------------------------------------------------


def test_while_improving_equals_fromage():
  params = make_params()
  eta = 0.1
  tx = fromage_jax.fromage_on_plateau(eta, patience=2)
  ref = fromage_jax.fromage(eta)
  s, rs = tx.init(params), ref.init(params)
  step, ref_step = jax.jit(tx.update), jax.jit(ref.update)
  p = params
  for t in range(8):
    g = helpers.random_like(params, t)
    u, s = step(g, s, p, value=10.0 - t)  # strictly improving
    ur, rs = ref_step(g, rs, p)
    # eta injected as a float32 value, or folded as a constant: the same
    # arithmetic up to float32 rounding.
    helpers.assert_trees_close(u, ur, rtol=1e-5, atol=1e-6)
    expected = jax.tree.map(lambda w, gg: np_fromage(w, gg, eta), p, g)
    p = apply(p, u)
    helpers.assert_trees_close(p, expected)


@pytest.mark.parametrize(
    'patience,cooldown,factor', [(1, 0, 0.1), (2, 2, 0.5)]
)
def test_after_patience_steps_the_formula_uses_scaled_eta(
    patience, cooldown, factor
):
  params = make_params()
  eta = 0.3  # big: a prefactor with the unscaled eta would be far off
  tx = fromage_jax.fromage_on_plateau(
      eta, patience=patience, cooldown=cooldown, factor=factor
  )
  model = NpPlateau(factor, patience, cooldown=cooldown)
  state = tx.init(params)
  step = jax.jit(tx.update)
  # Improves for 3 steps, then flat: reductions follow.
  values = [5.0, 4.0, 3.0] + [3.0] * (3 * (patience + cooldown) + 2)
  p = params
  scales = []
  for t, v in enumerate(values):
    g = helpers.random_like(params, 50 + t)
    s = model(v)
    scales.append(s)
    u, state = step(g, state, p, value=v)
    expected = jax.tree.map(lambda w, gg, s=s: np_fromage(w, gg, s * eta), p, g)
    p = apply(p, u)
    helpers.assert_trees_close(p, expected)
  # The model itself did reduce at least twice (the test covers reductions).
  assert scales[0] == 1.0 and scales[-1] <= factor**2 + 1e-12
  # Cross-check the scale against optax's own reduce_on_plateau.
  rop = contrib.reduce_on_plateau(
      factor=factor, patience=patience, cooldown=cooldown
  )
  rs = rop.init(jnp.zeros([], jnp.float32))
  for v, s in zip(values, scales, strict=True):
    _, rs = rop.update((), rs, value=v)
    np.testing.assert_allclose(float(rs.scale), s, rtol=1e-6)
  np.testing.assert_allclose(float(state.plateau.scale), scales[-1], rtol=1e-6)


def test_first_reduced_step_exact_values():
  # A hand-checkable case: patience=1, so the second (non-improving) loss
  # reduces the scale to 0.1 for that very step.
  w = jnp.array([[3.0, 0.0], [0.0, 4.0]])  # ||W|| = 5
  g = jnp.array([[0.0, 1.0], [1.0, 0.0]])  # ||g|| = sqrt(2), orthogonal to W
  tx = fromage_jax.fromage_on_plateau(0.5, patience=1)
  s = tx.init(w)
  u1, s = tx.update(g, s, w, value=1.0)
  w1 = w + u1
  r = 5.0 / np.sqrt(2.0)
  np.testing.assert_allclose(
      np.asarray(w1), (np.asarray(w) - 0.5 * r * np.asarray(g))
      / np.sqrt(1.25), rtol=1e-6,
  )
  u2, s = tx.update(g, s, w1, value=1.0)
  w2 = np.asarray(w1 + u2, np.float64)
  w1n = np.asarray(w1, np.float64)
  r1 = np.linalg.norm(w1n) / np.sqrt(2.0)
  np.testing.assert_allclose(
      w2, (w1n - 0.05 * r1 * np.asarray(g)) / np.sqrt(1.0025), rtol=1e-6
  )


# --------------------------------------------------------------------------
# NOT the same as chaining reduce_on_plateau after fromage
# --------------------------------------------------------------------------


def orthogonal_grad(w, seed):
  """A gradient orthogonal to W: what a scale-invariant layer receives."""
  n = jax.random.normal(jax.random.PRNGKey(seed), w.shape)
  return n - jnp.vdot(n, w) / jnp.vdot(w, w) * w


def test_naive_chain_shrinks_scale_invariant_layer_but_ours_keeps_norm():
  w0 = jax.random.normal(jax.random.PRNGKey(3), (8, 8))
  eta, factor, patience = 0.1, 0.1, 2
  # min_scale keeps the scale at 0.01 after the 2nd reduction (else it
  # underflows to 0 and the naive chain's shrink vanishes).
  kw = dict(factor=factor, patience=patience, min_scale=factor**2)
  ours = fromage_jax.fromage_on_plateau(eta, **kw)
  naive = optax.chain(fromage_jax.fromage(eta), contrib.reduce_on_plateau(**kw))

  def run(tx):
    def body(carry, t):
      w, s = carry
      g = orthogonal_grad(w, t)
      u, s = tx.update(g, s, w, value=1.0)  # a flat loss: it plateaus
      w = w + u
      return (w, s), jnp.linalg.norm(w)

    return jax.jit(
        lambda: jax.lax.scan(body, (w0, tx.init(w0)), jnp.arange(100))[1]
    )()

  n_ours = np.asarray(run(ours), np.float64)
  n_naive = np.asarray(run(naive), np.float64)
  n0 = float(jnp.linalg.norm(w0))
  # The first `patience` steps (scale 1) are identical and norm-preserving.
  np.testing.assert_allclose(n_naive[:patience], n_ours[:patience], rtol=1e-6)
  # Ours: the norm stays constant throughout, through every reduction.
  np.testing.assert_allclose(n_ours, n0, rtol=1e-4)
  # Naive: after the first reduction (s = 0.1) the norm shrinks every step
  # by sqrt((1 - s + s/c)^2 + (s eta / c)^2), c = sqrt(1 + eta^2), until the
  # next reduction; it never recovers.
  c = np.sqrt(1 + eta**2)
  s = factor
  rate = np.sqrt((1 - s + s / c) ** 2 + (s * eta / c) ** 2)
  assert rate < 1
  # Steps patience .. 2*patience-1 run at scale 0.1 (n_naive[t]: after step t).
  seg = n_naive[patience - 1:2 * patience]
  np.testing.assert_allclose(seg[1:] / seg[:-1], rate, rtol=1e-5)
  assert np.all(np.diff(n_naive[patience - 1:]) < 0)
  assert n_naive[-1] < n0 * (1 - 1e-4) and n_naive[-1] < n_ours[-1]


def test_naive_chain_shrinks_steadily_at_fixed_reduced_scale():
  # Same comparison with min_scale pinning s = 0.1 after the first reduction,
  # so the naive chain's decay compounds: (rate)**t.
  w0 = jax.random.normal(jax.random.PRNGKey(4), (6, 6))
  eta, factor = 0.1, 0.1
  kw = dict(factor=factor, patience=1, min_scale=factor)
  ours = fromage_jax.fromage_on_plateau(eta, **kw)
  naive = optax.chain(fromage_jax.fromage(eta), contrib.reduce_on_plateau(**kw))

  def run(tx, n):
    def body(carry, t):
      w, s = carry
      u, s = tx.update(orthogonal_grad(w, t), s, w, value=1.0)
      return (w + u, s), None

    (w, s), _ = jax.lax.scan(body, (w0, tx.init(w0)), jnp.arange(n))
    return w

  n = 200
  w_ours = jax.jit(lambda: run(ours, n))()
  w_naive = jax.jit(lambda: run(naive, n))()
  n0 = float(jnp.linalg.norm(w0))
  np.testing.assert_allclose(float(jnp.linalg.norm(w_ours)), n0, rtol=1e-4)
  c = np.sqrt(1 + eta**2)
  rate = np.sqrt((1 - factor + factor / c) ** 2 + (factor * eta / c) ** 2)
  # Step 0 at scale 1 keeps the norm; the other n - 1 steps are at 0.1.
  expected = n0 * rate ** (n - 1)
  assert expected < 0.95 * n0  # a steady, substantial shrink
  np.testing.assert_allclose(
      float(jnp.linalg.norm(w_naive)), expected, rtol=1e-3
  )


# --------------------------------------------------------------------------
# jit, schedules, p_bound
# --------------------------------------------------------------------------


def step_sched(count):
  return jnp.array([0.4, 0.05, 0.3, 0.2, 0.1, 0.25, 0.15, 0.35])[
      jnp.minimum(count, 7)
  ]


def test_schedule_as_learning_rate_under_jit():
  params = make_params()
  patience = 2
  tx = fromage_jax.fromage_on_plateau(step_sched, patience=patience)
  model = NpPlateau(0.1, patience)
  state = tx.init(params)
  update = jax.jit(tx.update)
  values = [3.0, 2.0, 2.0, 2.0, 1.0, 1.0, 1.0, 1.0]
  p = params
  for t, v in enumerate(values):
    g = helpers.random_like(params, 80 + t)
    eta = model(v) * float(step_sched(t))
    u, state = update(g, state, p, value=v)
    expected = jax.tree.map(lambda w, gg, e=eta: np_fromage(w, gg, e), p, g)
    p = apply(p, u)
    helpers.assert_trees_close(p, expected)
  assert model.scale == pytest.approx(0.01)  # two reductions happened


def test_optax_schedule_and_reduction_combine_multiplicatively():
  params = {'w': jax.random.normal(jax.random.PRNGKey(9), (3, 4))}
  sched = optax.exponential_decay(0.2, transition_steps=1, decay_rate=0.8)
  tx = fromage_jax.fromage_on_plateau(sched, patience=1, factor=0.5)
  state = tx.init(params)
  step = jax.jit(tx.update)
  p = params
  for t in range(6):
    g = helpers.random_like(params, 90 + t)
    s = 0.5 ** t  # constant loss, patience 1: every step after the 1st halves
    eta = s * 0.2 * 0.8**t
    u, state = step(g, state, p, value=7.0)
    expected = {'w': np_fromage(p['w'], g['w'], eta)}
    p = apply(p, u)
    helpers.assert_trees_close(p, expected)


def test_p_bound_applies_with_scaled_eta():
  params = make_params()
  eta, p_bound = 0.4, 1.25
  tx = fromage_jax.fromage_on_plateau(eta, patience=1, p_bound=p_bound,
                                      factor=0.5)
  model = NpPlateau(0.5, 1)
  state = tx.init(params)
  step = jax.jit(tx.update)
  p = params
  clipped = 0
  values = [4.0, 3.0, 3.0, 3.0, 2.0, 2.0]
  for t, v in enumerate(values):
    noise = helpers.random_like(params, 120 + t)
    # -W plus a little noise: grows the norm, so the bound is hit.
    g = jax.tree.map(
        lambda w, n: -w + 0.2 * jnp.linalg.norm(w) / jnp.linalg.norm(n) * n,
        p, noise,
    )
    e = model(v) * eta
    expected = jax.tree.map(
        lambda w, gg, w0, e=e: np_fromage(w, gg, e, w0=w0, p_bound=p_bound), p, g, params
    )
    unclipped = jax.tree.map(lambda w, gg, e=e: np_fromage(w, gg, e), p, g)
    clipped += sum(
        np.linalg.norm(unclipped[k]) > p_bound * np.linalg.norm(params[k])
        for k in params
    )
    u, state = step(g, state, p, value=v)
    p = apply(p, u)
    helpers.assert_trees_close(p, expected)
  assert clipped > 0
  for k in params:
    assert float(jnp.linalg.norm(p[k])) <= p_bound * float(
        jnp.linalg.norm(params[k])
    ) * (1 + 1e-5)
