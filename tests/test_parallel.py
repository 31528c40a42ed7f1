"""Data parallelism and sharding on 4 forced CPU devices.

Forcing CPU devices (`XLA_FLAGS=--xla_force_host_platform_device_count=4`)
only works before JAX creates its backend, and pytest's process already has
one, so the checks live in `tests/multidevice_checks.py` and run in a
subprocess: once for all single-process checks (compiling is the cost, and
each check reports its own line), and twice more for the multi-process
(several hosts) check and the example.
"""

import functools
import os
import pathlib
import re
import socket
import subprocess
import sys

import pytest

ROOT = pathlib.Path(__file__).resolve().parent.parent
SCRIPT = ROOT / 'tests' / 'multidevice_checks.py'
CHECKS = (
    'pmap',
    'pmap_apply_if_finite',
    'jit_data_parallel',
    'jit_fsdp',
    'jit_apply_if_finite',
    'shard_map_sharded',
    'shard_map_mixed_prefix',
    'shard_map_2d_mesh',
)


def _env(devices: int) -> dict:
  env = dict(os.environ)
  env['XLA_FLAGS'] = f'--xla_force_host_platform_device_count={devices}'
  env['JAX_PLATFORMS'] = 'cpu'
  env.pop('JAX_NUM_CPU_DEVICES', None)
  return env


@functools.cache
def _run_checks() -> subprocess.CompletedProcess:
  return subprocess.run(
      [sys.executable, str(SCRIPT), *CHECKS], cwd=ROOT, env=_env(4),
      capture_output=True, text=True, timeout=600, check=False,
  )


def test_checks_script_lists_the_same_checks():
  proc = subprocess.run(
      [sys.executable, '-c',
       'import multidevice_checks as m; print(" ".join(m.CHECKS))'],
      cwd=ROOT / 'tests', capture_output=True, text=True, timeout=120,
      check=False,
  )
  assert proc.returncode == 0, proc.stderr
  assert tuple(proc.stdout.split()) == CHECKS


@pytest.mark.parametrize('check', CHECKS)
def test_multidevice(check):
  proc = _run_checks()
  out = proc.stdout
  match = re.search(rf'^CHECK {check}: (PASS|FAIL)(.*)$', out, re.M)
  assert match, f'no result for {check}\n{out[-4000:]}\n{proc.stderr[-4000:]}'
  if match.group(1) != 'PASS':
    # The traceback follows the FAIL line, up to the next check.
    tail = out[match.start():].split('\nCHECK ', 1)[0]
    pytest.fail(tail)
  print(match.group(2))


def test_checks_script_refuses_a_single_device():
  """Without forced devices the script fails instead of passing vacuously."""
  proc = subprocess.run(
      [sys.executable, str(SCRIPT), 'jit_data_parallel'], cwd=ROOT,
      env=_env(1), capture_output=True, text=True, timeout=120, check=False,
  )
  assert proc.returncode != 0
  assert 'CHECK setup: FAIL need 4 devices' in proc.stdout


def _free_port() -> int:
  with socket.socket() as s:
    s.bind(('127.0.0.1', 0))
    return s.getsockname()[1]


def test_multiple_processes():
  """Two processes on localhost, 2 CPU devices each, one 4-device mesh.

  jax 0.10 does CPU collectives across processes with gloo
  (`jax_cpu_collectives_implementation`), which the worker sets explicitly.
  Every wait is bounded: `jax.distributed.initialize` by its
  `initialization_timeout`, the processes by `communicate(timeout=...)`,
  after which both are killed.
  """
  port = _free_port()
  procs = [
      subprocess.Popen(
          [sys.executable, str(SCRIPT), '--worker', str(i), '2', str(port)],
          cwd=ROOT, env=_env(2), stdout=subprocess.PIPE,
          stderr=subprocess.STDOUT, text=True,
      )
      for i in range(2)
  ]
  outs = []
  try:
    for p in procs:
      outs.append(p.communicate(timeout=300)[0])
  except subprocess.TimeoutExpired:
    for p in procs:
      p.kill()
    outs = [p.communicate()[0] for p in procs]
    pytest.fail('multi-process run timed out\n' + '\n'.join(outs))
  finally:
    for p in procs:
      if p.poll() is None:
        p.kill()
  text = '\n'.join(outs)
  for i, (p, out) in enumerate(zip(procs, outs, strict=True)):
    assert p.returncode == 0, f'process {i} failed\n{text[-6000:]}'
    assert f'[process {i}/2] devices 4 (local 2)' in out, text[-6000:]
    for check in ('multihost_jit_fsdp', 'multihost_shard_map'):
      assert f'[process {i}/2] CHECK {check}: PASS' in out, text[-6000:]


def test_data_parallel_example_runs_as_a_module():
  env = dict(os.environ)
  env.pop('XLA_FLAGS', None)  # the example forces its devices itself
  env['JAX_PLATFORMS'] = 'cpu'
  proc = subprocess.run(
      [sys.executable, '-m', 'fromage_jax.examples.data_parallel', '--quick'],
      cwd=ROOT, env=env, capture_output=True, text=True, timeout=300,
      check=False,
  )
  assert proc.returncode == 0, proc.stderr[-4000:]
  assert '4 devices (cpu), global batch 128 = 4 x 32' in proc.stdout
  match = re.search(r'test accuracy (\d\.\d+)', proc.stdout)
  assert match, proc.stdout
  assert float(match.group(1)) > 0.9, proc.stdout
