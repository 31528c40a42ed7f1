"""Every public optimizer and transform under JAX's transformations.

One table (`helpers.OPTIMIZERS`), as optax's `alias_test.py` has one, run on
a tree of small and large, zero-initialised and gradient-free layers, flat
and stacked (`helpers.CASES`): `grad` with respect to the gradients, to the
params through two steps and to the hyperparameter, each against float64
central differences; `jvp`; `vmap` over gradients and over models; `scan`
with `checkpoint` under `jit`, and `grad` through it; `eval_shape`. The same
table under `pmap`, shardings and `shard_map` is in `tests/multidevice`.
"""

import re

from absl.testing import parameterized
import chex
import jax
import jax.numpy as jnp
import optax
import pytest

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
    helpers.assert_trees_close(got, want, 1e-6, 1e-7)

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
                                 want, 1e-6, 1e-7)
      helpers.assert_trees_close(
          jax.tree.map(lambda x, i=i: x[i], got_state), want_state, 1e-6,
          1e-7)

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
