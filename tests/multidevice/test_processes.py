"""Several hosts, simulated by two processes on localhost with 2 CPU devices
each: one 4-device mesh across them (`tests/multidevice/worker.py`)."""

import os
import socket
import subprocess
import sys

from tests.helpers import ROOT


def _free_port() -> int:
  with socket.socket() as s:
    s.bind(('127.0.0.1', 0))
    return s.getsockname()[1]


def test_two_processes_train_and_shard_like_one_device():
  """Every wait is bounded: `jax.distributed.initialize` by its timeout,
  the processes by `communicate(timeout=...)`, after which both are
  killed."""
  env = dict(os.environ, JAX_PLATFORMS='cpu',
             XLA_FLAGS='--xla_force_host_platform_device_count=2')
  port = str(_free_port())
  procs = [subprocess.Popen(
      [sys.executable, '-m', 'tests.multidevice.worker', str(i), '2', port],
      cwd=ROOT, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
      text=True) for i in range(2)]
  try:
    outs = [p.communicate(timeout=300)[0] for p in procs]
  finally:
    for p in procs:
      if p.poll() is None:
        p.kill()
  for i, (p, out) in enumerate(zip(procs, outs, strict=True)):
    assert p.returncode == 0, f'process {i}:\n{out[-6000:]}'
