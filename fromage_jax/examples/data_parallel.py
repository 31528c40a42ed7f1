"""Data-parallel Fromage: an MLP on scikit-learn's digits over several devices.

Uses today's recommended path, `jax.jit` with a `jax.sharding.Mesh` and
`NamedSharding`: each batch is split along the mesh's 'data' axis, params and
optimizer state are replicated, and XLA inserts the gradient all-reduce. The
code is the same for one device, several GPUs or TPU cores, or (here, so that
it runs anywhere) several CPU devices forced with
`XLA_FLAGS=--xla_force_host_platform_device_count=N`.

    python -m fromage_jax.examples.data_parallel [--devices 4] [--quick]
"""

import os
import sys

if __name__ == '__main__':
  # XLA reads XLA_FLAGS once, when JAX creates its CPU backend (at the first
  # jax.devices() or computation, not at `import jax`), so it must be set
  # before then and cannot be changed afterwards. As a script we set it
  # ourselves unless the caller did; imported, we leave the process alone
  # and use whatever devices it has.
  if 'XLA_FLAGS' not in os.environ:
    _n = '4'
    for _i, _a in enumerate(sys.argv):
      if _a == '--devices' and _i + 1 < len(sys.argv):
        _n = sys.argv[_i + 1]
      elif _a.startswith('--devices='):
        _n = _a.split('=', 1)[1]
    os.environ['XLA_FLAGS'] = f'--xla_force_host_platform_device_count={_n}'

import time  # noqa: E402

import jax  # noqa: E402
from jax.sharding import Mesh  # noqa: E402
from jax.sharding import NamedSharding  # noqa: E402
from jax.sharding import PartitionSpec as P  # noqa: E402
import numpy as np  # noqa: E402
import optax  # noqa: E402

import fromage_jax  # noqa: E402
from fromage_jax.examples._common import accuracy  # noqa: E402
from fromage_jax.examples._common import argument_parser  # noqa: E402
from fromage_jax.examples._common import init_mlp  # noqa: E402
from fromage_jax.examples._common import load_digits  # noqa: E402
from fromage_jax.examples._common import loss_fn  # noqa: E402
from fromage_jax.examples._common import minibatches  # noqa: E402
from fromage_jax.examples._common import require  # noqa: E402


def make_train_step(tx, replicated, batch_sharding):
  """A jitted step; shardings pinned so params and state stay replicated.

  The loss is a mean over the global batch, so the gradient XLA computes from
  the sharded batch is already the all-reduced (averaged) one: no explicit
  `pmean` is needed, unlike with `pmap` or `shard_map`.
  """
  def step(params, opt_state, x, y):
    loss, grads = jax.value_and_grad(loss_fn)(params, x, y)
    updates, opt_state = tx.update(grads, opt_state, params)
    return optax.apply_updates(params, updates), opt_state, loss

  return jax.jit(
      step,
      in_shardings=(replicated, replicated, batch_sharding, batch_sharding),
      out_shardings=(replicated, replicated, replicated),
      donate_argnums=(0, 1),  # update params and state in place
  )


def main(argv=None) -> dict:
  parser = argument_parser('fromage_jax.examples.data_parallel', __doc__)
  parser.add_argument('--devices', type=int, default=4,
                      help='CPU devices to force when run as a script; '
                      'imported, the process keeps the devices it has')
  parser.add_argument('--epochs', type=int, default=40)
  parser.add_argument('--batch-size', type=int, default=128,
                      help='global batch, split across the devices')
  parser.add_argument('--hidden', type=int, default=256)
  parser.add_argument('--lr', type=float, default=0.01)
  parser.add_argument('--p-bound', type=float, default=None)
  parser.add_argument('--seed', type=int, default=0)
  parser.add_argument('--quick', action='store_true',
                      help='a few epochs of a small network (for tests)')
  args = parser.parse_args(argv)
  if args.quick:
    args.epochs, args.hidden = 8, 64
  tqdm = require('tqdm.auto').tqdm

  devices = jax.devices()
  mesh = Mesh(np.array(devices), ('data',))
  replicated = NamedSharding(mesh, P())
  batch_sharding = NamedSharding(mesh, P('data'))
  n = len(devices)
  if args.batch_size % n:
    parser.error(
        f'--batch-size {args.batch_size} must divide by the {n} devices'
    )

  x_tr, y_tr, x_te, y_te = load_digits(args.seed)
  params = init_mlp(jax.random.key(args.seed),
                    [x_tr.shape[1], args.hidden, args.hidden, 10])
  tx = fromage_jax.fromage(args.lr, p_bound=args.p_bound)
  params = jax.device_put(params, replicated)
  opt_state = jax.jit(tx.init, out_shardings=replicated)(params)
  step = make_train_step(tx, replicated, batch_sharding)

  rng = np.random.default_rng(args.seed)
  steps_per_epoch = len(x_tr) // args.batch_size
  print(f'{n} devices ({devices[0].platform}), global batch '
        f'{args.batch_size} = {n} x {args.batch_size // n}')
  start = time.perf_counter()
  loss = float('nan')
  with tqdm(total=args.epochs * steps_per_epoch, desc='training',
            unit='step') as bar:
    for epoch in range(args.epochs):
      for idx in minibatches(rng, len(x_tr), args.batch_size):
        x = jax.device_put(x_tr[idx], batch_sharding)
        y = jax.device_put(y_tr[idx], batch_sharding)
        params, opt_state, loss = step(params, opt_state, x, y)
        bar.update()
      bar.set_postfix_str(f'epoch {epoch + 1} loss {float(loss):.4f}')
  wall = time.perf_counter() - start
  results = dict(
      devices=n,
      train_acc=accuracy(params, x_tr, y_tr),
      test_acc=accuracy(params, x_te, y_te),
      loss=float(loss),
      wall=wall,
      param_sharding=str(jax.tree.leaves(params)[0].sharding.spec),
  )
  print(f'train accuracy {results["train_acc"]:.4f}, test accuracy '
        f'{results["test_acc"]:.4f} ({args.epochs} epochs on {n} devices, '
        f'{wall:.1f} s)')
  return results


if __name__ == '__main__':
  main()
