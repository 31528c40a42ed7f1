"""What a layer is and what its norm is (`fromage_jax._src.layers`):
`layer_axes` in every form, stacked layers equal to separate ones, the
accumulation dtype, the sums inside a named axis, and the safe square root
and division."""

import functools

from hypothesis import given
from hypothesis import settings
from hypothesis import strategies as st
import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

import fromage_jax as fj
from fromage_jax import testing
from fromage_jax._src import layers
from tests import helpers

# ---------------------------------------------------------------- layer_axes ---


@pytest.mark.parametrize(
    'layer_axes',
    [
        helpers.STACK_PREFIX,
        lambda p: {k: ((0,) if k == 'stack' else None) for k in p},
    ],
    ids=['prefix', 'callable'],
)
def test_stacked_layers_match_reference(layer_axes):
  params = helpers.reference_params(np.random.default_rng(8))
  helpers.run_against_reference(
      fj.fromage(0.1, layer_axes=layer_axes), params,
      lambda t: 0.1, layer_axes=layer_axes,
  )


def test_layer_axes_tuple_for_every_leaf():
  rng = np.random.default_rng(9)
  stack = helpers.draw(rng, (3, 4, 2))
  stack[1] = 0
  params = {'a': stack, 'b': helpers.draw(rng, (2, 3, 5)), 'c': helpers.draw(rng, (4,))}
  opt = fj.fromage(0.1, layer_axes=(0,))
  state = opt.init(params)
  update = jax.jit(opt.update)
  p = jax.tree.map(jnp.asarray, params)
  for _ in range(10):
    grads = jax.tree.map(lambda w: helpers.draw(rng, w.shape), params)
    grads['b'][1] = 0
    want = testing.fromage_step(helpers.to_numpy(p), grads, 0.1, layer_axes=(0,))
    u, state = update(grads, state, p)
    p = optax.apply_updates(p, u)
    helpers.assert_trees_close_to_scale(p, want, helpers.STEP_RTOL)


def test_two_layer_axes():
  # A [2, 3, 4, 5] leaf with layer_axes=(0, 1): 6 layers of 4x5.
  rng = np.random.default_rng(10)
  params = {'w': helpers.draw(rng, (2, 3, 4, 5))}
  params['w'][0, 2] = 0
  opt = fj.fromage(0.1, p_bound=1.1, layer_axes=(0, 1))
  state = opt.init(params)
  update = jax.jit(opt.update)
  init_norms = testing.layer_norms(params, (0, 1))
  p = jax.tree.map(jnp.asarray, params)
  for _ in range(5):
    grads = {'w': helpers.draw(rng, (2, 3, 4, 5)) - 2 * np.asarray(p['w'])}
    want = testing.fromage_step(
        helpers.to_numpy(p), grads, 0.1, p_bound=1.1, init_norms=init_norms,
        layer_axes=(0, 1),
    )
    u, state = update(grads, state, p)
    p = optax.apply_updates(p, u)
    helpers.assert_trees_close_to_scale(p, want, helpers.STEP_RTOL)


@pytest.mark.parametrize('axes', [(0,), [0], (np.int64(0),), (-3,)],
                         ids=['tuple', 'list', 'numpy_int', 'negative'])
def test_every_integer_form_of_an_axis_names_the_same_layers(axes):
  params = {'stack': helpers.normal(0, (3, 4, 2))}
  found = layers.find_layers(params, axes, name='test')
  assert found.axes == ((0,),)
  (sq,) = layers.sq_norms(found, found.leaves(params))
  np.testing.assert_allclose(
      np.sqrt(np.asarray(sq[0])),
      testing.layer_norms(params, (0,))['stack'], rtol=1e-6)


@pytest.mark.parametrize('layer_axes, error, needle', [
    ((3,), ValueError, 'out of range'),
    ((0, -3), ValueError, 'repeats'),
    ({'a': None}, ValueError, 'prefix'),
    ({'stack': 'zero'}, TypeError, 'not a valid entry'),
], ids=['out_of_range', 'repeated', 'not_a_prefix', 'not_axes'])
def test_a_layer_axes_that_cannot_work_names_the_leaf_and_the_function(
    layer_axes, error, needle):
  params = {'stack': jnp.ones((3, 4, 2))}
  tx = fj.fromage(0.1, layer_axes=layer_axes)
  with pytest.raises(error, match=needle) as info:
    tx.update(params, tx.init(params), params)
  assert 'fromage_jax.fromage' in str(info.value)


# ---------------------------------------- stacked layers are separate layers ---


def test_stacked_leaf_equals_separate_leaves():
  # SPEC: with layer_axes=(0,) an [L, ...] leaf gives exactly the updates of
  # L separate leaves.
  rng = np.random.default_rng(11)
  w = helpers.draw(rng, (3, 4, 2))
  w[1] = 0
  g = helpers.draw(rng, (3, 4, 2))
  g[2] = 0
  stacked = fj.fromage(0.1, p_bound=1.5, layer_axes=(0,))
  separate = fj.fromage(0.1, p_bound=1.5)
  u_st, _ = jax.jit(stacked.update)(g, stacked.init(w), w)
  ws, gs = list(w), list(g)
  u_sep, _ = jax.jit(separate.update)(gs, separate.init(ws), ws)
  np.testing.assert_allclose(
      np.asarray(u_st), np.stack([np.asarray(u) for u in u_sep]),
      rtol=1e-6, atol=1e-7,
  )


def _arr(seed, shape, dtype=np.float32, scale=1.0):
  return (scale * np.random.default_rng(seed).standard_normal(shape)).astype(
      dtype
  )


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
def test_stacked_leaf_equals_separate_leaves_for_any_stack(
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


# ------------------------------------------ dtypes, sums and safe arithmetic ---


@pytest.mark.parametrize('dtypes, compute, norm', [
    ((jnp.bfloat16,), jnp.float32, jnp.float32),
    ((jnp.float16, jnp.bfloat16), jnp.float32, jnp.float32),
    ((jnp.float32,), jnp.float32, jnp.float32),
    ((jnp.complex64,), jnp.complex64, jnp.float32),
    ((jnp.bfloat16, jnp.complex64), jnp.complex64, jnp.float32),
], ids=str)
def test_arithmetic_runs_in_float32_at_least(dtypes, compute, norm):
  assert layers.compute_dtype(*dtypes) == compute
  assert layers.norm_dtype(*dtypes) == norm


def test_float64_leaves_accumulate_in_float64():
  with helpers.enable_x64():
    assert layers.norm_dtype(jnp.float32, jnp.float64) == jnp.float64
    x = jnp.full((3,), 1 + 2**-30, jnp.float64)  # lost in float32
    found = layers.find_layers(x, name='test')
    (sq,) = layers.sq_norms(found, [x])
    assert sq[0].dtype == jnp.float64
    np.testing.assert_allclose(float(sq[0][0]), 3 * (1 + 2**-30) ** 2,
                               rtol=1e-15)


def _psums(jaxpr) -> int:
  return sum(eqn.primitive.name.startswith('psum') for eqn in jaxpr.eqns)


def test_all_layers_sharded_over_one_axis_are_summed_in_one_psum():
  """A named axis of `vmap` stands in for a mesh axis: each of the 4
  'devices' holds a shard of every leaf; the sums are the whole layers'."""
  shards = {f'w{i}': helpers.normal(i, (4, 3, 5)) for i in range(20)}
  names = {k: 'shard' for k in shards}
  names['w0'] = None  # one leaf not sharded: its norm is the local one

  def sums(tree):
    found = layers.find_layers(tree, axis_name=names, name='test')
    return layers.sq_norms(found, found.leaves(tree))[0]

  got = jax.vmap(sums, axis_name='shard')(shards)
  jaxpr = jax.make_jaxpr(jax.vmap(sums, axis_name='shard'))(shards).jaxpr
  assert _psums(jaxpr) == 1
  found = layers.find_layers(shards, name='test')
  for i, k in enumerate(found.leaves({k: k for k in shards})):
    whole = float(jnp.sum(shards[k] ** 2))
    local = np.asarray(jnp.sum(shards[k] ** 2, axis=(1, 2)))
    want = local if k == 'w0' else np.full(4, whole)
    np.testing.assert_allclose(np.ravel(got[i]), want, rtol=1e-5)


def test_norm_and_division_have_finite_derivatives_at_zero():
  grad_norm = jax.grad(lambda sq: layers.norm(sq))(0.0)
  assert grad_norm == 0.0
  np.testing.assert_allclose(jax.grad(lambda sq: layers.norm(sq))(4.0), 0.25)

  def ratio(den):
    return layers.divide_where(den > 0, 3.0, den)

  assert ratio(0.0) == 1.0 and jax.grad(ratio)(0.0) == 0.0
  np.testing.assert_allclose(jax.grad(ratio)(2.0), -0.75)
