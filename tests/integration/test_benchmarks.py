"""The benchmark scripts run, on the CPU, in their quick forms."""

import math
import os
import pathlib
import re
import subprocess
import sys

ROOT = pathlib.Path(__file__).resolve().parents[1]


def run_module(*args, timeout=600):
  env = dict(os.environ, JAX_PLATFORMS='cpu')
  return subprocess.run(
      [sys.executable, '-m', *args], cwd=ROOT, env=env, capture_output=True,
      text=True, timeout=timeout, check=False,
  )


def test_gpu_script_runs_on_cpu_and_checks_against_reference(tmp_path):
  out = tmp_path / 'gpu.md'
  proc = run_module('benchmarks.gpu.run', '--cpu', '--quick', '--out',
                    str(out), '--hlo', str(tmp_path / 'hlo'), '--profile',
                    str(tmp_path / 'profile'))
  assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
  assert 'fusion' in (tmp_path / 'hlo' / 'fromage.hlo.txt').read_text()
  assert list((tmp_path / 'profile').rglob('*.xplane.pb'))
  md = out.read_text()
  assert 'FAILED' not in md
  assert md.count('| ok |') == 4
  assert 'Device-to-device copy' in md and 'CPU' in md
  assert '`fromage_jax.fromage(p_bound)`' in md
  assert '## Bandwidth: GPT-2 small, scanned blocks' in md
  assert '16 leaves (148 layers)' in md


def test_step_time_benchmark_quick(tmp_path):
  out = tmp_path / 'step_time.md'
  proc = run_module('benchmarks.step_time', '--scale', '0.001', '--rounds',
                    '2', '--trees', 'ResNet-50',
                    'GPT-2 small, scanned blocks', '--no-lm',
                    '--compile-repeats', '2', '--out', str(out))
  assert proc.returncode == 0, proc.stderr[-3000:]
  md = out.read_text()
  for name in ('optax.sgd', 'optax.adam', 'optax.lars', 'optax.fromage',
               'fromage_jax.fromage', 'fromage_jax.fromage(p_bound)'):
    assert f'| `{name}` |' in md
  # One norm per layer with p_bound, nothing but a count without.
  assert '| `fromage_jax.fromage` |' in md
  row = next(ln for ln in md.splitlines()
             if ln.startswith('| `fromage_jax.fromage(p_bound)` |'))
  cells = [c.strip() for c in row.split('|')]
  assert cells[9] == '4.0'
  # Ratios are medians of per-round ratios, with their quartiles.
  median, q1, q3 = map(float, re.fullmatch(
      r'(\S+) \((\S+)–(\S+)\)', cells[3]).groups())
  assert 0 < q1 <= median <= q3
  sgd = next(ln for ln in md.splitlines() if ln.startswith('| `optax.sgd` |'))
  assert sgd.split('|')[3].strip() == '1.00 (1.00–1.00)'
  assert 'Compile time is the fastest of 2 compiles' in md
  assert 'makes 3 steps of every optimizer in a row' in md
  # Stacked blocks: state is still one norm per layer (148), not per leaf.
  scanned = md[md.index('## GPT-2 small, scanned blocks'):]
  assert '16 leaves (148 layers)' in scanned
  row = next(ln for ln in scanned.splitlines()
             if ln.startswith('| `fromage_jax.fromage(p_bound)` |'))
  assert [c.strip() for c in row.split('|')][8:10] == ['596', '4.0']
  assert '`fromage_jax.fromage` with `p_bound` takes' in md
  # The floor of a two-pass step, from the norms pass timed alongside.
  assert 'A pass of plain `jnp.sum`s that only reads every `W` and `g`' in md


def test_many_small_leaves_repeat_few_shapes():
  """The 2,000-leaf tree compiles on a small CPU because its shapes repeat."""
  from benchmarks import step_time

  shapes = step_time.TREES['2,000 small leaves']()
  assert len(shapes) == 2000
  assert len(set(shapes.values())) == 34
  assert all(16 <= math.prod(s) <= 4096 for s in shapes.values())


def test_paired_ratio_takes_ratios_within_rounds():
  from benchmarks import step_time

  # The machine slows down 10x between rounds; within each the ratio is 2.
  median, q1, q3 = step_time.paired_ratio([2, 20, 200, 2000], [1, 10, 100, 1000])
  assert median == q1 == q3 == 2
  median, q1, q3 = step_time.paired_ratio([1, 2, 3, 4, 5], [1, 1, 1, 1, 1])
  assert (median, q1, q3) == (3, 2, 4)


def test_step_loop_makes_every_step():
  """`compile_step(loop=k)` is k steps, none skipped or hoisted."""
  import jax
  import jax.numpy as jnp
  import numpy as np
  import optax

  from benchmarks import step_time
  import fromage_jax

  params, grads = step_time.materialise({'w': (8, 16), 'b': (16,)}, seed=0)
  for tx in (optax.sgd(0.1), fromage_jax.fromage(0.1)):
    compiled, _ = step_time.compile_step(tx, params, tx.init(params), grads,
                                         loop=3)
    got, _ = compiled(jax.tree.map(jnp.copy, params), tx.init(params), grads)
    want, state = params, tx.init(params)
    for i in range(3):
      scaled = jax.tree.map(lambda g, i=i: g * (1 + 1e-7 * i), grads)
      updates, state = tx.update(scaled, state, want)
      want = optax.apply_updates(want, updates)
    for k in params:
      np.testing.assert_allclose(got[k], want[k], rtol=1e-5, atol=1e-7)
      assert not np.allclose(want[k], params[k], rtol=1e-3)
