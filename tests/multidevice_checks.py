"""Data-parallel and sharded checks of fromage_jax on several CPU devices.

A script, not a test module: it needs several JAX devices, and forcing them
(`XLA_FLAGS=--xla_force_host_platform_device_count=4`) only works before JAX
creates its CPU backend, so it runs in a process of its own. `test_parallel.py`
starts it with `subprocess`; by hand:

    XLA_FLAGS=--xla_force_host_platform_device_count=4 \
        python tests/multidevice_checks.py [CHECK ...]

Every check prints one line `CHECK <name>: PASS <details>` or
`CHECK <name>: FAIL <reason>`; the exit code is the number of failures.

The same file is the worker of the multi-process check (several hosts,
simulated by processes on localhost):

    python tests/multidevice_checks.py --worker PROCESS_ID NUM_PROCESSES PORT
"""

import functools
import sys
import time
import traceback

import jax
from jax import lax
import jax.numpy as jnp
from jax.sharding import Mesh
from jax.sharding import NamedSharding
from jax.sharding import PartitionSpec as P
import numpy as np
import optax

import fromage_jax

N_DEVICES = 4
RTOL = 1e-5
STEPS = 20
# Every width divides by 4, so every kernel and bias can be split 4 ways.
SIZES = (16, 32, 32, 8)
BATCH = 64


# --------------------------------------------------------------- helpers ---


def init_mlp(key, sizes=SIZES):
  """He-initialised kernels; small random biases (so none has norm 0)."""
  params = []
  for k, d_in, d_out in zip(
      jax.random.split(key, len(sizes) - 1), sizes[:-1], sizes[1:], strict=True
  ):
    kw, kb = jax.random.split(k)
    params.append({
        'w': jax.random.normal(kw, (d_in, d_out)) * np.sqrt(2.0 / d_in),
        'b': 0.1 * jax.random.normal(kb, (d_out,)),
    })
  return params


def mlp(params, x):
  for layer in params[:-1]:
    x = jax.nn.relu(x @ layer['w'] + layer['b'])
  return x @ params[-1]['w'] + params[-1]['b']


def loss_fn(params, x, y):
  logits = mlp(params, x)
  return optax.softmax_cross_entropy_with_integer_labels(logits, y).mean()


def synthetic_data(seed=0, n=BATCH * STEPS, sizes=SIZES):
  """Inputs and labels of a random teacher network, as numpy arrays."""
  rng = np.random.default_rng(seed)
  x = rng.standard_normal((n, sizes[0])).astype(np.float32)
  teacher = rng.standard_normal((sizes[0], sizes[-1])).astype(np.float32)
  y = np.argmax(x @ teacher, axis=-1).astype(np.int32)
  return x, y


def batches(x, y, steps=STEPS, batch=BATCH):
  for i in range(steps):
    yield x[i * batch:(i + 1) * batch], y[i * batch:(i + 1) * batch]


def to_numpy(tree):
  return jax.tree.map(np.asarray, tree)


def rel_err(a, b) -> float:
  """max over leaves of ||a - b|| / ||b|| (float64)."""
  errs = jax.tree.leaves(jax.tree.map(
      lambda u, v: np.linalg.norm(
          np.asarray(u, np.float64) - np.asarray(v, np.float64)
      ) / max(np.linalg.norm(np.asarray(v, np.float64)), 1e-30),
      a, b,
  ))
  return max(errs) if errs else 0.0


def assert_close(a, b, what: str, rtol=RTOL) -> float:
  err = rel_err(a, b)
  if not err <= rtol:  # also catches NaN
    raise AssertionError(f'{what}: relative error {err:.3g} > {rtol:g}')
  return err


def optimizers() -> dict:
  """The optimizers every training check runs side by side, by name."""
  return {
      'fromage': fromage_jax.fromage(0.05),
      'fromage_p_bound': fromage_jax.fromage(0.05, p_bound=1.02),
  }


def make_step(txs, reduce_grads=None):
  """One training step of every optimizer in `txs`, on dicts keyed by name.

  Training all optimizers in one compiled step keeps the number of XLA
  compilations (the dominant cost on a small CPU machine) down.
  """
  def step(params, states, xb, yb):
    new_params, new_states = {}, {}
    for k, tx in txs.items():
      grads = jax.grad(loss_fn)(params[k], xb, yb)
      if reduce_grads is not None:
        grads = reduce_grads(grads)
      updates, new_states[k] = tx.update(grads, states[k], params[k])
      new_params[k] = optax.apply_updates(params[k], updates)
    return new_params, new_states

  return step


def init_all(txs, params0):
  return ({k: params0 for k in txs}, {k: tx.init(params0) for k, tx in txs.items()})


_REFERENCE = {}


def reference(seed=0, steps=STEPS):
  """Single-device training of every optimizer on the whole (global) batch."""
  if (seed, steps) not in _REFERENCE:
    txs = optimizers()
    params0 = to_numpy(init_mlp(jax.random.key(seed)))
    x, y = synthetic_data(seed)
    device = jax.local_devices()[0]
    step = jax.jit(make_step(txs))
    params, states = jax.device_put(init_all(txs, params0), device)
    for xb, yb in batches(x, y, steps):
      params, states = step(params, states, jax.device_put(xb, device),
                            jax.device_put(yb, device))
    _REFERENCE[seed, steps] = params0, x, y, to_numpy((params, states))
  return _REFERENCE[seed, steps]


def compare_to_reference(out, ref, params0):
  details = []
  for k in ref[0]:
    err = assert_close((out[0][k], out[1][k]), (ref[0][k], ref[1][k]),
                       f'{k} vs 1 device')
    # A weak test would pass with params that never moved.
    if rel_err(out[0][k], params0) < 1e-3:
      raise AssertionError(f'{k}: params did not move')
    details.append(f'{k} rel err {err:.1e}')
  return ', '.join(details)


# ------------------------------------------------------------------ pmap ---


def replicate(tree, n):
  return jax.tree.map(lambda a: np.broadcast_to(a, (n,) + np.shape(a)), tree)


def replicas_identical(tree) -> bool:
  """Whether every replica (leading axis) equals replica 0 bitwise."""
  return all(
      np.array_equal(a, np.broadcast_to(a[:1], a.shape), equal_nan=True)
      for a in jax.tree.leaves(to_numpy(tree))
  )


def shard_batch(a, n):
  return a.reshape((n, a.shape[0] // n) + a.shape[1:])


def check_pmap(name):
  n = jax.device_count()
  params0, x, y, ref = reference()
  txs = optimizers()
  step = jax.pmap(
      make_step(txs, lambda g: lax.pmean(g, 'batch')), axis_name='batch'
  )
  params, states = replicate(to_numpy(init_all(txs, params0)), n)
  for xb, yb in batches(x, y):
    params, states = step(params, states, shard_batch(xb, n),
                          shard_batch(yb, n))
  if not replicas_identical((params, states)):
    raise AssertionError('replicas diverged')
  first = jax.tree.map(lambda a: np.asarray(a)[0], (params, states))
  return (f'{n} devices, {STEPS} steps, replicas bitwise equal; '
          + compare_to_reference(first, ref, params0))


def check_pmap_apply_if_finite(name):
  n = jax.device_count()
  params0, x, y, _ = reference()
  tx = optax.apply_if_finite(fromage_jax.fromage(0.05, p_bound=1.02), 3)

  def step(params, state, xb, yb, nan_on):
    grads = jax.grad(loss_fn)(params, xb, yb)
    # The NaN enters one device's gradient, before the average.
    bad = lax.axis_index('batch') == nan_on
    grads = jax.tree.map(lambda g: jnp.where(bad, jnp.nan, g), grads)
    grads = lax.pmean(grads, 'batch')
    updates, state = tx.update(grads, state, params)
    return optax.apply_updates(params, updates), state

  step = jax.pmap(step, axis_name='batch', in_axes=(0, 0, 0, 0, None))
  params = replicate(params0, n)
  state = replicate(to_numpy(tx.init(params0)), n)
  xb, yb = next(batches(x, y))
  xb, yb = shard_batch(xb, n), shard_batch(yb, n)
  params, state = step(params, state, xb, yb, -1)
  before = to_numpy((params, state.inner_state))
  params, state = step(params, state, xb, yb, n - 1)
  if not replicas_identical((params, state)):
    raise AssertionError('replicas diverged after the NaN step')
  after = to_numpy((params, state.inner_state))
  for u, v in zip(jax.tree.leaves(before), jax.tree.leaves(after), strict=True):
    if not np.array_equal(u, v):
      raise AssertionError('the NaN step changed params or the inner state')
  counts = np.asarray(state.notfinite_count)
  if not (np.all(counts == 1) and not np.any(np.asarray(state.last_finite))):
    raise AssertionError(f'notfinite_count {counts}, expected 1 everywhere')
  params, state = step(params, state, xb, yb, -1)
  if not replicas_identical((params, state)):
    raise AssertionError('replicas diverged after recovering')
  if rel_err(params, before[0]) < 1e-4:
    raise AssertionError('the finite step after the NaN did not move params')
  if not np.all(np.asarray(state.notfinite_count) == 0):
    raise AssertionError('notfinite_count not reset by a finite step')
  return (f'NaN in device {n - 1}/{n}\'s gradient before pmean: every replica '
          'skipped (params, inner state bitwise unchanged; notfinite_count 1), '
          'replicas bitwise identical; next finite step moves all alike')


# ------------------------------------------------------- jit + sharding ---


def fsdp_spec(path, leaf, axis='data'):
  """Kernels split along their output dim, biases along their only dim."""
  del path
  return P(None, axis) if np.ndim(leaf) == 2 else P(axis)


def default_put(tree, sharding):
  return jax.device_put(tree, sharding)


def train_jit(mesh, param_specs, *, seed=0, steps=STEPS, out_shardings=False,
              donate=False, put=default_put):
  """Trains with the batch split along 'data' and params placed per spec.

  Returns (params, states), the states' shardings after `jit(init)`, and
  whether the first donated params were consumed.
  """
  txs = optimizers()
  params0, x, y, _ = reference(seed, steps)
  param_sh = {k: jax.tree.map(lambda s: NamedSharding(mesh, s), param_specs)
              for k in txs}
  batch_sh = NamedSharding(mesh, P('data'))
  params = put({k: params0 for k in txs}, param_sh)
  # `init` under jit: its outputs take whatever sharding XLA propagates.
  states = jax.jit(lambda p: {k: tx.init(p[k]) for k, tx in txs.items()})(
      params)
  init_sh = jax.tree.map(lambda a: a.sharding, states)
  kwargs = {}
  if out_shardings:
    # Every leaf of fromage's state is a scalar or per-layer norms (size 1 on
    # the non-layer axes): replicated.
    state_sh = jax.tree.map(lambda _: NamedSharding(mesh, P()), states)
    kwargs['out_shardings'] = (param_sh, state_sh)
  if donate:
    kwargs['donate_argnums'] = (0, 1)
  step = jax.jit(make_step(txs), **kwargs)
  first = params
  for xb, yb in batches(x, y, steps):
    params, states = step(params, states, put(xb, batch_sh), put(yb, batch_sh))
  consumed = all(a.is_deleted() for a in jax.tree.leaves(first))
  return (params, states), init_sh, consumed


def check_jit_data_parallel(name):
  mesh = Mesh(np.array(jax.devices()), ('data',))
  params0, _, _, ref = reference()
  out, _, _ = train_jit(mesh, jax.tree.map(lambda _: P(), params0))
  for leaf in jax.tree.leaves(out):
    if not leaf.sharding.is_fully_replicated:
      raise AssertionError(f'a replicated leaf came out {leaf.sharding}')
  return (f'batch P("data") over {mesh.size} devices, params replicated; '
          + compare_to_reference(to_numpy(out), ref, params0))


def describe(sharding):
  if isinstance(sharding, NamedSharding):
    return f'NamedSharding{sharding.spec}'
  return type(sharding).__name__


def check_jit_fsdp(name):
  mesh = Mesh(np.array(jax.devices()), ('data',))
  params0, _, _, ref = reference()
  specs = jax.tree_util.tree_map_with_path(fsdp_spec, params0)
  details = []
  for out_sh, donate in ((True, True),):
    out, init_sh, consumed = train_jit(mesh, specs, out_shardings=out_sh,
                                       donate=donate)
    for k in out[0]:
      for leaf, spec in zip(jax.tree.leaves(out[0][k]), jax.tree.leaves(specs),
                            strict=True):
        want = NamedSharding(mesh, spec)
        if not leaf.sharding.is_equivalent_to(want, leaf.ndim):
          raise AssertionError(f'param sharding {leaf.sharding}, want {want}')
    # The state leaves that mirror params (init_norms) are per-layer norms,
    # size 1 on every non-layer axis: nothing to split; they are replicated
    # over the mesh at init and after every step.
    norms = jax.tree.leaves(
        init_sh['fromage_p_bound']['norm_clip_to_init'].init_norms)
    if not all(s.is_fully_replicated for s in norms):
      raise AssertionError(f'init_norms not replicated at init: {norms}')
    for leaf in jax.tree.leaves(out[1]):
      if not leaf.sharding.is_fully_replicated:
        raise AssertionError(f'a state leaf came out {leaf.sharding}')
    if donate and not consumed:
      raise AssertionError('donated params were not consumed')
    label = 'out_shardings+donation' if out_sh else 'jit'
    details.append(f'{label}: ' + compare_to_reference(to_numpy(out), ref,
                                                        params0))
  state = init_sh['fromage_p_bound']
  count = state['prefactor_correction'].count
  init_norms = state['norm_clip_to_init'].init_norms
  shapes = sorted({tuple(np.shape(a)) for a in jax.tree.leaves(
      optimizers()['fromage_p_bound'].init(params0)['norm_clip_to_init']
      .init_norms)})
  return ('kernels P(None, "data"), biases P("data"); params keep it; '
          f'jit(init) gives count {describe(count)}, init_norms '
          f'(shapes {shapes}) {describe(jax.tree.leaves(init_norms)[0])};'
          ' ' + '; '.join(details))


def check_jit_apply_if_finite(name):
  """Sharded jit: a NaN in one example of one device's shard skips the step."""
  mesh = Mesh(np.array(jax.devices()), ('data',))
  params0, x, y, _ = reference()
  tx = optax.apply_if_finite(fromage_jax.fromage(0.05), 3)
  specs = jax.tree_util.tree_map_with_path(fsdp_spec, params0)
  param_sh = jax.tree.map(lambda s: NamedSharding(mesh, s), specs)
  batch_sh = NamedSharding(mesh, P('data'))
  params = jax.device_put(params0, param_sh)
  state = jax.jit(tx.init)(params)
  step = jax.jit(make_step({'tx': tx}))
  xb, yb = next(batches(x, y))
  bad_x = xb.copy()
  bad_x[-1, 0] = np.nan  # the last example: on the last device

  def run(params, state, xb):
    p, s = step({'tx': params}, {'tx': state}, jax.device_put(xb, batch_sh),
                jax.device_put(yb, batch_sh))
    return p['tx'], s['tx']

  params, state = run(params, state, xb)
  before = to_numpy(params)
  params, state = run(params, state, bad_x)
  for u, v in zip(jax.tree.leaves(before), jax.tree.leaves(to_numpy(params)),
                  strict=True):
    if not np.array_equal(u, v):
      raise AssertionError('params changed on a NaN step')
  if int(state.notfinite_count) != 1:
    raise AssertionError(f'notfinite_count {state.notfinite_count}')
  params, state = run(params, state, xb)
  if rel_err(params, before) < 1e-4 or int(state.notfinite_count) != 0:
    raise AssertionError('the next finite step did not apply')
  return ('NaN in the last device\'s data shard (FSDP params): step skipped, '
          'params bitwise unchanged; next finite step applies')


# ------------------------------------------------------------- shard_map ---


SHARD_MAP_SIZES = (8, 16, 8)  # small: compiling, not running, is the cost
CONTROL = 'fromage_p_bound'  # also run without axis_name, as a control


def random_tree(key, params, steps):
  """`steps` random gradients like `params`, stacked on a leading axis."""
  leaves, treedef = jax.tree.flatten(params)
  keys = jax.random.split(key, len(leaves))
  return treedef.unflatten([
      np.asarray(jax.random.normal(k, (steps,) + np.shape(a)))
      for k, a in zip(keys, leaves, strict=True)
  ])


def transforms(axis_name):
  """Every transform to check, built with the given axis_name."""
  an = axis_name
  return {
      'fromage': fromage_jax.fromage(0.1, axis_name=an),
      'fromage_p_bound': fromage_jax.fromage(0.1, p_bound=1.01, axis_name=an),
      'scale_by_frobenius_ratio': optax.chain(
          fromage_jax.scale_by_frobenius_ratio(axis_name=an),
          optax.scale(-0.1)),
      # Clips hard: every step pulls each layer back onto 1.01 * ||W0||.
      'norm_clip_to_init': optax.chain(
          optax.scale(-1.0), fromage_jax.norm_clip_to_init(1.01, axis_name=an)),
      'chain_of_the_three': optax.chain(
          fromage_jax.scale_by_frobenius_ratio(axis_name=an),
          optax.scale_by_learning_rate(0.1),
          fromage_jax.prefactor_correction(0.1),
          fromage_jax.norm_clip_to_init(1.01, axis_name=an)),
  }


def run_all(txs, params, grads):
  """For every transform: init, then one update per gradient in `grads`
  (stacked on a leading axis). Returns {name: final params}."""
  out = {}
  for k, tx in txs.items():
    def body(carry, g, tx=tx):
      p, state = carry
      updates, state = tx.update(g, state, p)
      return (optax.apply_updates(p, updates), state), None
    (out[k], _), _ = lax.scan(body, (params, tx.init(params)), grads)
  return out


def run_shard_map(txs, params, grads, mesh, specs, put=default_put):
  grad_specs = jax.tree.map(lambda s: P(None, *s), specs)
  f = jax.jit(jax.shard_map(
      functools.partial(run_all, txs), mesh=mesh,
      in_specs=(specs, grad_specs), out_specs={k: specs for k in txs},
  ))
  sh = jax.tree.map(lambda s: NamedSharding(mesh, s), specs)
  grad_sh = jax.tree.map(lambda s: NamedSharding(mesh, s), grad_specs)
  return f(put(params, sh), put(grads, grad_sh))


def shard_map_cases(params, mesh, specs, txs, steps=3, seed=0):
  """Rel err vs unsharded of each of `txs` (name -> the transform built with
  an axis_name; its unsharded twin is `transforms(None)[first word]`), and of
  the CONTROL transform run in shard_map without axis_name."""
  grads = random_tree(jax.random.key(seed), params, steps)
  needed = {k.split()[0] for k in txs} | {CONTROL}
  plain = {k: v for k, v in transforms(None).items() if k in needed}
  ref = to_numpy(jax.jit(functools.partial(run_all, plain))(params, grads))
  out = to_numpy(run_shard_map(txs, params, grads, mesh, specs))
  naive = to_numpy(run_shard_map({CONTROL: plain[CONTROL]}, params, grads,
                                 mesh, specs))
  errs = {k: rel_err(out[k], ref[k.split()[0]]) for k in txs}
  details = []
  for k, err in errs.items():
    if not err <= RTOL:
      raise AssertionError(f'{k}: rel err {err:.3g} vs unsharded')
    details.append(f'{k} {err:.0e}')
  # Without axis_name each shard uses its local norms: a different result.
  control = rel_err(naive[CONTROL], ref[CONTROL])
  if not control > 1e-3:
    raise AssertionError(f'control without axis_name matched ({control:.3g})')
  return ', '.join(details) + f'; control {CONTROL} without axis_name {control:.0e}'


def check_shard_map_sharded(name):
  mesh = Mesh(np.array(jax.devices()), ('x',))
  params = to_numpy(init_mlp(jax.random.key(5), SHARD_MAP_SIZES))
  specs = jax.tree_util.tree_map_with_path(
      functools.partial(fsdp_spec, axis='x'), params)
  return ('every leaf split 4 ways, axis_name="x"; rel err vs unsharded: '
          + shard_map_cases(params, mesh, specs, transforms('x')))


def check_shard_map_mixed_prefix(name):
  """Hidden layers split over 'x'; the head replicated (axis_name None)."""
  mesh = Mesh(np.array(jax.devices()), ('x',))
  layers = to_numpy(init_mlp(jax.random.key(6), (8, 16, 10)))
  params = {'hidden': layers[:-1], 'head': layers[-1]}
  specs = {
      'hidden': jax.tree_util.tree_map_with_path(
          functools.partial(fsdp_spec, axis='x'), layers[:-1]),
      'head': {'w': P(), 'b': P()},
  }

  def by_callable(p):
    return {'hidden': jax.tree.map(lambda _: 'x', p['hidden']),
            'head': jax.tree.map(lambda _: None, p['head'])}

  txs = {f'{k} prefix': v
         for k, v in transforms({'hidden': 'x', 'head': None}).items()
         if k not in ('fromage', 'chain_of_the_three')}
  txs['fromage_p_bound callable'] = transforms(by_callable)['fromage_p_bound']
  return ('hidden layers split over "x", head (10 classes) replicated; '
          'axis_name {"hidden": "x", "head": None} or a callable: '
          + shard_map_cases(params, mesh, specs, txs))


def check_shard_map_2d_mesh(name):
  """A 2x2 mesh: kernels split over both axes, axis_name=('a', 'b')."""
  mesh = Mesh(np.array(jax.devices()).reshape(2, 2), ('a', 'b'))
  params = to_numpy(init_mlp(jax.random.key(7), SHARD_MAP_SIZES))
  # Kernels: rows over 'a', columns over 'b'; biases over 'a' only (so
  # replicated over 'b'), which needs the per-leaf names of a pytree prefix.
  specs = jax.tree.map(
      lambda a: P('a', 'b') if np.ndim(a) == 2 else P('a'), params)
  # Per leaf (a pytree prefix): kernels ('a', 'b'), biases 'a'. Naming 'b'
  # for a bias, replicated over it, is an error under shard_map's check_vma.
  names = [{'w': ('a', 'b'), 'b': 'a'} for _ in params]
  per_leaf = shard_map_cases(params, mesh, specs, {
      k: v for k, v in transforms(names).items()
      if k in ('fromage_p_bound', 'chain_of_the_three')})
  # One tuple for the whole tree: a kernel alone, split over both axes.
  kernel = {'w': params[0]['w']}
  one_tuple = shard_map_cases(
      kernel, mesh, {'w': P('a', 'b')},
      {'fromage_p_bound': transforms(('a', 'b'))['fromage_p_bound']})
  return ('mesh 2x2 ("a", "b"), kernels P("a", "b"), biases P("a"), '
          'axis_name [{"w": ("a", "b"), "b": "a"}, ...]: ' + per_leaf
          + '; a kernel alone, axis_name ("a", "b"): ' + one_tuple)


CHECKS = {
    'pmap': check_pmap,
    'pmap_apply_if_finite': check_pmap_apply_if_finite,
    'jit_data_parallel': check_jit_data_parallel,
    'jit_fsdp': check_jit_fsdp,
    'jit_apply_if_finite': check_jit_apply_if_finite,
    'shard_map_sharded': check_shard_map_sharded,
    'shard_map_mixed_prefix': check_shard_map_mixed_prefix,
    'shard_map_2d_mesh': check_shard_map_2d_mesh,
}


# ----------------------------------------------------------- multi-host ---


def worker(process_id: int, num_processes: int, port: int) -> int:
  """One process of a multi-process (multi-host) run on localhost.

  The same jit + NamedSharding training code as the single-process checks,
  on a mesh spanning every process's devices, and a `shard_map` whose psums
  cross processes; each process computes the reference on one local device.
  """
  # Gloo does CPU collectives across processes (jax 0.10's default; set
  # explicitly so that a default of 'none' cannot silently change the test).
  jax.config.update('jax_cpu_collectives_implementation', 'gloo')
  jax.distributed.initialize(
      f'127.0.0.1:{port}', num_processes=num_processes,
      process_id=process_id, initialization_timeout=60,
  )
  from jax.experimental import multihost_utils

  tag = f'[process {process_id}/{num_processes}]'

  def put(tree, sharding):
    # Every process holds the whole (identical) host value; each of its
    # devices gets the slice it owns.
    def one(a, s):
      a = np.asarray(a)
      return jax.make_array_from_callback(a.shape, s, lambda idx: a[idx])
    if isinstance(sharding, NamedSharding):
      return jax.tree.map(lambda a: one(a, sharding), tree)
    return jax.tree.map(one, tree, sharding)

  def gather(tree):
    return jax.tree.map(
        lambda a: np.asarray(multihost_utils.process_allgather(a, tiled=True)),
        tree)

  def fsdp():
    mesh = Mesh(np.array(jax.devices()), ('data',))
    params0, _, _, ref = reference(seed=8, steps=10)
    specs = jax.tree_util.tree_map_with_path(fsdp_spec, params0)
    out, _, _ = train_jit(mesh, specs, seed=8, steps=10, put=put)
    return compare_to_reference(gather(out), ref, params0)

  def shard_map_psum():
    mesh = Mesh(np.array(jax.devices()), ('x',))
    params = to_numpy(init_mlp(jax.random.key(9)))
    specs = jax.tree_util.tree_map_with_path(
        functools.partial(fsdp_spec, axis='x'), params)
    grads = random_tree(jax.random.key(9), params, 2)
    txs = {k: v for k, v in transforms('x').items()
           if k == 'fromage_p_bound'}
    ref = to_numpy(jax.jit(functools.partial(run_all, {
        k: transforms(None)[k] for k in txs}))(params, grads))
    out = gather(run_shard_map(txs, params, grads, mesh, specs, put=put))
    errs = {k: assert_close(out[k], ref[k], k) for k in txs}
    return ', '.join(f'{k} rel err {e:.1e}' for k, e in errs.items())

  failures = 0
  try:
    print(f'{tag} devices {jax.device_count()} (local '
          f'{jax.local_device_count()})', flush=True)
    # (Replicated params are the in-process jit_data_parallel check; here
    # the batch is split too, and kernels are split across processes.)
    for label, check in (('multihost_jit_fsdp', fsdp),
                         ('multihost_shard_map', shard_map_psum)):
      try:
        print(f'{tag} CHECK {label}: PASS {check()}', flush=True)
      except Exception:  # reported and counted
        failures += 1
        print(f'{tag} CHECK {label}: FAIL\n{traceback.format_exc()}',
              flush=True)
  finally:
    jax.distributed.shutdown()
  return failures


# ------------------------------------------------------------------ main ---


def main(argv) -> int:
  if argv[:1] == ['--worker']:
    return worker(int(argv[1]), int(argv[2]), int(argv[3]))
  if jax.device_count() != N_DEVICES:
    print(f'CHECK setup: FAIL need {N_DEVICES} devices, have '
          f'{jax.device_count()}; set XLA_FLAGS='
          f'--xla_force_host_platform_device_count={N_DEVICES}', flush=True)
    return 1
  names = argv or list(CHECKS)
  failures = 0
  for name in names:
    start = time.perf_counter()
    try:
      details = CHECKS[name](name)
      print(f'CHECK {name}: PASS {details} '
            f'[{time.perf_counter() - start:.1f}s]', flush=True)
    except Exception:  # reported and counted
      failures += 1
      print(f'CHECK {name}: FAIL\n{traceback.format_exc()}', flush=True)
  return failures


if __name__ == '__main__':
  sys.exit(main(sys.argv[1:]))
