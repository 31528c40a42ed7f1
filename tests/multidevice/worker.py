"""One process of a multi-process (several hosts) run on localhost, started
by `test_processes.py`:

    python -m tests.multidevice.worker PROCESS_ID NUM_PROCESSES PORT

It trains on a mesh that spans every process's devices, with FSDP-sharded
params, and runs a `shard_map` whose `psum`s cross processes, and checks each
against the same computation on one local device; a failed check raises.
"""

import functools
import sys

import jax
from jax.experimental import multihost_utils
from jax.sharding import Mesh
from jax.sharding import NamedSharding
from jax.sharding import PartitionSpec as P
import numpy as np
import optax

import fromage_jax as fj
from tests import helpers

SIZES = (16, 32, 8)
STEPS = 10


def _put(tree, spec, mesh):
  """Every process holds the whole (identical) host value; each of its
  devices gets the slice it owns."""
  def one(a, s):
    a = np.asarray(a)
    sharding = NamedSharding(mesh, s)
    return jax.make_array_from_callback(a.shape, sharding, lambda i: a[i])
  return jax.tree.map(one, tree, spec, is_leaf=lambda x: isinstance(x, P))


def _gather(tree):
  return jax.tree.map(
      lambda a: np.asarray(multihost_utils.process_allgather(a, tiled=True)),
      tree)


def _fsdp_spec(a, axis):
  return P(None, axis) if np.ndim(a) == 2 else P(axis)


def _train(tx, params, batches):
  @jax.jit
  def step(p, s, x, y):
    u, s = tx.update(jax.grad(helpers.mlp_loss)(p, x, y), s, p)
    return optax.apply_updates(p, u), s

  state = jax.jit(tx.init)(params)
  for x, y in batches:
    params, state = step(params, state, x, y)
  return params


def check_fsdp_training():
  rng = np.random.default_rng(8)
  params0 = helpers.to_numpy(helpers.init_mlp(jax.random.key(8), SIZES))
  data = [(rng.standard_normal((32, SIZES[0])).astype(np.float32),
           rng.integers(0, SIZES[-1], 32).astype(np.int32))
          for _ in range(STEPS)]
  tx = fj.fromage(0.05, p_bound=1.02)
  mesh = Mesh(np.array(jax.devices()), ('data',))
  specs = jax.tree.map(lambda a: _fsdp_spec(a, 'data'), params0)
  got = _gather(_train(tx, _put(params0, specs, mesh), [
      tuple(_put(a, P('data'), mesh) for a in batch) for batch in data]))
  with jax.default_device(jax.local_devices()[0]):
    want = helpers.to_numpy(_train(tx, params0, data))
  helpers.assert_trees_close(got, want, rtol=1e-5, atol=1e-6)
  assert helpers.tree_dist(want, params0) > 1e-2


def check_shard_map_across_processes():
  params = helpers.to_numpy(helpers.init_mlp(jax.random.key(9), SIZES))
  grads = helpers.to_numpy(helpers.random_like(params, 9))
  mesh = Mesh(np.array(jax.devices()), ('x',))
  specs = jax.tree.map(lambda a: _fsdp_spec(a, 'x'), params)

  def step(tx, params, grads):
    updates, _ = tx.update(grads, tx.init(params), params)
    return optax.apply_updates(params, updates)

  sharded = functools.partial(step, fj.fromage(0.1, p_bound=1.01,
                                               axis_name='x'))
  got = _gather(jax.jit(helpers.shard_map(
      sharded, mesh=mesh, in_specs=(specs, specs), out_specs=specs))(
          _put(params, specs, mesh), _put(grads, specs, mesh)))
  with jax.default_device(jax.local_devices()[0]):
    want = helpers.to_numpy(jax.jit(functools.partial(
        step, fj.fromage(0.1, p_bound=1.01)))(params, grads))
  helpers.assert_trees_close(got, want, rtol=1e-5, atol=1e-6)


def main(process_id: int, num_processes: int, port: int) -> None:
  # Gloo does CPU collectives across processes.
  jax.config.update('jax_cpu_collectives_implementation', 'gloo')
  jax.distributed.initialize(
      f'127.0.0.1:{port}', num_processes=num_processes,
      process_id=process_id, initialization_timeout=60)
  try:
    assert jax.process_count() == num_processes
    assert jax.device_count() > jax.local_device_count()
    check_fsdp_training()
    check_shard_map_across_processes()
  finally:
    jax.distributed.shutdown()


if __name__ == '__main__':
  main(*map(int, sys.argv[1:4]))
