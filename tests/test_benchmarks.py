"""The benchmark scripts run, on the CPU, in their quick forms."""

import os
import pathlib
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
                    str(out))
  assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
  md = out.read_text()
  assert 'FAILED' not in md
  assert md.count('| ok |') == 4
  assert 'Device-to-device copy' in md and 'CPU' in md
  assert '`fromage_jax.fromage(p_bound)`' in md


def test_step_time_benchmark_quick(tmp_path):
  out = tmp_path / 'step_time.md'
  proc = run_module('benchmarks.step_time', '--scale', '0.001', '--rounds',
                    '2', '--trees', 'ResNet-50', '--no-lm', '--out', str(out))
  assert proc.returncode == 0, proc.stderr[-3000:]
  md = out.read_text()
  for name in ('optax.sgd', 'optax.adam', 'optax.lars', 'optax.fromage',
               'fromage_jax.fromage', 'fromage_jax.fromage(p_bound)'):
    assert f'| `{name}` |' in md
  # One norm per layer with p_bound, nothing but a count without.
  assert '| `fromage_jax.fromage` |' in md
  row = next(ln for ln in md.splitlines()
             if ln.startswith('| `fromage_jax.fromage(p_bound)` |'))
  assert row.split('|')[7].strip() == '4.0'
