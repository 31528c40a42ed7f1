"""Runs `tests/multidevice` in a process of its own, on 8 forced CPU devices
(JAX takes its device count once, before the first computation)."""

import os
import pathlib
import subprocess
import sys

ROOT = pathlib.Path(__file__).resolve().parents[1]


def test_the_multidevice_tests_pass_on_8_forced_cpu_devices():
  # Not an xdist worker, whatever process starts it.
  env = {k: v for k, v in os.environ.items()
         if not k.startswith('PYTEST_XDIST')}
  env.update(JAX_PLATFORMS='cpu',
             XLA_FLAGS='--xla_force_host_platform_device_count=8')
  proc = subprocess.run(
      # One process, not the suite's xdist workers: it holds the devices.
      [sys.executable, '-m', 'pytest', '-q', '-p', 'no:cacheprovider',
       '-o', 'addopts=--strict-markers', '-W', 'error',
       str(ROOT / 'tests' / 'multidevice')],
      cwd=ROOT, env=env, capture_output=True, text=True, timeout=900,
      check=False)
  # Exit code 5 (no test collected) fails too.
  assert proc.returncode == 0, proc.stdout[-20000:] + proc.stderr[-5000:]
