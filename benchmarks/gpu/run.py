"""fromage_jax on a GPU: correctness against float64, then speed and bandwidth.

1. Checks fromage_jax.fromage on the device against the float64 NumPy
   reference (fromage_jax.testing) over several steps of random trees: float32,
   bfloat16, zero-initialised and zero-gradient leaves, stacked layers and
   `p_bound`.
2. Times the same benchmarks as benchmarks/step_time.py, plus the chain of the
   public transforms, with ten steps in one call (a `fori_loop`), so that the
   figures are the device's and not Python's dispatch. On the GPT-2-like
   trees (148 leaves, or 16 with the blocks stacked) it also times a copy-like
   pass and reports each step's achieved bandwidth (Fromage: 5 passes over the
   params' bytes: read W and g for the norms, then read W and g and write W)
   as a fraction of the copy's.

    python -m benchmarks.gpu.run [--quick] [--cpu] [--out PATH]
        [--trees NAME ...] [--hlo DIR] [--profile DIR]

Writes the run's JSON beside the page `--out` and renders its tables into
that page, both after each tree, so a run cut short keeps what it measured. `--hlo` and `--profile` save the compiled HLO and a jax.profiler
trace of the GPT-2-like step. `--cpu` runs everything on the CPU (a test
does, with `--quick`)."""

import argparse
import os
import pathlib
import statistics
import sys
import time

if '--cpu' in sys.argv:  # must be set before jax starts
  os.environ['JAX_PLATFORMS'] = 'cpu'

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
import numpy as np  # noqa: E402
import optax  # noqa: E402

from benchmarks import common  # noqa: E402
from benchmarks import lm_step  # noqa: E402
from benchmarks import render  # noqa: E402
from benchmarks import step_time  # noqa: E402
from benchmarks import timing  # noqa: E402
from benchmarks import trees as zoo  # noqa: E402
import fromage_jax  # noqa: E402
from fromage_jax import testing  # noqa: E402

TITLE = 'fromage_jax on an accelerator'


def check_against_reference(steps: int = 5) -> dict:
  """Per case, the max relative error of device steps against float64 NumPy
  (`error`) and the `tolerance` it must stay within."""
  rng = np.random.default_rng(0)
  checks = {}
  cases = {
      'float32': (jnp.float32, None, None, 1e-5),
      'float32, p_bound=1.05': (jnp.float32, 1.05, None, 1e-5),
      'float32, stacked layer_axes': (jnp.float32, None, {'stack': (0,)},
                                      1e-5),
      'bfloat16': (jnp.bfloat16, None, None, 2e-2),
  }
  for case, (dtype, p_bound, layer_axes, tol) in cases.items():
    params = {
        'w': rng.standard_normal((256, 512)), 'b': np.zeros(512),
        'frozen': rng.standard_normal((64,)),
        'stack': rng.standard_normal((4, 64, 64)) * np.array(
            [1, 10, 0.1, 3])[:, None, None],
    }
    full_axes = {'w': None, 'b': None, 'frozen': None, 'stack': None}
    if layer_axes:
      full_axes.update(layer_axes)
    tx = fromage_jax.fromage(0.05, p_bound=p_bound, layer_axes=full_axes)
    dev = jax.tree.map(lambda x, dtype=dtype: jnp.asarray(x, dtype), params)
    ref = jax.tree.map(lambda x: np.asarray(jnp.asarray(x, jnp.float32),
                                            np.float64), dev)
    init_norms = testing.layer_norms(ref, full_axes)
    state = tx.init(dev)
    update = jax.jit(tx.update)
    worst = 0.0
    for _ in range(steps):
      grads = jax.tree.map(lambda x: rng.standard_normal(x.shape), params)
      grads['frozen'] = np.zeros_like(grads['frozen'])
      dev_grads = jax.tree.map(lambda x, dtype=dtype: jnp.asarray(x, dtype),
                               grads)
      updates, state = update(dev_grads, state, dev)
      dev = optax.apply_updates(dev, updates)
      ref = testing.fromage_step(
          ref, jax.tree.map(lambda x: np.asarray(x, np.float64), dev_grads),
          0.05, p_bound=p_bound, init_norms=init_norms, layer_axes=full_axes)
      for k in ref:
        got = np.asarray(jnp.asarray(dev[k], jnp.float32), np.float64)
        scale = max(np.abs(ref[k]).max(), 1e-30)
        worst = max(worst, float(np.abs(got - ref[k]).max() / scale))
      # Continue both from the device's params, so errors don't compound.
      ref = jax.tree.map(lambda x: np.asarray(jnp.asarray(x, jnp.float32),
                                              np.float64), dev)
    checks[case] = dict(error=worst, tolerance=tol)
  return checks


def copy_bandwidth(n_bytes: int, rounds: int, loop: int) -> float:
  """Bytes per second of a device-to-device copy (read + write).

  One call makes `loop` copies in a `fori_loop`, as the steps are timed. Each
  scales by a loop-varying factor near 1, so that XLA can neither skip nor
  hoist it: a pass that reads and writes the array, as a copy does.
  """
  def copies(x):
    return jax.lax.fori_loop(
        0, loop, lambda i, y: y * (1 + 1e-7 * i.astype(y.dtype)), x)
  x = jnp.ones((n_bytes // 4,), jnp.float32)
  copy = jax.jit(copies, donate_argnums=0)
  x = jax.block_until_ready(copy(x))
  times = []
  for _ in range(rounds):
    start = time.perf_counter()
    x = jax.block_until_ready(copy(x))
    times.append((time.perf_counter() - start) / loop)
  return 2 * x.nbytes / float(np.median(times))


# Minimum traffic per step, in passes over the params' bytes. Adam reads
# params, gradients and both moments and writes three of them.
PASSES = {'optax.sgd': 3, 'optax.adam': 7, 'fromage_jax.fromage': 5,
          'fromage_jax.fromage(p_bound)': 5, 'optax.fromage': 5,
          timing.CHAIN: 5}


def tables(data: dict) -> list:
  checks = render.Table(
      ['case', 'max relative error', 'tolerance', 'within'],
      [[case, f'{c["error"]:.2e}', f'{c["tolerance"]:.0e}',
        'ok' if c['error'] <= c['tolerance'] else 'FAILED']
       for case, c in data['checks'].items()],
      title='Against the float64 NumPy reference')
  out = [checks]
  copy_bps = data['copy_bps']
  for name, tree in data['trees'].items():
    if name.startswith('GPT-2'):  # the trees with the plan's 80% target
      traffic = tree['param_bytes']
      rows = []
      for opt, n in PASSES.items():
        step_s = statistics.median(tree['optimizers'][opt]['times'])
        bps = n * traffic / step_s
        rows.append([f'`{opt}`', f'{step_s * 1e3:.3f}',
                     f'{n * traffic / 1e6:.0f}', f'{bps / 1e9:.1f}',
                     f'{bps / copy_bps:.0%}'])
      out.append(render.Table(
          ['optimizer', 'step (ms)', 'modelled traffic (MB)', 'achieved GB/s',
           'of copy'], rows, title=f'Bandwidth: {name}',
          note=f'Device-to-device copy of {traffic / 1e6:.0f} MB: '
          f'{copy_bps / 1e9:.1f} GB/s (read + write).'))
  out += [t for name, tree in data['trees'].items()
          for t in step_time.tree_tables(name, tree, kernels=True)]
  return out + ([step_time.lm_table(data['lm'])] if data['lm'] else [])


def main(argv=None) -> int:
  parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  parser.add_argument('--quick', action='store_true',
                      help='small trees and few rounds')
  parser.add_argument('--cpu', action='store_true', help='run on the CPU')
  parser.add_argument('--out', default=str(common.RESULTS_DIR / 'gpu.md'),
                      help='the results page, its JSON beside it, both '
                      'rewritten after each tree (default '
                      'benchmarks/results/gpu.md)')
  parser.add_argument('--trees', nargs='*', default=list(zoo.TREES),
                      choices=list(zoo.TREES),
                      help='trees to time, in order')
  parser.add_argument('--hlo', default=None,
                      help='directory for the compiled HLO of the GPT-2-like '
                      'step of each fromage_jax optimizer')
  parser.add_argument('--profile', default=None,
                      help='directory for a jax.profiler trace of the fused '
                      'step on the GPT-2-like tree')
  args = parser.parse_args(argv)
  # Steps in one call (`loop`): the device's time, without the host's
  # dispatch.
  config = (dict(rounds=3, scale=0.002, loop=2, check_steps=2) if args.quick
            else dict(rounds=20, scale=1.0, loop=10, check_steps=5))
  # --quick (a test) times the GPT-2-like trees alone: compiling the others
  # takes minutes on a small CPU.
  config['trees'] = [t for t in zoo.TREES if t.startswith('GPT-2')
                     ] if args.quick else args.trees
  out = pathlib.Path(args.out)
  start = time.perf_counter()
  data = dict(checks=check_against_reference(config['check_steps']),
              copy_bps=None, trees={}, lm=None)

  def save():
    data.update(common.run_info('benchmarks.gpu.run',
                                'quick' if args.quick else 'full',
                                time.perf_counter() - start, config))
    return render.save(data, out.with_suffix('.json'), out)

  for tree in config['trees']:
    print(f'timing {tree} ...', flush=True)
    shapes = zoo.TREES[tree](config['scale'])
    layer_axes = zoo.LAYER_AXES.get(tree)
    data['trees'][tree] = timing.bench_tree(
        shapes, config['rounds'], loop=config['loop'], layer_axes=layer_axes,
        extra={timing.CHAIN: timing.public_chain(0.01,
                                                 layer_axes=layer_axes)})
    if data['copy_bps'] is None and tree.startswith('GPT-2'):
      data['copy_bps'] = copy_bandwidth(data['trees'][tree]['param_bytes'],
                                        config['rounds'], config['loop'])
    if tree == 'GPT-2 small':
      if args.hlo:
        dump_hlo(shapes, args.hlo)
      if args.profile:
        profile(shapes, args.profile, config['loop'])
      if not args.quick:
        print('timing the transformer LM ...', flush=True)
        data['lm'] = lm_step.bench_lm(config['rounds'], loop=config['loop'])
    save()
  print(save().read_text())
  failed = [c for c in data['checks'].values()
            if not c['error'] <= c['tolerance']]
  return 1 if failed else 0


def profile(shapes, directory: str, loop: int) -> None:
  """A jax.profiler trace of three calls of the fused step (`loop` each)."""
  params, grads = zoo.materialise(shapes, seed=0)
  tx = fromage_jax.fromage(0.01)
  state = tx.init(params)
  compiled, _ = timing.compile_step(tx, params, state, grads, loop)
  params, state = jax.block_until_ready(compiled(params, state, grads))
  with jax.profiler.trace(directory):
    for _ in range(3):
      params, state = jax.block_until_ready(compiled(params, state, grads))


def dump_hlo(shapes, directory: str) -> None:
  """Writes the optimised HLO of each fromage_jax step, for reading later."""
  os.makedirs(directory, exist_ok=True)
  params, grads = zoo.materialise(shapes, seed=0)
  for name, tx in {'fromage': fromage_jax.fromage(0.01),
                   'fromage_p_bound': fromage_jax.fromage(0.01, p_bound=2.0),
                   'sgd': optax.sgd(0.01)}.items():
    compiled, _ = timing.compile_step(tx, params, tx.init(params), grads)
    with open(os.path.join(directory, f'{name}.hlo.txt'), 'w') as f:
      f.write(compiled.as_text())


if __name__ == '__main__':
  sys.exit(main())
