"""Refuses to run the multi-device tests on fewer devices than they need."""

import jax
import pytest

DEVICES = 8


def pytest_configure(config):
  del config
  if jax.device_count() < DEVICES:
    raise pytest.UsageError(
        f'tests/multidevice needs {DEVICES} devices; run it as '
        f'XLA_FLAGS=--xla_force_host_platform_device_count={DEVICES} '
        'JAX_PLATFORMS=cpu python -m pytest tests/multidevice')
