"""Prints `name==floor` for the lower bounds pyproject.toml declares.

For the runtime dependencies and the extras named on the command line, so that
CI can install each at exactly the oldest version we claim to work; where two
of them bound the same package (jax: the optimizer's floor and the examples'),
the higher floor wins.
"""

import re
import sys
import tomllib

with open('pyproject.toml', 'rb') as f:
  project = tomllib.load(f)['project']
extras = project['optional-dependencies']


def requirements(names):
  for req in project['dependencies'] if 'runtime' in names else []:
    yield req
  for name in names:
    for req in extras.get(name, []):
      if req.startswith('fromage_jax['):  # an extra of our own: its parts
        yield from requirements(req[len('fromage_jax['):-1].split(','))
      else:
        yield req


floors = {}
for req in requirements(['runtime', *sys.argv[1:]]):
  match = re.fullmatch(r'([A-Za-z0-9_.\-]+)>=([0-9][0-9A-Za-z.]*)', req)
  if not match:
    sys.exit(f'no plain lower bound to pin in {req!r}')
  name, version = match.groups()
  key = tuple(int(p) if p.isdigit() else p for p in version.split('.'))
  if name not in floors or key > floors[name][0]:
    floors[name] = (key, version)
print(' '.join(f'{name}=={version}' for name, (_, version) in floors.items()))
