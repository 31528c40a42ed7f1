"""Prints `name==floor` for every lower bound pyproject.toml declares.

For the runtime dependencies and the extras named on the command line, so that
CI can install each dependency at exactly the oldest version we claim to work.
"""

import re
import sys
import tomllib

with open('pyproject.toml', 'rb') as f:
  project = tomllib.load(f)['project']
requirements = list(project['dependencies'])
for extra in sys.argv[1:]:
  requirements += project['optional-dependencies'][extra]
pins = []
for req in requirements:
  if req.startswith('fromage_jax'):
    continue  # an extra of our own, listed on the command line
  match = re.fullmatch(r'([A-Za-z0-9_.\-]+)>=([0-9][0-9A-Za-z.]*)', req)
  if not match:
    sys.exit(f'no plain lower bound to pin in {req!r}')
  pins.append(f'{match[1]}=={match[2]}')
print(' '.join(pins))
