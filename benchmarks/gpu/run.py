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

The Markdown is rewritten after each tree, so a run cut short keeps what it
measured. `--hlo` and `--profile` save the compiled HLO and a jax.profiler
trace of the GPT-2-like step. `--cpu` runs everything on the CPU (a test
does, with `--quick`)."""

import argparse
import os
import sys
import time

if '--cpu' in sys.argv:  # must be set before jax starts
  os.environ['JAX_PLATFORMS'] = 'cpu'

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
import numpy as np  # noqa: E402
import optax  # noqa: E402

from benchmarks import step_time  # noqa: E402
import fromage_jax  # noqa: E402
from fromage_jax import testing  # noqa: E402


def check_against_reference(steps: int = 5) -> list[str]:
  """Max relative error per case of device steps against float64 NumPy."""
  rng = np.random.default_rng(0)
  rows = []
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
    status = 'ok' if worst <= tol else 'FAILED'
    rows.append(f'| {case} | {worst:.2e} | {tol:.0e} | {status} |')
  return rows


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


CHAIN = step_time.CHAIN


def bandwidth_table(rows: dict, copy_bps: float) -> list[str]:
  """Achieved bandwidth of the GPT-2-like step, against the copy's."""
  param_bytes = rows['_tree']['param_bytes']
  lines = [
      f'Device-to-device copy of {param_bytes / 1e6:.0f} MB: '
      f'{copy_bps / 1e9:.1f} GB/s (read + write).',
      '',
      '| optimizer | step (ms) | modelled traffic (MB) | achieved GB/s '
      '| of copy |',
      '| --- | ---: | ---: | ---: | ---: |',
  ]
  # Minimum traffic per step, in passes over the params' bytes.
  # Adam reads params, gradients and both moments and writes three of them.
  passes = {'optax.sgd': 3, 'optax.adam': 7, 'fromage_jax.fromage': 5,
            'fromage_jax.fromage(p_bound)': 5, 'optax.fromage': 5,
            CHAIN: 5}
  for name, n in passes.items():
    r = rows[name]
    bps = n * param_bytes / r['step_s']
    lines.append(f'| `{name}` | {r["step_s"] * 1e3:.3f} '
                 f'| {n * param_bytes / 1e6:.0f} | {bps / 1e9:.1f} '
                 f'| {bps / copy_bps:.0%} |')
  return lines


def main(argv=None) -> int:
  parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  parser.add_argument('--quick', action='store_true',
                      help='small trees and few rounds')
  parser.add_argument('--cpu', action='store_true', help='run on the CPU')
  parser.add_argument('--out', default=None,
                      help='Markdown results file, rewritten after each tree')
  parser.add_argument('--trees', nargs='*', default=list(step_time.TREES),
                      choices=list(step_time.TREES),
                      help='trees to time, in order')
  parser.add_argument('--hlo', default=None,
                      help='directory for the compiled HLO of the GPT-2-like '
                      'step of each fromage_jax optimizer')
  parser.add_argument('--profile', default=None,
                      help='directory for a jax.profiler trace of the fused '
                      'step on the GPT-2-like tree')
  args = parser.parse_args(argv)
  rounds = 3 if args.quick else 20
  scale = 0.002 if args.quick else 1.0
  # Steps in one call: the device's time, without the host's dispatch.
  loop = 2 if args.quick else 10
  start = time.perf_counter()

  checks = check_against_reference(steps=2 if args.quick else 5)
  header = [
      '# fromage_jax on an accelerator',
      '',
      f'Device: {step_time.machine()}; jax {jax.__version__}.',
      '',
      '## Against the float64 NumPy reference',
      '',
      '| case | max relative error | tolerance | |',
      '| --- | ---: | ---: | --- |',
      *checks,
  ]
  # --quick (a test) times the GPT-2-like trees alone: compiling the others
  # takes minutes on a small CPU.
  trees = [t for t in step_time.TREES if t.startswith('GPT-2')
           ] if args.quick else args.trees
  results, copy_bps, lm = {}, None, None

  def write():
    md = '\n'.join(header)
    for tree in results:
      if tree.startswith('GPT-2'):  # the trees with the plan's 80% target
        md += f'\n\n## Bandwidth: {tree}\n\n' + '\n'.join(
            bandwidth_table(results[tree], copy_bps))
    md += '\n\n' + step_time.markdown(
        results, rounds, time.perf_counter() - start, loop=loop,
        kernels=True)
    if lm is not None:
      md += step_time.markdown_lm(lm)
    if args.out:
      os.makedirs(os.path.dirname(args.out) or '.', exist_ok=True)
      with open(args.out, 'w') as f:
        f.write(md)
    return md

  for tree in trees:
    print(f'timing {tree} ...', flush=True)
    shapes = step_time.TREES[tree](scale)
    layer_axes = step_time.LAYER_AXES.get(tree)
    results[tree] = step_time.bench_tree(
        shapes, rounds, loop=loop, layer_axes=layer_axes,
        extra={CHAIN: step_time.public_chain(0.01, layer_axes=layer_axes)})
    if copy_bps is None and tree.startswith('GPT-2'):
      copy_bps = copy_bandwidth(results[tree]['_tree']['param_bytes'],
                                rounds, loop)
    if tree == 'GPT-2 small':
      if args.hlo:
        dump_hlo(shapes, args.hlo)
      if args.profile:
        profile(shapes, args.profile, loop)
      if not args.quick:
        print('timing the transformer LM ...', flush=True)
        lm = step_time.bench_lm(rounds, loop=loop)
    write()
  print(write())
  return 0 if all('FAILED' not in row for row in checks) else 1


def profile(shapes, directory: str, loop: int) -> None:
  """A jax.profiler trace of three calls of the fused step (`loop` each)."""
  params, grads = step_time.materialise(shapes, seed=0)
  tx = fromage_jax.fromage(0.01)
  state = tx.init(params)
  compiled, _ = step_time.compile_step(tx, params, state, grads, loop)
  params, state = jax.block_until_ready(compiled(params, state, grads))
  with jax.profiler.trace(directory):
    for _ in range(3):
      params, state = jax.block_until_ready(compiled(params, state, grads))


def dump_hlo(shapes, directory: str) -> None:
  """Writes the optimised HLO of each fromage_jax step, for reading later."""
  os.makedirs(directory, exist_ok=True)
  params, grads = step_time.materialise(shapes, seed=0)
  for name, tx in {'fromage': fromage_jax.fromage(0.01),
                   'fromage_p_bound': fromage_jax.fromage(0.01, p_bound=2.0),
                   'sgd': optax.sgd(0.01)}.items():
    compiled, _ = step_time.compile_step(tx, params, tx.init(params), grads)
    with open(os.path.join(directory, f'{name}.hlo.txt'), 'w') as f:
      f.write(compiled.as_text())


if __name__ == '__main__':
  sys.exit(main())
