"""The tests in `tests/multidevice` need several devices, which JAX can only
be given before it starts (forced CPU devices), so they run in a process of
their own: `tests/test_multidevice.py` starts it. Any other process skips
collecting them."""

import os

FORCED_DEVICES = 'xla_force_host_platform_device_count'

collect_ignore = (
    [] if FORCED_DEVICES in os.environ.get('XLA_FLAGS', '') else ['multidevice']
)
