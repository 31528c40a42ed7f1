"""Data-parallel and sharded training on 4 of the forced CPU devices equals
training on one: `pmap`, `jit` with a data mesh (replicated params) and FSDP
(sharded params, donated buffers), `optax.apply_if_finite` skipping a step
whose gradient is not finite on one device, and `shard_map` with `axis_name`
as a pytree prefix, a callable or a tuple of mesh axes."""

import functools

import jax
from jax import lax
import jax.numpy as jnp
from jax.sharding import Mesh
from jax.sharding import NamedSharding
from jax.sharding import PartitionSpec as P
import numpy as np
import optax
import pytest

import fromage_jax as fj
from tests import helpers

N = 4
STEPS = 20
SIZES = (16, 32, 32, 8)  # every width divides by 4
BATCH = 64
RTOL = 1e-5


def _mesh(shape=(N,), names=('data',)):
  return Mesh(np.array(jax.devices()[:np.prod(shape)]).reshape(shape), names)


def _optimizers():
  return {'fromage': fj.fromage(0.05),
          'fromage_p_bound': fj.fromage(0.05, p_bound=1.02)}


def _data(seed=0, n=BATCH * STEPS):
  """Inputs and labels of a random teacher network."""
  rng = np.random.default_rng(seed)
  x = rng.standard_normal((n, SIZES[0])).astype(np.float32)
  teacher = rng.standard_normal((SIZES[0], SIZES[-1])).astype(np.float32)
  return x, np.argmax(x @ teacher, axis=-1).astype(np.int32)


def _batches(x, y, steps=STEPS):
  for i in range(steps):
    yield x[i * BATCH:(i + 1) * BATCH], y[i * BATCH:(i + 1) * BATCH]


def _step(txs, reduce_grads=None):
  """One training step of every optimizer in `txs` (dicts keyed by name):
  one compiled step for all, as compiling is the cost here."""
  def step(params, states, xb, yb):
    new_params, new_states = {}, {}
    for k, tx in txs.items():
      grads = jax.grad(helpers.mlp_loss)(params[k], xb, yb)
      if reduce_grads is not None:
        grads = reduce_grads(grads)
      updates, new_states[k] = tx.update(grads, states[k], params[k])
      new_params[k] = optax.apply_updates(params[k], updates)
    return new_params, new_states
  return step


def _init_all(txs, params0):
  return ({k: params0 for k in txs},
          {k: tx.init(params0) for k, tx in txs.items()})


@functools.cache
def _reference(seed=0):
  """Every optimizer trained on one device on the whole (global) batch."""
  txs = _optimizers()
  params0 = helpers.to_numpy(helpers.init_mlp(jax.random.key(seed), SIZES))
  x, y = _data(seed)
  step = jax.jit(_step(txs))
  params, states = _init_all(txs, params0)
  for xb, yb in _batches(x, y):
    params, states = step(params, states, xb, yb)
  return params0, x, y, helpers.to_numpy((params, states))


def _assert_trained_like_the_reference(out, ref, params0):
  for k in ref[0]:
    helpers.assert_trees_close((out[0][k], out[1][k]), (ref[0][k], ref[1][k]),
                               rtol=RTOL, atol=1e-6)
    # A weak test would pass with params that never moved.
    assert helpers.tree_dist(out[0][k], params0) > 1e-2


def _replicate(tree):
  return jax.tree.map(lambda a: np.broadcast_to(a, (N,) + np.shape(a)), tree)


def _shard_batch(a):
  return a.reshape((N, a.shape[0] // N) + a.shape[1:])


def _replicas_identical(tree) -> bool:
  return all(np.array_equal(a, np.broadcast_to(a[:1], a.shape), equal_nan=True)
             for a in jax.tree.leaves(helpers.to_numpy(tree)))


# ------------------------------------------------------------------ pmap ---


def test_pmap_with_averaged_gradients_trains_like_one_device():
  params0, x, y, ref = _reference()
  txs = _optimizers()
  step = jax.pmap(_step(txs, lambda g: lax.pmean(g, 'batch')),
                  axis_name='batch', devices=jax.devices()[:N])
  params, states = _replicate(helpers.to_numpy(_init_all(txs, params0)))
  for xb, yb in _batches(x, y):
    params, states = step(params, states, _shard_batch(xb), _shard_batch(yb))
  assert _replicas_identical((params, states))
  first = jax.tree.map(lambda a: np.asarray(a)[0], (params, states))
  _assert_trained_like_the_reference(first, ref, params0)


def test_pmap_apply_if_finite_skips_on_every_replica():
  """A NaN in one device's gradient, before the average: every replica skips
  the step alike, and the next finite step applies."""
  params0, x, y, _ = _reference()
  tx = optax.apply_if_finite(fj.fromage(0.05, p_bound=1.02), 3)

  def step(params, state, xb, yb, nan_on):
    grads = jax.grad(helpers.mlp_loss)(params, xb, yb)
    bad = lax.axis_index('batch') == nan_on
    grads = jax.tree.map(lambda g: jnp.where(bad, jnp.nan, g), grads)
    grads = lax.pmean(grads, 'batch')
    updates, state = tx.update(grads, state, params)
    return optax.apply_updates(params, updates), state

  step = jax.pmap(step, axis_name='batch', in_axes=(0, 0, 0, 0, None),
                  devices=jax.devices()[:N])
  params = _replicate(params0)
  state = _replicate(helpers.to_numpy(tx.init(params0)))
  xb, yb = next(_batches(x, y))
  xb, yb = _shard_batch(xb), _shard_batch(yb)
  params, state = step(params, state, xb, yb, -1)
  before = helpers.to_numpy((params, state.inner_state))
  params, state = step(params, state, xb, yb, N - 1)
  assert _replicas_identical((params, state))
  for u, v in zip(jax.tree.leaves(before),
                  jax.tree.leaves(helpers.to_numpy((params,
                                                    state.inner_state))),
                  strict=True):
    np.testing.assert_array_equal(u, v)
  np.testing.assert_array_equal(np.asarray(state.notfinite_count), 1)
  assert not np.any(np.asarray(state.last_finite))
  params, state = step(params, state, xb, yb, -1)
  assert _replicas_identical((params, state))
  assert helpers.tree_dist(jax.tree.map(lambda a: a[0], params),
                           jax.tree.map(lambda a: a[0], before[0])) > 1e-4
  np.testing.assert_array_equal(np.asarray(state.notfinite_count), 0)


# ------------------------------------------------------- jit + sharding ---


def _fsdp_spec(leaf, axis='data'):
  """Kernels split along their output dim, biases along their only dim."""
  return P(None, axis) if np.ndim(leaf) == 2 else P(axis)


def _train_jit(mesh, param_specs, *, out_shardings=False, donate=False):
  """Trains with the batch split along 'data' and params placed per spec;
  returns (params, states), the states' shardings after `jit(init)`, and
  whether the first, donated, params were consumed."""
  txs = _optimizers()
  params0, x, y, _ = _reference()
  param_sh = {k: jax.tree.map(lambda s: NamedSharding(mesh, s), param_specs)
              for k in txs}
  batch_sh = NamedSharding(mesh, P('data'))
  params = jax.device_put({k: params0 for k in txs}, param_sh)
  states = jax.jit(lambda p: {k: tx.init(p[k]) for k, tx in txs.items()})(
      params)
  init_sh = jax.tree.map(lambda a: a.sharding, states)
  kwargs = {}
  if out_shardings:
    # Fromage's state is scalars and per-layer norms: replicated.
    state_sh = jax.tree.map(lambda _: NamedSharding(mesh, P()), states)
    kwargs['out_shardings'] = (param_sh, state_sh)
  if donate:
    kwargs['donate_argnums'] = (0, 1)
  step = jax.jit(_step(txs), **kwargs)
  first = params
  for xb, yb in _batches(x, y):
    params, states = step(params, states, jax.device_put(xb, batch_sh),
                          jax.device_put(yb, batch_sh))
  consumed = all(a.is_deleted() for a in jax.tree.leaves(first))
  return (params, states), init_sh, consumed


def test_jit_data_parallel_with_replicated_params_trains_like_one_device():
  mesh = _mesh()
  params0, _, _, ref = _reference()
  out, _, _ = _train_jit(mesh, jax.tree.map(lambda _: P(), params0))
  for leaf in jax.tree.leaves(out):
    assert leaf.sharding.is_fully_replicated, leaf.sharding
  _assert_trained_like_the_reference(helpers.to_numpy(out), ref, params0)


def test_jit_fsdp_keeps_the_shardings_and_trains_like_one_device():
  mesh = _mesh()
  params0, _, _, ref = _reference()
  specs = jax.tree.map(_fsdp_spec, params0)
  out, init_sh, consumed = _train_jit(mesh, specs, out_shardings=True,
                                      donate=True)
  for k in out[0]:
    for leaf, spec in zip(jax.tree.leaves(out[0][k]), jax.tree.leaves(specs),
                          strict=True):
      assert leaf.sharding.is_equivalent_to(NamedSharding(mesh, spec),
                                            leaf.ndim)
  # The norms at init are per layer (size 1 off the layer axes): replicated
  # at init and after every step.
  norms = jax.tree.leaves(
      init_sh['fromage_p_bound']['norm_clip_to_init'].init_norms)
  assert all(s.is_fully_replicated for s in norms), norms
  for leaf in jax.tree.leaves(out[1]):
    assert leaf.sharding.is_fully_replicated, leaf.sharding
  assert consumed
  _assert_trained_like_the_reference(helpers.to_numpy(out), ref, params0)


def test_jit_apply_if_finite_skips_a_step_with_a_nan_in_one_shard():
  mesh = _mesh()
  params0, x, y, _ = _reference()
  tx = optax.apply_if_finite(fj.fromage(0.05), 3)
  param_sh = jax.tree.map(lambda a: NamedSharding(mesh, _fsdp_spec(a)),
                          params0)
  batch_sh = NamedSharding(mesh, P('data'))
  params = jax.device_put(params0, param_sh)
  state = jax.jit(tx.init)(params)
  step = jax.jit(_step({'tx': tx}))
  xb, yb = next(_batches(x, y))
  bad_x = xb.copy()
  bad_x[-1, 0] = np.nan  # the last example: on the last device

  def run(params, state, xb):
    p, s = step({'tx': params}, {'tx': state}, jax.device_put(xb, batch_sh),
                jax.device_put(yb, batch_sh))
    return p['tx'], s['tx']

  params, state = run(params, state, xb)
  before = helpers.to_numpy(params)
  params, state = run(params, state, bad_x)
  for u, v in zip(jax.tree.leaves(before),
                  jax.tree.leaves(helpers.to_numpy(params)), strict=True):
    np.testing.assert_array_equal(u, v)
  assert int(state.notfinite_count) == 1
  params, state = run(params, state, xb)
  assert helpers.tree_dist(params, before) > 1e-4
  assert int(state.notfinite_count) == 0


# ------------------------------------------------------------- shard_map ---


def _transforms(axis_name):
  """The transforms checked under shard_map, built with `axis_name`."""
  return {
      'fromage_p_bound': fj.fromage(0.1, p_bound=1.01, axis_name=axis_name),
      'scale_by_frobenius_ratio': optax.chain(
          fj.scale_by_frobenius_ratio(axis_name=axis_name), optax.scale(-0.1)),
      # Clips hard: every step pulls each layer back onto 1.01 * ||W0||.
      'norm_clip_to_init': optax.chain(
          optax.scale(-1.0), fj.norm_clip_to_init(1.01, axis_name=axis_name)),
      'norm_project_to_init': optax.chain(
          optax.scale(-1.0), fj.norm_project_to_init(axis_name=axis_name)),
  }


def _run_all(txs, params, grads):
  """For every transform: init, then one update per gradient in `grads`
  (stacked on a leading axis); returns {name: final params}."""
  out = {}
  for k, tx in txs.items():
    def body(carry, g, tx=tx):
      p, state = carry
      updates, state = tx.update(g, state, p)
      return (optax.apply_updates(p, updates), state), None
    (out[k], _), _ = lax.scan(body, (params, tx.init(params)), grads)
  return out


def _shard_map_against_unsharded(params, mesh, specs, axis_name, steps=3):
  grads = helpers.random_like(
      jax.tree.map(lambda a: np.zeros((steps,) + np.shape(a), np.float32),
                   params), 9)
  grad_specs = jax.tree.map(lambda s: P(None, *s), specs,
                            is_leaf=lambda x: isinstance(x, P))
  sharded = _transforms(axis_name)
  got = jax.jit(helpers.shard_map(
      functools.partial(_run_all, sharded), mesh=mesh,
      in_specs=(specs, grad_specs), out_specs={k: specs for k in sharded},
  ))(params, grads)
  want = jax.jit(functools.partial(_run_all, _transforms(None)))(params,
                                                                 grads)
  got, want = helpers.to_numpy(got), helpers.to_numpy(want)
  for k in sharded:
    helpers.assert_trees_close(got[k], want[k], rtol=RTOL, atol=1e-6)
  # Without axis_name each shard would use its local norms: another result.
  plain = {'fromage_p_bound': _transforms(None)['fromage_p_bound']}
  local = jax.jit(helpers.shard_map(
      functools.partial(_run_all, plain), mesh=mesh,
      in_specs=(specs, grad_specs), out_specs={'fromage_p_bound': specs},
  ))(params, grads)
  assert helpers.tree_dist(helpers.to_numpy(local['fromage_p_bound']),
                           want['fromage_p_bound']) > 1e-3


def test_shard_map_with_an_axis_name_prefix_or_callable():
  """Hidden layers split over 'x'; the head replicated (axis_name None)."""
  mesh = _mesh(names=('x',))
  mlp = helpers.to_numpy(helpers.init_mlp(jax.random.key(6), (8, 16, 10)))
  params = {'hidden': mlp[:-1], 'head': mlp[-1]}
  specs = {'hidden': jax.tree.map(lambda a: _fsdp_spec(a, 'x'), mlp[:-1]),
           'head': {'w': P(), 'b': P()}}
  _shard_map_against_unsharded(params, mesh, specs,
                               {'hidden': 'x', 'head': None})

  def by_callable(p):
    return {'hidden': jax.tree.map(lambda _: 'x', p['hidden']),
            'head': jax.tree.map(lambda _: None, p['head'])}

  _shard_map_against_unsharded(params, mesh, specs, by_callable)


@pytest.mark.parametrize('whole_tree', [False, True],
                         ids=['per_leaf', 'one_tuple'])
def test_shard_map_over_two_mesh_axes(whole_tree):
  """A 2 x 2 mesh: kernels split over both axes; biases over 'a' only, so
  replicated over 'b', which needs the per-leaf names of a pytree prefix."""
  mesh = _mesh((2, 2), ('a', 'b'))
  mlp = helpers.to_numpy(helpers.init_mlp(jax.random.key(7), (8, 16, 8)))
  if whole_tree:  # a kernel alone: one tuple of names for the whole tree
    params, specs, names = {'w': mlp[0]['w']}, {'w': P('a', 'b')}, ('a', 'b')
  else:
    params = mlp
    specs = jax.tree.map(lambda a: P('a', 'b') if np.ndim(a) == 2 else P('a'),
                         mlp)
    names = [{'w': ('a', 'b'), 'b': 'a'} for _ in mlp]
  _shard_map_against_unsharded(params, mesh, specs, names)
