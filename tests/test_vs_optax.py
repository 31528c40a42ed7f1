"""fromage_jax against optax.fromage: equal where the SPEC says they must be.

`optax.fromage(lr, min_norm)` is
  chain(scale_by_trust_ratio(min_norm),
        scale_by_learning_rate(lr * mult), add_decayed_weights(mult - 1))
with `mult = 1 / sqrt(1 + lr**2)`, i.e. `W' = mult * (W - lr * r * g)`: the
SPEC's update, with `r = max(||W||, min_norm) / max(||g||, min_norm)`. For a
schedule, both `scale_by_learning_rate` and `add_decayed_weights` evaluate it
at their own count, which starts at 0 and goes up by one per update, just like
fromage_jax's `count`: so with `min_norm=0` the two agree for schedules too.

They differ on purpose for zero-initialised layers with optax's default
`min_norm=1e-6` (the SPEC's first edge case), tested at the bottom.
"""

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

import fromage_jax

STEPS = 60
STEP_RTOL = 1e-5  # two float32 roundings of the same formula, one step
TRAJ_RTOL = 2e-4  # accumulated over STEPS steps


def _rel_err(a, b):
  a, b = np.asarray(a, np.float64), np.asarray(b, np.float64)
  return np.max(np.abs(a - b)) / max(np.max(np.abs(b)), 1e-30)


def _params(rng, dtype=np.float32):
  return {
      'dense': {
          'w': rng.normal(size=(5, 4)).astype(dtype),
          'b': rng.normal(size=(4,)).astype(dtype),
      },
      'out': rng.normal(size=(4, 2)).astype(dtype),
      'scalar': np.asarray(rng.normal() + 3.0, dtype),
  }


def _run_both(lr, params, *, seed=0, steps=STEPS, min_norm=0.0):
  """Same gradient sequence through both; returns per-step and final errors."""
  rng = np.random.default_rng(seed)
  ours = fromage_jax.fromage(lr)
  theirs = optax.fromage(lr, min_norm=min_norm)

  def make_step(opt):
    @jax.jit
    def step(p, s, g):
      u, s = opt.update(g, s, p)
      return optax.apply_updates(p, u), s

    return step

  step_ours, step_theirs = make_step(ours), make_step(theirs)
  p_ours = jax.tree.map(jnp.asarray, params)
  p_theirs = p_ours
  s_ours, s_theirs = ours.init(p_ours), theirs.init(p_theirs)
  step_errs = []
  moved = []
  for _ in range(steps):
    grads = jax.tree.map(
        lambda w: rng.normal(size=np.shape(w)).astype(w.dtype), params
    )
    # One step of optax from *our* params: isolates the per-step agreement.
    one_theirs, _ = step_theirs(p_ours, s_theirs, grads)
    new_ours, s_ours = step_ours(p_ours, s_ours, grads)
    step_errs.append(max(
        _rel_err(a, b)
        for a, b in zip(
            jax.tree.leaves(new_ours), jax.tree.leaves(one_theirs), strict=True
        )
    ))
    moved.append(max(
        _rel_err(a, b)
        for a, b in zip(
            jax.tree.leaves(new_ours), jax.tree.leaves(p_ours), strict=True
        )
    ))
    p_ours = new_ours
    p_theirs, s_theirs = step_theirs(p_theirs, s_theirs, grads)
  final = max(
      _rel_err(a, b)
      for a, b in zip(
          jax.tree.leaves(p_ours), jax.tree.leaves(p_theirs), strict=True
      )
  )
  return np.array(step_errs), final, np.array(moved)


@pytest.mark.parametrize(
    'lr',
    [
        0.1,
        optax.linear_schedule(0.3, 0.01, 50),
        optax.exponential_decay(0.2, transition_steps=20, decay_rate=0.5),
    ],
    ids=['constant', 'linear_schedule', 'exponential_decay'],
)
def test_matches_optax_fromage_min_norm_zero(lr):
  params = _params(np.random.default_rng(1))
  step_errs, final, moved = _run_both(lr, params)
  assert np.max(step_errs) < STEP_RTOL, step_errs
  assert final < TRAJ_RTOL, final
  # The comparison is not vacuous: every step moved the params by far more
  # than the tolerance.
  assert np.min(moved) > 100 * STEP_RTOL


def test_matches_optax_fromage_under_x64():
  with jax.enable_x64(True):
    params = _params(np.random.default_rng(2), np.float64)
    step_errs, final, _ = _run_both(0.1, params, steps=30)
    assert np.max(step_errs) < 1e-13
    assert final < 1e-11


def test_schedule_off_by_one_would_be_seen():
  # Guard for the schedule tests above: a schedule shifted by one step gives
  # errors far above the tolerance, so they can fail.
  params = _params(np.random.default_rng(3))
  sched = optax.linear_schedule(0.3, 0.01, 50)
  rng = np.random.default_rng(0)
  grads = jax.tree.map(
      lambda w: rng.normal(size=np.shape(w)).astype(w.dtype), params
  )
  ours = fromage_jax.fromage(sched)
  theirs = optax.fromage(lambda c: sched(c + 1), min_norm=0.0)
  u1, _ = jax.jit(ours.update)(grads, ours.init(params), params)
  u2, _ = jax.jit(theirs.update)(grads, theirs.init(params), params)
  assert _rel_err(u1['dense']['w'], u2['dense']['w']) > 100 * STEP_RTOL


def test_zero_norm_edge_cases_match_optax_min_norm_zero():
  # With min_norm=0, optax's trust ratio is 1 when either norm is 0: the
  # SPEC's rule. A zero bias (plain step) and a zero gradient (pure shrink).
  rng = np.random.default_rng(4)
  params = {'w': rng.normal(size=(3, 3)).astype(np.float32),
            'b': np.zeros(3, np.float32)}
  grads = {'w': np.zeros((3, 3), np.float32),
           'b': rng.normal(size=3).astype(np.float32)}
  ours = fromage_jax.fromage(0.1)
  theirs = optax.fromage(0.1, min_norm=0.0)
  u1, _ = jax.jit(ours.update)(grads, ours.init(params), params)
  u2, _ = jax.jit(theirs.update)(grads, theirs.init(params), params)
  # The shrink update W * (mult - 1) is a difference of O(|W|) float32
  # values, so its rounding error is ~eps * |W|: compare at that scale.
  atol = {k: 1e-6 * float(np.max(np.abs(params[k])) + 1) for k in params}
  for k in ('w', 'b'):
    np.testing.assert_allclose(u1[k], u2[k], rtol=1e-6, atol=atol[k])
  # ...and those are the SPEC's formulas.
  mult = 1 / np.sqrt(1 + 0.1**2)
  np.testing.assert_allclose(u1['b'], -0.1 * grads['b'] * mult, rtol=1e-5)
  np.testing.assert_allclose(
      u1['w'], params['w'] * (mult - 1), rtol=1e-5, atol=atol['w']
  )


# ------------------------------------------ where they differ: zero-init bias

LR = 0.05
TRAIN_STEPS = 100


def _regression():
  """y = X w + b with a large offset b: the loss needs the bias to fall."""
  rng = np.random.default_rng(5)
  x = rng.normal(size=(64, 4)).astype(np.float32)
  w_true = rng.normal(size=(4, 2)).astype(np.float32)
  b_true = np.array([3.0, -2.0], np.float32)
  y = x @ w_true + b_true
  params = {
      'w': jnp.asarray(rng.normal(size=(4, 2)).astype(np.float32)),
      'b': jnp.zeros(2, jnp.float32),  # zero-initialised bias
  }

  def loss(p):
    return jnp.mean((x @ p['w'] + p['b'] - y) ** 2)

  return params, loss, float(np.linalg.norm(b_true))


def _train(opt, params, loss):
  @jax.jit
  def train(p):
    def body(carry, _):
      p, s = carry
      u, s = opt.update(jax.grad(loss)(p), s, p)
      return (optax.apply_updates(p, u), s), None

    (p, _), _ = jax.lax.scan(
        body, (p, opt.init(p)), None, length=TRAIN_STEPS
    )
    return p

  return train(params)


def test_optax_default_min_norm_freezes_zero_bias_fromage_jax_trains_it():
  params, loss, b_true_norm = _regression()
  p_optax = _train(optax.fromage(LR), params, loss)
  p_ours = _train(fromage_jax.fromage(LR), params, loss)
  b_optax = float(jnp.linalg.norm(p_optax['b']))
  b_ours = float(jnp.linalg.norm(p_ours['b']))
  # optax: the trust ratio is min_norm / ||g|| = 1e-6 / ||g||, so the bias
  # moves by LR * 1e-6 a step and, once past 1e-6, grows by at most a factor
  # (1 + LR) a step: after 100 steps it is still ~1e-4 of what it needs.
  assert b_optax < 1e-3 * b_true_norm, b_optax
  # fromage_jax: a plain first step, then relative steps: the bias gets most
  # of the way to its target.
  assert b_ours > 0.5 * b_true_norm, b_ours
  # And the loss, which needs the bias, falls much lower.
  l_optax, l_ours = float(loss(p_optax)), float(loss(p_ours))
  assert l_ours < 0.1 * l_optax, (l_ours, l_optax)
  assert l_ours < 0.1 * float(loss(params))
