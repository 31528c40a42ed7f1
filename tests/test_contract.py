"""optax's optimizer contract, for every public optimizer of fromage_jax.

In the way optax's `alias_test.py` runs one set of checks over all its
aliases: each optimizer below must be a `GradientTransformationExtraArgs`
that ignores extra keyword arguments, wrap in `optax.inject_hyperparams` and
`optax.MultiSteps`, keep its state's shapes, dtypes and shardings across a
step (under `jit` and `lax.cond`, compiled once), init abstractly
(`jax.eval_shape`), take params of every floating and complex dtype and
gradients of another floating dtype than their params, and solve optax's toy
problems in float32 and bfloat16.
"""

import functools

import chex
import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

import fromage_jax as fj
from tests.test_optax_interplay import optimize
from tests.test_optax_interplay import parabola
from tests.test_optax_interplay import rosenbrock


def _chain(learning_rate, p_bound=2.0):
  return optax.chain(
      fj.scale_by_frobenius_ratio(),
      optax.scale_by_learning_rate(learning_rate),
      fj.prefactor_correction(learning_rate),
      fj.norm_clip_to_init(p_bound),
  )


# Factories of the learning rate: what `inject_hyperparams` wraps.
FACTORIES = {
    'fromage': fj.fromage,
    'fromage_p_bound': functools.partial(fj.fromage, p_bound=2.0),
    # A closure, not functools.partial: inject_hyperparams would make every
    # numeric setting of the plateau a traced hyperparameter.
    'fromage_on_plateau': (
        lambda learning_rate: fj.fromage_on_plateau(learning_rate, patience=2)),
    'chain_of_transforms': _chain,
}
NAMES = list(FACTORIES)


def _params(dtype=jnp.float32):
  k1, k2 = jax.random.split(jax.random.key(0))
  params = {
      'w': jax.random.normal(k1, (4, 3)),
      'b': jnp.zeros((3,)),  # a zero-norm layer
      'stack': {'k': jax.random.normal(k2, (2, 3, 3))},
  }
  return jax.tree.map(lambda x: x.astype(dtype), params)


def _grads(params, seed=1, dtype=None):
  keys = jax.random.split(jax.random.key(seed), len(jax.tree.leaves(params)))
  leaves, treedef = jax.tree.flatten(params)
  return treedef.unflatten([
      jax.random.normal(k, x.shape, dtype or x.dtype)
      for k, x in zip(keys, leaves, strict=True)
  ])


def _loss(params):
  return sum(jnp.sum(jnp.abs(x) ** 2) for x in jax.tree.leaves(params))


@pytest.mark.parametrize('name', NAMES)
def test_is_extra_args_and_ignores_extra_keyword_arguments(name):
  tx = FACTORIES[name](0.1)
  assert isinstance(tx, optax.GradientTransformationExtraArgs)
  params = _params()
  grads = _grads(params)
  state = tx.init(params)
  plain, plain_state = tx.update(grads, state, params, value=1.0)
  extra, extra_state = tx.update(
      grads, state, params, value=1.0, grad=grads, value_fn=_loss,
      some_other_argument='ignored',
  )
  chex.assert_trees_all_equal(plain, extra)
  chex.assert_trees_all_equal(plain_state, extra_state)


@pytest.mark.parametrize('name', NAMES)
def test_works_in_a_loop_written_for_optax_contrib(name):
  # One loop for any optimizer: reduce_on_plateau-style value= and a
  # line-search-style value_fn= are both passed to every update.
  tx = optax.chain(FACTORIES[name](0.05), optax.contrib.reduce_on_plateau())
  params = _params()
  state = tx.init(params)
  loss0 = _loss(params)
  for _ in range(20):
    value, grads = jax.value_and_grad(_loss)(params)
    updates, state = tx.update(grads, state, params, value=value,
                               value_fn=_loss)
    params = optax.apply_updates(params, updates)
  assert _loss(params) < 0.9 * loss0


@pytest.mark.parametrize('name', NAMES)
def test_inject_hyperparams_wraps_and_its_learning_rate_is_used(name):
  params = _params()
  grads = _grads(params)
  tx = optax.inject_hyperparams(FACTORIES[name])(learning_rate=0.1)
  state = tx.init(params)
  updates, _ = tx.update(grads, state, params, value=1.0)
  plain = FACTORIES[name](0.1)
  want, _ = plain.update(grads, plain.init(params), params, value=1.0)
  chex.assert_trees_all_close(updates, want, rtol=1e-5, atol=1e-6)
  # Changing the injected value changes the step like building anew.
  state.hyperparams['learning_rate'] = jnp.asarray(0.03)
  updates, _ = jax.jit(tx.update)(grads, state, params, value=1.0)
  slow = FACTORIES[name](0.03)
  want, _ = slow.update(grads, slow.init(params), params, value=1.0)
  chex.assert_trees_all_close(updates, want, rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize('dtype', [jnp.float32, jnp.bfloat16])
@pytest.mark.parametrize('name', NAMES)
def test_state_stable_under_jit_and_cond_compiled_once(name, dtype):
  tx = FACTORIES[name](0.1)
  params = _params(dtype)
  state0 = tx.init(params)
  traces = []

  @jax.jit
  def maybe_step(pred, p, s):
    traces.append(1)

    def train(p, s):
      value, g = jax.value_and_grad(lambda q: _loss(q).astype(jnp.float32))(p)
      u, s = tx.update(g, s, p, value=value)
      return optax.apply_updates(p, u), s

    return jax.lax.cond(pred, train, lambda p, s: (p, s), p, s)

  p, s = params, state0
  for t in range(4):
    new_p, new_s = maybe_step(t != 1, p, s)
    chex.assert_trees_all_equal_shapes_and_dtypes(new_s, state0)
    chex.assert_trees_all_equal_shapes_and_dtypes(new_p, params)
    if t == 1:
      chex.assert_trees_all_equal(new_s, s)
    p, s = new_p, new_s
  assert len(traces) == 1
  assert _loss(p) < _loss(params)


@pytest.mark.parametrize('name', NAMES)
def test_multisteps_accumulates_then_makes_one_step(name):
  params = _params()
  g1, g2 = _grads(params, 1), _grads(params, 2)
  tx = optax.MultiSteps(FACTORIES[name](0.1), every_k_schedule=2)
  state = tx.init(params)
  u1, state = tx.update(g1, state, params, value=1.0)
  chex.assert_trees_all_equal(u1, jax.tree.map(jnp.zeros_like, params))
  u2, state = tx.update(g2, state, params, value=1.0)
  inner = FACTORIES[name](0.1)
  mean = jax.tree.map(lambda a, b: (a + b) / 2, g1, g2)
  want, _ = inner.update(mean, inner.init(params), params, value=1.0)
  chex.assert_trees_all_close(u2, want, rtol=1e-5, atol=1e-7)


@pytest.mark.parametrize('name', NAMES)
def test_abstract_init_matches_init(name):
  tx = FACTORIES[name](0.1)
  params = _params()
  abstract = jax.eval_shape(tx.init, params)
  chex.assert_trees_all_equal_shapes_and_dtypes(abstract, tx.init(params))
  # And an abstract step, for planning memory before allocating anything.
  shapes = jax.eval_shape(
      lambda p: tx.update(_grads(p), tx.init(p), p, value=1.0), params)
  chex.assert_trees_all_equal_shapes_and_dtypes(shapes[0], params)


DTYPES = [jnp.float16, jnp.bfloat16, jnp.float32, 'float64', jnp.complex64]


@pytest.mark.parametrize('dtype', DTYPES, ids=str)
@pytest.mark.parametrize('name', NAMES)
def test_params_of_every_inexact_dtype(name, dtype):
  with jax.enable_x64(dtype == 'float64'):
    dtype = jnp.dtype(dtype)
    params = _params(dtype)
    if jnp.issubdtype(dtype, jnp.complexfloating):
      params = jax.tree.map(lambda x: x * (1 + 0.5j), params)
    tx = FACTORIES[name](0.05)
    state0 = tx.init(params)
    p, s = params, state0
    for _ in range(3):
      grads = jax.grad(lambda q: _loss(q).real)(p)
      u, s = jax.jit(tx.update)(grads, s, p, value=1.0)
      chex.assert_trees_all_equal_dtypes(u, params)
      p = optax.apply_updates(p, u)
    chex.assert_trees_all_equal_shapes_and_dtypes(s, state0)
    chex.assert_tree_all_finite(p)
    # Per-layer norms in the state are real, in the params' norm dtype;
    # scalars (counts, the plateau's scale) are int32 or float32.
    for x in jax.tree.leaves(s):
      assert not jnp.issubdtype(x.dtype, jnp.complexfloating)
      if x.ndim == 0:
        assert x.dtype in (jnp.int32, jnp.float32), x.dtype
      elif jnp.issubdtype(x.dtype, jnp.floating):
        assert x.dtype == (jnp.float64 if dtype == jnp.float64
                           else jnp.float32)
    assert float(_loss(p).real) < float(_loss(params).real)


@pytest.mark.parametrize(
    'param_dtype, grad_dtype',
    [(jnp.bfloat16, jnp.float32), (jnp.float32, jnp.bfloat16),
     (jnp.float16, jnp.float32)],
    ids=str,
)
@pytest.mark.parametrize('name', NAMES)
def test_mixed_precision_gradients(name, param_dtype, grad_dtype):
  """Another floating dtype for the gradients: float32 arithmetic, the update
  in the params' dtype, and the same step as float32 gradients (to the
  params' rounding)."""
  params = _params(param_dtype)
  grads = _grads(params, dtype=jnp.float32)
  tx = FACTORIES[name](0.1)
  state = tx.init(params)
  mixed, new_state = jax.jit(tx.update)(
      jax.tree.map(lambda g: g.astype(grad_dtype), grads), state, params,
      value=1.0)
  chex.assert_trees_all_equal_dtypes(mixed, params)
  chex.assert_trees_all_equal_shapes_and_dtypes(new_state, state)
  # The float64 truth of the same step, from the gradients as they arrived.
  with jax.enable_x64(True):
    p64 = jax.tree.map(lambda x: jnp.asarray(x, jnp.float64), params)
    g64 = jax.tree.map(
        lambda g: jnp.asarray(g.astype(grad_dtype), jnp.float64), grads)
    tx64 = FACTORIES[name](0.1)
    want, _ = tx64.update(g64, tx64.init(p64), p64, value=1.0)
    want = jax.tree.map(np.asarray, want)
  eps = float(jnp.finfo(param_dtype).eps)
  eps32 = float(jnp.finfo(jnp.float32).eps)
  for got, ref, w in zip(jax.tree.leaves(mixed), jax.tree.leaves(want),
                         jax.tree.leaves(params), strict=True):
    # One rounding of the update to the params' dtype, and float32's own:
    # arithmetic in bf16 would be off by bf16's eps times |W|.
    w = np.abs(np.asarray(w, np.float64))
    err = np.abs(np.asarray(got, np.float64) - ref)
    bound = eps * np.abs(ref) + 8 * eps32 * (w + np.abs(ref)) + 1e-30
    assert np.all(err <= bound), (np.max(err / bound), name)


@pytest.mark.parametrize('name', NAMES)
def test_explicit_named_shardings_are_preserved(name):
  mesh = jax.sharding.Mesh(np.array(jax.devices()[:1]), ('data',))
  spec = jax.sharding.PartitionSpec
  shardings = {
      'w': jax.sharding.NamedSharding(mesh, spec('data', None)),
      'b': jax.sharding.NamedSharding(mesh, spec()),
      'stack': {'k': jax.sharding.NamedSharding(mesh, spec(None, 'data'))},
  }
  params = jax.device_put(_params(), shardings)
  grads = jax.device_put(_grads(params), shardings)
  tx = FACTORIES[name](0.1)
  state = jax.jit(tx.init)(params)

  @jax.jit
  def step(p, s, g):
    u, s = tx.update(g, s, p, value=1.0)
    return optax.apply_updates(p, u), s

  new_params, new_state = step(params, state, grads)
  for new, old in zip(jax.tree.leaves(new_params), jax.tree.leaves(params),
                      strict=True):
    assert new.sharding.is_equivalent_to(old.sharding, old.ndim), (
        new.sharding, old.sharding)
  for new, old in zip(jax.tree.leaves(new_state), jax.tree.leaves(state),
                      strict=True):
    assert new.sharding.is_equivalent_to(old.sharding, old.ndim)


# optax's toy problems, as its alias tests solve them: a decaying schedule
# (a fixed relative step can only hover near the optimum; see
# tests/test_optax_interplay.py), optax's tolerance on Rosenbrock in float32.
# In bfloat16 a step below the params' resolution (2**-8 relative) rounds
# away, so the schedule stops at 2.5e-3 and runs longer.
STEPS = {jnp.float32: 2000, jnp.bfloat16: 5000}
SCHEDULE_FLOOR = {jnp.float32: 1e-3, jnp.bfloat16: 0.05}
TOLERANCE = {
    (parabola, jnp.float32): 1e-4, (rosenbrock, jnp.float32): 3e-2,
    (parabola, jnp.bfloat16): 2e-2, (rosenbrock, jnp.bfloat16): 5e-2,
}


@pytest.mark.parametrize('dtype', [jnp.float32, jnp.bfloat16], ids=str)
@pytest.mark.parametrize('target', [parabola, rosenbrock])
@pytest.mark.parametrize('name', NAMES)
def test_toy_problems(name, target, dtype):
  n = STEPS[dtype]
  sched = optax.cosine_decay_schedule(0.05, n, alpha=SCHEDULE_FLOOR[dtype])
  # fromage_on_plateau takes the schedule too, with a long patience: on
  # Rosenbrock, where its decays fall is chaotic in the patience (bf16 error
  # 0.48 at 100, 0.012 at 300 and 500, 0.26 at 1000; float32 0.17 at 100).
  tx = (fj.fromage_on_plateau(sched, patience=500)
        if name == 'fromage_on_plateau' else FACTORIES[name](sched))
  err = optimize(tx, target, n, with_value=True, dtype=dtype)
  assert err < TOLERANCE[target, dtype], err


STACK_AXES = {'w': None, 'b': None, 'stack': {'k': (0,)}}
TRAJECTORY_RTOL = {jnp.float32: 1e-5, jnp.complex64: 1e-5, jnp.bfloat16: 3e-2}


@pytest.mark.parametrize('layer_axes', [None, STACK_AXES], ids=['leaves',
                                                               'stacked'])
@pytest.mark.parametrize('p_bound', [None, 1.2])
@pytest.mark.parametrize('dtype', list(TRAJECTORY_RTOL), ids=str)
def test_alias_follows_the_chain_of_its_transforms_for_100_steps(
    dtype, p_bound, layer_axes):
  """`fromage()` (the chain itself, or its fused update with `p_bound`)
  against the chain built by hand from the public transforms."""
  params = _params(jnp.float32)
  if dtype == jnp.complex64:
    params = jax.tree.map(lambda x: x * (1 - 0.3j), params)
  params = jax.tree.map(lambda x: x.astype(dtype), params)
  sched = optax.linear_schedule(0.1, 0.01, 100)
  alias = fj.fromage(sched, p_bound=p_bound, layer_axes=layer_axes)
  parts = [fj.scale_by_frobenius_ratio(layer_axes=layer_axes),
           optax.scale_by_learning_rate(sched), fj.prefactor_correction(sched)]
  if p_bound is not None:
    parts.append(fj.norm_clip_to_init(p_bound, layer_axes=layer_axes))
  chain = optax.chain(*parts)

  def run(tx):
    def body(carry, _):
      p, s = carry
      # A loss pulling every layer outwards, so that p_bound's clip acts.
      g = jax.grad(lambda q: -_loss(q).real + 0.1 * _loss(
          jax.tree.map(jnp.sin, q)).real)(p)
      u, s = tx.update(g, s, p)
      return (optax.apply_updates(p, u), s), p

    _, trail = jax.lax.scan(body, (params, tx.init(params)), None, length=100)
    return trail

  ours, theirs = jax.jit(lambda: run(alias))(), jax.jit(lambda: run(chain))()
  for a, b in zip(jax.tree.leaves(ours), jax.tree.leaves(theirs), strict=True):
    a, b = np.asarray(a, np.complex128), np.asarray(b, np.complex128)
    scale = np.max(np.abs(b), axis=tuple(range(1, b.ndim)), keepdims=True)
    err = np.abs(a - b)
    assert np.all(err <= TRAJECTORY_RTOL[dtype] * scale), np.max(err / (
        scale + 1e-30))
  if p_bound is not None:  # the bound was reached: the clip was compared
    norm = np.linalg.norm(np.asarray(ours['w'][-1], np.complex128))
    assert norm >= 0.99 * p_bound * np.linalg.norm(
        np.asarray(params['w'], np.complex128))
