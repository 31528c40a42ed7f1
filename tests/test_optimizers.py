"""Every public optimizer and transform: optax's contract, and JAX's
transformations.

One table (`helpers.OPTIMIZERS`), as optax's `alias_test.py` has one, run on
a tree of small and large, zero-initialised and gradient-free layers, flat
and stacked (`helpers.CASES`).

- The contract: a `GradientTransformationExtraArgs` that ignores extra
  keyword arguments; wrapped by `optax.inject_hyperparams` and
  `optax.MultiSteps`; its state's shapes, dtypes and shardings kept across a
  step (under `jit` and `lax.cond`, compiled once); params of every floating
  and complex dtype and gradients of another floating dtype; optax's toy
  problems; errors that name the leaf and the function called.
- The transformations: `grad` with respect to the gradients, to the params
  through two steps and to the hyperparameter, each against float64 central
  differences; `jvp`; `vmap` over gradients and over models; `scan` with
  `checkpoint` under `jit`, and `grad` through it; `eval_shape`. The same
  table under `pmap`, shardings and `shard_map` is in `tests/multidevice`.
"""

import re

from absl.testing import parameterized
import chex
import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

import fromage_jax as fj
from tests import helpers


def _table(names):
  """Named parameters `<optimizer>_<case>`, as pytest shows them."""
  return [(f'_{name}_{case}', name, case) for name in names
          for case in helpers.CASES]


EVERY = _table(helpers.OPTIMIZERS)
WITH_HYPER = _table(n for n, opt in helpers.OPTIMIZERS.items()
                    if opt.hyper is not None)


def _setup(name, case, dtype=jnp.float32, hyper=None):
  case = helpers.CASES[case](dtype)
  tx = helpers.OPTIMIZERS[name].build(case.layer_axes, hyper)
  return case, tx


def _steps(tx, case, params, n=2):
  """`n` steps on the case's loss, from `init(params)`: what MAML unrolls."""
  state = jax.jit(tx.init)(params)
  for _ in range(n):
    updates, state = helpers.update(tx, case.grads(params), state, params)
    params = optax.apply_updates(params, updates)
  return params


def _directions(tree, mask, n=3):
  """`n` random directions in `tree`'s space, zero where `mask` is 1."""
  return [jax.tree.map(lambda d, m: d * (1 - m), helpers.random_like(tree, s),
                       mask) for s in range(n)]


class TransparencyTest(chex.TestCase):

  @chex.variants(with_jit=True, without_jit=True)
  @parameterized.named_parameters(*EVERY)
  def test_grad_with_respect_to_gradients(self, name, case):
    with helpers.enable_x64():
      case, tx = _setup(name, case, jnp.float64)
      params = case.params
      state = jax.jit(tx.init)(params)
      grads = jax.jit(case.grads)(params)

      @self.variant
      def grad(g):
        return jax.grad(lambda g: helpers.objective(
            helpers.update(tx, g, state, params)[0]))(g)

      got = grad(grads)
      want = helpers.check_against_central_differences(
          lambda g: helpers.objective(helpers.update(tx, g, state, params)[0]),
          grads, _directions(grads, case.zero_grad))
      helpers.assert_trees_close(got, want, 1e-12, 1e-12)

  @parameterized.named_parameters(*EVERY)
  def test_grad_with_respect_to_params_through_two_steps(self, name, case):
    with helpers.enable_x64():
      case, tx = _setup(name, case, jnp.float64)
      helpers.check_against_central_differences(
          lambda p: helpers.objective(_steps(tx, case, p)), case.params,
          _directions(case.params, case.zero_init))

  @parameterized.named_parameters(*WITH_HYPER)
  def test_grad_with_respect_to_the_hyperparameter(self, name, case):
    opt = helpers.OPTIMIZERS[name]
    with helpers.enable_x64():
      case = helpers.CASES[case](jnp.float64)

      def f(hyper):
        tx = opt.build(case.layer_axes, hyper)
        return helpers.objective(_steps(tx, case, case.params))

      # fromage_on_plateau keeps its injected eta in float32 (its state's
      # scalars are float32 whatever the params), so its function of the
      # learning rate is float32-rounded.
      rtol = 1e-2 if name == 'fromage_on_plateau' else 1e-6
      helpers.check_against_central_differences(
          f, jnp.asarray(opt.hyper, jnp.float64),
          [jnp.ones([], jnp.float64)], rtol=rtol)

  @parameterized.named_parameters(*EVERY)
  def test_jvp(self, name, case):
    with helpers.enable_x64():
      case, tx = _setup(name, case, jnp.float64)
      params = case.params
      grads = jax.jit(case.grads)(params)
      state = jax.jit(tx.init)(params)

      def f(g, p):
        return helpers.update(tx, g, state, p)[0]

      dg = _directions(grads, case.zero_grad, 1)[0]
      dp = _directions(params, case.zero_init, 1)[0]
      primal, tangent = jax.jit(lambda *a: jax.jvp(f, *a))(
          (grads, params), (dg, dp))
      f = jax.jit(f)
      helpers.assert_trees_close(primal, f(grads, params), 1e-12, 1e-12)
      h = 1e-6
      numeric = jax.tree.map(
          lambda a, b: (a - b) / (2 * h),
          f(optax.tree.add_scale(grads, h, dg),
            optax.tree.add_scale(params, h, dp)),
          f(optax.tree.add_scale(grads, -h, dg),
            optax.tree.add_scale(params, -h, dp)))
      helpers.assert_trees_close(tangent, numeric, 1e-5, 1e-7)

  @parameterized.named_parameters(*EVERY)
  def test_vmap_over_gradients_and_over_models(self, name, case):
    case, tx = _setup(name, case)
    params = case.params
    state = jax.jit(tx.init)(params)
    batch = [helpers.random_like(params, s) for s in range(3)]
    stacked = jax.tree.map(lambda *x: jnp.stack(x), *batch)

    one = jax.jit(lambda g: helpers.update(tx, g, state, params)[0])
    got = jax.jit(jax.vmap(one))(stacked)
    want = jax.tree.map(lambda *x: jnp.stack(x), *map(one, batch))
    # Batched or not, the same arithmetic up to float32 rounding.
    helpers.assert_trees_close(got, want, 1e-5, 1e-6)

    # A batch of models (an ensemble): init and update vmapped together.
    models = jax.tree.map(lambda p, *x: p + 0.1 * jnp.stack(x), params,
                          *batch)

    @jax.jit
    def step(p, g):
      return helpers.update(tx, g, tx.init(p), p)

    got, got_state = jax.jit(jax.vmap(step))(models, stacked)
    for i, g in enumerate(batch):
      p = jax.tree.map(lambda x, i=i: x[i], models)
      want, want_state = step(p, g)
      helpers.assert_trees_close(jax.tree.map(lambda x, i=i: x[i], got),
                                 want, 1e-5, 1e-6)
      helpers.assert_trees_close(
          jax.tree.map(lambda x, i=i: x[i], got_state), want_state, 1e-5,
          1e-6)

  @parameterized.named_parameters(*EVERY)
  def test_scan_with_checkpoint_under_jit_and_grad_through_it(self, name,
                                                              case):
    case, tx = _setup(name, case)

    def run(params, remat):
      def body(carry, _):
        p, s = carry
        u, s = helpers.update(tx, case.grads(p), s, p)
        return (optax.apply_updates(p, u), s), None
      body = jax.checkpoint(body) if remat else body
      (p, _), _ = jax.lax.scan(body, (params, tx.init(params)), None,
                               length=3)
      return p

    scanned = jax.jit(run, static_argnums=1)(case.params, True)
    @jax.jit
    def step(p, s):
      u, s = helpers.update(tx, case.grads(p), s, p)
      return optax.apply_updates(p, u), s

    looped, state = case.params, tx.init(case.params)
    for _ in range(3):
      looped, state = step(looped, state)
    helpers.assert_trees_close(scanned, looped, 1e-5, 1e-6)

    def f(params, remat):
      return helpers.objective(run(params, remat))

    grad = jax.jit(jax.grad(f), static_argnums=1)
    with_remat, without = grad(case.params, True), grad(case.params, False)
    chex.assert_tree_all_finite(with_remat)
    helpers.assert_trees_close(with_remat, without, 1e-5, 1e-6)

  @parameterized.named_parameters(*EVERY)
  def test_eval_shape(self, name, case):
    case, tx = _setup(name, case)
    params = case.params
    grads = jax.jit(case.grads)(params)
    state = jax.jit(tx.init)(params)
    chex.assert_trees_all_equal_shapes_and_dtypes(
        jax.eval_shape(tx.init, params), state)
    def step(g, s, p):
      return helpers.update(tx, g, s, p)

    chex.assert_trees_all_equal_shapes_and_dtypes(
        jax.eval_shape(step, grads, state, params),
        jax.jit(step)(grads, state, params))


def _named_functions(message: str) -> set[str]:
  return set(re.findall(r'fromage_jax\.(\w+)', message))


@pytest.mark.parametrize('name', list(helpers.OPTIMIZERS))
def test_errors_name_the_leaf_and_the_function_called(name):
  opt = helpers.OPTIMIZERS[name]
  tx = opt.build()
  params = {'w': jnp.ones((2, 3)), 'b': jnp.ones(3)}
  state = tx.init(params)
  with pytest.raises(ValueError) as shape:
    helpers.update(tx, {'w': jnp.ones((3, 2)), 'b': jnp.ones(3)}, state,
                   params)
  with pytest.raises(TypeError) as dtype:
    tx.init({'w': jnp.ones((2, 3)), 'n': jnp.ones(3, jnp.int32)})
  for error, leaf in ((shape, "['w']"), (dtype, "['n']")):
    assert _named_functions(str(error.value)) == {opt.entry_point}, error
    assert leaf in str(error.value)


# The hand-built chain's hyperparameters go to the transforms that the user
# builds (and that name themselves).
@pytest.mark.parametrize('name', [
    n for n, opt in helpers.OPTIMIZERS.items()
    if opt.hyper is not None and n != 'chain_of_transforms'])
def test_a_hyperparameter_that_cannot_work_is_refused_when_built(name):
  opt = helpers.OPTIMIZERS[name]
  with pytest.raises(ValueError) as error:
    opt.build(hyper=-1.0)
  assert _named_functions(str(error.value)) == {opt.entry_point}


# ------------------------------------------------------ optax's contract ---

NAMES = list(helpers.OPTIMIZERS)
DESCENDING = list(helpers.DESCENDING)
WITH_HYPER_NAMES = [n for n, o in helpers.OPTIMIZERS.items()
                    if o.hyper is not None]


def _params(dtype=jnp.float32):
  """Small layers (the contract's float32 error bounds are per element), one
  of them zero-initialised."""
  params = {'w': helpers.random_like(jnp.zeros((4, 3)), 0),
            'b': jnp.zeros((3,)),
            'stack': {'k': helpers.random_like(jnp.zeros((2, 3, 3)), 1)}}
  return jax.tree.map(lambda x: x.astype(dtype), params)


def _loss(params):
  return sum(jnp.sum(jnp.abs(x) ** 2) for x in jax.tree.leaves(params))


def _grads(params, seed=1, dtype=None):
  grads = helpers.random_like(params, seed)
  return grads if dtype is None else jax.tree.map(
      lambda g: g.astype(dtype), grads)


@pytest.mark.parametrize('name', NAMES)
def test_is_extra_args_and_ignores_extra_keyword_arguments(name):
  tx = helpers.OPTIMIZERS[name].build()
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


@pytest.mark.parametrize('name', DESCENDING)
def test_works_in_a_loop_written_for_optax_contrib(name):
  # One loop for any optimizer: reduce_on_plateau-style value= and a
  # line-search-style value_fn= are both passed to every update.
  tx = optax.chain(helpers.OPTIMIZERS[name].build(),
                   optax.contrib.reduce_on_plateau())
  params = _params()
  state = tx.init(params)
  loss0 = _loss(params)

  @jax.jit
  def step(params, state):
    value, grads = jax.value_and_grad(_loss)(params)
    updates, state = tx.update(grads, state, params, value=value,
                               value_fn=_loss)
    return optax.apply_updates(params, updates), state

  for _ in range(20):
    params, state = step(params, state)
  assert _loss(params) < 0.9 * loss0


@pytest.mark.parametrize('name', WITH_HYPER_NAMES)
def test_inject_hyperparams_wraps_and_its_hyperparameter_is_used(name):
  opt = helpers.OPTIMIZERS[name]
  params = _params()
  grads = _grads(params)
  # A closure of the one hyperparameter: inject_hyperparams would make every
  # numeric setting of a plateau a traced hyperparameter.
  tx = optax.inject_hyperparams(lambda hyper: opt.build(hyper=hyper))(
      hyper=opt.hyper)
  state = tx.init(params)
  updates, _ = helpers.update(tx, grads, state, params)
  plain = opt.build()
  want, _ = helpers.update(plain, grads, plain.init(params), params)
  chex.assert_trees_all_close(updates, want, rtol=1e-5, atol=1e-6)
  # Changing the injected value changes the step like building anew.
  other = opt.hyper * 0.6
  state.hyperparams['hyper'] = jnp.asarray(other)
  updates, _ = jax.jit(helpers.update, static_argnums=0)(
      tx, grads, state, params)
  rebuilt = opt.build(hyper=other)
  want, _ = helpers.update(rebuilt, grads, rebuilt.init(params), params)
  chex.assert_trees_all_close(updates, want, rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize('dtype', [jnp.float32, jnp.bfloat16])
@pytest.mark.parametrize('name', NAMES)
def test_state_stable_under_jit_and_cond_compiled_once(name, dtype):
  opt = helpers.OPTIMIZERS[name]
  tx = opt.build()
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
      chex.assert_trees_all_equal(new_p, p)
    p, s = new_p, new_s
  assert len(traces) == 1
  if opt.descends:
    assert _loss(p) < _loss(params)


@pytest.mark.parametrize('name', NAMES)
def test_multisteps_accumulates_then_makes_one_step(name):
  params = _params()
  g1, g2 = _grads(params, 1), _grads(params, 2)
  tx = optax.MultiSteps(helpers.OPTIMIZERS[name].build(), every_k_schedule=2)
  state = tx.init(params)
  u1, state = tx.update(g1, state, params, value=1.0)
  chex.assert_trees_all_equal(u1, jax.tree.map(jnp.zeros_like, params))
  u2, state = tx.update(g2, state, params, value=1.0)
  inner = helpers.OPTIMIZERS[name].build()
  mean = jax.tree.map(lambda a, b: (a + b) / 2, g1, g2)
  want, _ = inner.update(mean, inner.init(params), params, value=1.0)
  chex.assert_trees_all_close(u2, want, rtol=1e-5, atol=1e-7)


DTYPES = [jnp.float16, jnp.bfloat16, jnp.float32, 'float64', jnp.complex64]


@pytest.mark.parametrize('dtype', DTYPES, ids=str)
@pytest.mark.parametrize('name', NAMES)
def test_params_of_every_inexact_dtype(name, dtype):
  opt = helpers.OPTIMIZERS[name]
  with helpers.enable_x64(dtype == 'float64'):
    dtype = jnp.dtype(dtype)
    params = _params(dtype)
    if jnp.issubdtype(dtype, jnp.complexfloating):
      params = jax.tree.map(lambda x: x * (1 + 0.5j), params)
    tx = opt.build()
    state0 = tx.init(params)
    step = jax.jit(helpers.update, static_argnums=0)
    p, s = params, state0
    for _ in range(3):
      grads = jax.grad(lambda q: _loss(q).real)(p)
      u, s = step(tx, grads, s, p)
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
    if opt.descends:
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
  opt = helpers.OPTIMIZERS[name]
  params = _params(param_dtype)
  grads = _grads(params, dtype=jnp.float32)
  tx = opt.build()
  state = tx.init(params)
  mixed, new_state = jax.jit(helpers.update, static_argnums=0)(
      tx, jax.tree.map(lambda g: g.astype(grad_dtype), grads), state, params)
  if name == 'scale_by_frobenius_ratio':  # the wider dtype, for what follows
    wider = jnp.promote_types(param_dtype, grad_dtype)
    chex.assert_trees_all_equal_dtypes(
        mixed, jax.tree.map(lambda x: x.astype(wider), params))
  else:
    chex.assert_trees_all_equal_dtypes(mixed, params)
  chex.assert_trees_all_equal_shapes_and_dtypes(new_state, state)
  # The float64 truth of the same step, from the gradients as they arrived.
  with helpers.enable_x64(True):
    p64 = jax.tree.map(lambda x: jnp.asarray(x, jnp.float64), params)
    g64 = jax.tree.map(
        lambda g: jnp.asarray(g.astype(grad_dtype), jnp.float64), grads)
    tx64 = opt.build()
    want, _ = helpers.update(tx64, g64, tx64.init(p64), p64)
    want = jax.tree.map(np.asarray, want)
  eps = float(jnp.finfo(mixed['w'].dtype).eps)
  eps32 = float(jnp.finfo(jnp.float32).eps)
  # The hand-built chain's prefactor hands the clip an update already
  # rounded to the params' dtype, and the clip's factor comes from it: three
  # roundings' worth.
  eps *= 3 if name == 'chain_of_transforms' else 1
  for got, ref, w in zip(jax.tree.leaves(mixed), jax.tree.leaves(want),
                         jax.tree.leaves(params), strict=True):
    # A rounding of the update to its dtype, and float32's own: arithmetic
    # in bf16 would be off by bf16's eps times |W|.
    w = np.abs(np.asarray(w, np.float64))
    err = np.abs(np.asarray(got, np.float64) - ref)
    bound = eps * np.abs(ref) + 8 * eps32 * (w + np.abs(ref)) + 1e-30
    assert np.all(err <= bound), (np.max(err / bound), name)


@pytest.mark.parametrize('name', NAMES)
def test_explicit_named_shardings_are_preserved(name):
  mesh = jax.sharding.Mesh(np.array(jax.devices()[:1]), ('data',))
  spec = jax.sharding.PartitionSpec
  params = _params()
  shardings = jax.tree.map(
      lambda x: jax.sharding.NamedSharding(
          mesh, spec('data', None) if x.ndim == 2 else spec()), params)
  params = jax.device_put(params, shardings)
  grads = jax.device_put(_grads(params), shardings)
  tx = helpers.OPTIMIZERS[name].build()
  state = jax.jit(tx.init)(params)

  @jax.jit
  def step(p, s, g):
    u, s = helpers.update(tx, g, s, p)
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
# (a fixed relative step can only hover near the optimum), optax's tolerance
# on Rosenbrock in float32. In bfloat16 a step below the params' resolution
# (2**-8 relative) rounds away, so the schedule stops at 2.5e-3 and runs
# longer.
STEPS = {jnp.float32: 2000, jnp.bfloat16: 5000}
SCHEDULE_FLOOR = {jnp.float32: 1e-3, jnp.bfloat16: 0.05}
TOLERANCE = {
    (helpers.parabola, jnp.float32): 1e-4,
    (helpers.rosenbrock, jnp.float32): 3e-2,
    (helpers.parabola, jnp.bfloat16): 2e-2,
    (helpers.rosenbrock, jnp.bfloat16): 5e-2,
}


@pytest.mark.parametrize('dtype', [jnp.float32, jnp.bfloat16], ids=str)
@pytest.mark.parametrize('target', [helpers.parabola, helpers.rosenbrock])
@pytest.mark.parametrize('name', DESCENDING)
def test_toy_problems(name, target, dtype):
  n = STEPS[dtype]
  sched = optax.cosine_decay_schedule(0.05, n, alpha=SCHEDULE_FLOOR[dtype])
  # fromage_on_plateau takes the schedule too, with a long patience: on
  # Rosenbrock, where its decays fall is chaotic in the patience (bf16 error
  # 0.48 at 100, 0.012 at 300 and 500, 0.26 at 1000; float32 0.17 at 100).
  tx = (fj.fromage_on_plateau(sched, patience=500)
        if name == 'fromage_on_plateau'
        else helpers.OPTIMIZERS[name].build(hyper=sched))
  err = helpers.optimize(tx, target, n, with_value=True, dtype=dtype)
  assert err < TOLERANCE[target, dtype], err
