"""Runs `tests/multidevice` in a process of its own, on 8 forced CPU devices
(JAX takes its device count once, before the first computation)."""

import os
import pathlib
import subprocess
import sys

ROOT = pathlib.Path(__file__).resolve().parents[1]


def test_the_multidevice_tests_pass_on_8_forced_cpu_devices():
  env = dict(os.environ, JAX_PLATFORMS='cpu',
             XLA_FLAGS='--xla_force_host_platform_device_count=8')
  proc = subprocess.run(
      [sys.executable, '-m', 'pytest', '-q', '-p', 'no:cacheprovider',
       '-W', 'error', str(ROOT / 'tests' / 'multidevice')],
      cwd=ROOT, env=env, capture_output=True, text=True, timeout=900,
      check=False)
  # Exit code 5 (no test collected) fails too.
  assert proc.returncode == 0, proc.stdout[-20000:] + proc.stderr[-5000:]
