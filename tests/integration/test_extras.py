"""Without the "examples" extra: the library imports, the examples say why not.

Each check runs in a fresh interpreter where the extra's modules are blocked
(`sys.modules[name] = None` makes importing them raise ModuleNotFoundError),
as if they were not installed.
"""

import json
import subprocess
import sys

EXTRA = ('flax', 'orbax', 'sklearn', 'matplotlib', 'tqdm')
HINT = 'pip install "fromage_jax[examples]"'

SCRIPT = '''
import importlib, json, sys
for name in {extra!r}:
  sys.modules[name] = None
errors = {{}}
for module in sys.argv[1:]:
  try:
    importlib.import_module(module)
  except ModuleNotFoundError as e:
    errors[module] = [str(e), e.name]
print(json.dumps(errors))
'''

LIBRARY = (
    'fromage_jax', 'fromage_jax.testing', 'fromage_jax.demo',
    'fromage_jax.examples.checkpointing', 'fromage_jax.examples.data_parallel',
)
FLAX_EXAMPLES = tuple(
    f'fromage_jax.examples.{name}'
    for name in ('linen_mlp_digits', 'nnx_cnn_digits', 'nnx_scan_stacked')
)


def test_only_the_flax_examples_need_the_extra_to_import_and_they_name_it():
  proc = subprocess.run(
      [sys.executable, '-c', SCRIPT.format(extra=EXTRA), *LIBRARY,
       *FLAX_EXAMPLES],
      capture_output=True, text=True, timeout=300, check=False,
  )
  assert proc.returncode == 0, proc.stderr[-4000:]
  errors = json.loads(proc.stdout)  # {module: [message, missing module]}
  assert sorted(errors) == sorted(FLAX_EXAMPLES)
  for message, missing in errors.values():
    assert missing.split('.')[0] == 'flax'
    assert message.startswith('flax.')
    assert HINT in message
