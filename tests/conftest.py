"""Where the tests are, and what they need.

- `tests/*.py`: the library's own tests, with its runtime dependencies and
  the test extra.
- `tests/multidevice`: library tests that need several devices, which JAX
  can only be given before it starts (forced CPU devices); they run in a
  process of their own, which `tests/test_multidevice.py` starts. Any other
  process leaves them out.
- `tests/examples` (marker `examples`): the examples extra (Flax, orbax,
  scikit-learn, matplotlib): the examples, the demo, Flax and orbax.
- `tests/integration` (marker `integration`): the docs, README, notebooks,
  packaging, and the paper and benchmark scripts.
"""

import os
import pathlib

import pytest

HERE = pathlib.Path(__file__).resolve().parent
MARKERS = {HERE / 'examples': 'examples', HERE / 'integration': 'integration'}

collect_ignore = (
    [] if 'xla_force_host_platform_device_count' in os.environ.get(
        'XLA_FLAGS', '') else ['multidevice']
)


@pytest.hookimpl(tryfirst=True)  # before xdist reads the groups
def pytest_collection_modifyitems(items):
  for item in items:
    for folder, marker in MARKERS.items():
      if folder in item.path.parents:
        item.add_marker(getattr(pytest.mark, marker))
    if HERE / 'integration' in item.path.parents:
      # One xdist worker for the whole module: its fixtures are made once.
      item.add_marker(pytest.mark.xdist_group(item.path.stem))
