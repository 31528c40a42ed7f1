"""The optimizer table (`helpers.OPTIMIZERS`) on 4 devices: `pmap` with
averaged gradients, `jit` with `NamedSharding`s, and `shard_map` with
`axis_name`, each equal to the same step on one device."""

import jax
import jax.numpy as jnp
from jax.sharding import Mesh
from jax.sharding import NamedSharding
from jax.sharding import PartitionSpec as P
import numpy as np
import optax
import pytest

from tests import helpers

N = 4
NAMES = list(helpers.OPTIMIZERS)
CASES = list(helpers.CASES)


def _setup(name, case, axis_name=None):
  case = helpers.CASES[case]()
  tx = helpers.OPTIMIZERS[name].build(case.layer_axes, axis_name=axis_name)
  return case, tx


def _one_device_step(tx, grads, params):
  """Two steps from `init`, on one device: the reference."""
  @jax.jit
  def run(grads, params):
    state = tx.init(params)
    for _ in range(2):
      updates, state = helpers.update(tx, grads, state, params)
      params = optax.apply_updates(params, updates)
    return params, state
  return run(grads, params)


def _spec(leaf, layer_axes):
  """Shards the first axis that is not a layer axis and that N divides."""
  for a in range(leaf.ndim):
    if a not in layer_axes and leaf.shape[a] % N == 0:
      return P(*[('d' if b == a else None) for b in range(leaf.ndim)])
  return P()


def _specs(case):
  axes = (case.layer_axes(case.params) if callable(case.layer_axes)
          else jax.tree.map(lambda _: None, case.params))
  return jax.tree.map(lambda x, ax: _spec(x, ax or ()), case.params, axes,
                      is_leaf=lambda x: x is None)


@pytest.mark.parametrize('case', CASES)
@pytest.mark.parametrize('name', NAMES)
def test_pmap_with_averaged_gradients_equals_one_device(name, case):
  case, tx = _setup(name, case)
  params = case.params
  per_device = [helpers.random_like(params, s) for s in range(N)]
  mean = jax.tree.map(lambda *g: sum(g) / N, *per_device)

  def run(grads, params):
    grads = jax.lax.pmean(grads, 'batch')
    state = tx.init(params)
    for _ in range(2):
      updates, state = helpers.update(tx, grads, state, params)
      params = optax.apply_updates(params, updates)
    return params, state

  replicate = lambda t: jax.tree.map(lambda x: jnp.stack([x] * N), t)  # noqa: E731
  got = jax.pmap(run, axis_name='batch', devices=jax.devices()[:N])(
      jax.tree.map(lambda *g: jnp.stack(g), *per_device), replicate(params))
  want = _one_device_step(tx, mean, params)
  for i in range(N):
    helpers.assert_trees_close(jax.tree.map(lambda x, i=i: x[i], got), want,
                               1e-5, 1e-6)


@pytest.mark.parametrize('case', CASES)
@pytest.mark.parametrize('name', NAMES)
def test_jit_with_named_shardings_equals_one_device(name, case):
  case, tx = _setup(name, case)
  mesh = Mesh(np.array(jax.devices()[:N]), ('d',))
  shardings = jax.tree.map(lambda s: NamedSharding(mesh, s), _specs(case),
                           is_leaf=lambda x: isinstance(x, P))
  grads = helpers.random_like(case.params, 1)
  params = jax.device_put(case.params, shardings)
  got_params, got_state = _one_device_step(
      tx, jax.device_put(grads, shardings), params)
  want = _one_device_step(tx, grads, case.params)
  helpers.assert_trees_close((got_params, got_state), want, 1e-5, 1e-6)
  for new, old in zip(jax.tree.leaves(got_params), jax.tree.leaves(params),
                      strict=True):
    assert new.sharding.is_equivalent_to(old.sharding, old.ndim)


@pytest.mark.parametrize('case', CASES)
@pytest.mark.parametrize('name', NAMES)
def test_shard_map_with_axis_name_equals_one_device(name, case):
  specs = _specs(helpers.CASES[case]())
  names = jax.tree.map(lambda s: 'd' if s != P() else None, specs,
                       is_leaf=lambda x: isinstance(x, P))
  case, tx = _setup(name, case, axis_name=names)
  mesh = Mesh(np.array(jax.devices()[:N]), ('d',))
  grads = helpers.random_like(case.params, 1)

  def run(grads, params):
    state = tx.init(params)
    for _ in range(2):
      updates, state = helpers.update(tx, grads, state, params)
      params = optax.apply_updates(params, updates)
    return params

  got = jax.jit(helpers.shard_map(run, mesh=mesh, in_specs=(specs, specs),
                                  out_specs=specs))(grads, case.params)
  reference = helpers.OPTIMIZERS[name].build(case.layer_axes)
  want, _ = _one_device_step(reference, grads, case.params)
  helpers.assert_trees_close(got, want, 1e-5, 1e-6)
