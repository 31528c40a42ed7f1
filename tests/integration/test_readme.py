"""The README's snippet runs, and what it states matches the code and files."""

import inspect
import re

import jax
import jax.numpy as jnp

import fromage_jax
from fromage_jax import demo
from tests.helpers import ROOT

README = ROOT / 'README.md'
# A figure: a number with a decimal point or an exponent (not "figure 3").
FIGURE = re.compile(r'(?<![\w.])\d+(?:\.\d+)?(?:e[+-]?\d+)?(?![\w.]*\d)')


def figures(text: str) -> set[str]:
  return {f for f in FIGURE.findall(text) if '.' in f or 'e' in f}


def snippets():
  return re.findall(r'```python\n(.*?)```', README.read_text(), re.S)


def section(title: str) -> str:
  text = README.read_text()
  start = text.index(f'\n## {title}\n')
  end = text.find('\n## ', start + 1)
  return text[start:end if end > 0 else None]


def table_rows(text: str) -> list[list[str]]:
  """The body rows of the Markdown tables in `text`, split into cells."""
  rows = []
  for line in text.splitlines():
    if line.startswith('| ') and not line.startswith('| ---'):
      rows.append([c.strip() for c in re.split(r'(?<!\\)\|', line)[1:-1]])
  return [r for r in rows if r[0] not in ('name', 'what', 'command')]


def test_readme_has_the_two_setup_commands_that_ci_runs():
  text = README.read_text()
  ci = (README.parent / '.ci' / 'run').read_text()
  test_cmd = 'python3 -m pip install -e ".[test]" && python3 -m pytest'
  assert test_cmd in text and test_cmd in ci
  assert ('python3 -m pip install -e ".[examples]" && '
          'python3 -m fromage_jax.demo') in text


def test_plain_optax_quickstart_trains_including_the_zero_bias():
  (code,) = snippets()
  ns = {}
  exec(code, ns)  # noqa: S102
  # The snippet ran 500 steps: compare with the loss at the initial params.
  k1, k2, _ = jax.random.split(jax.random.key(0), 3)
  init = {'w1': jax.random.normal(k1, (8, 32)) / jnp.sqrt(8),
          'b1': jnp.zeros(32),
          'w2': jax.random.normal(k2, (32, 1)) / jnp.sqrt(32)}
  before = float(ns['loss_fn'](init, ns['x'], ns['y']))
  after = float(ns['loss'])
  assert after < 0.5 * before
  assert float(jnp.linalg.norm(ns['params']['b1'])) > 1e-3


def test_api_table_lists_exactly_the_public_names():
  listed = set()
  for row in table_rows(section('API')):
    listed |= set(re.findall(r'`(?:fromage_jax\.)?(\w+)[(`]', row[0]))
  testing = (ROOT / 'fromage_jax' / 'testing.py').exists()
  assert listed == set(fromage_jax.__all__) | ({'testing'} if testing else set())


def test_api_table_signatures_match_the_code():
  for row in table_rows(section('API')):
    found = re.fullmatch(r'`(\w+)\((.*)\)`', row[0])
    if not found:
      continue
    name, args = found.groups()
    params = inspect.signature(getattr(fromage_jax, name)).parameters
    for arg in (a.strip() for a in args.split(',')):
      if arg in ('*', '...', ''):
        continue
      key, _, default = arg.lstrip('*').partition('=')
      assert key in params, (name, key)
      if default:
        assert repr(params[key].default) == default, (name, key)


def test_examples_table_lists_every_example_module():
  listed = set(re.findall(r'python3 -m (fromage_jax[\w.]*)', section('Examples')))
  modules = {f'fromage_jax.examples.{p.stem}'
             for p in (ROOT / 'fromage_jax' / 'examples').glob('*.py')
             if not p.stem.startswith('_')}
  assert listed == modules | {'fromage_jax.demo'}


def test_results_figures_come_from_the_files_they_cite():
  rows = table_rows(section('Results'))
  assert rows
  for row in rows:
    quoted = figures(' '.join(row[:-1]))
    sources = re.findall(r'\]\(([^)#]+)\)', row[-1])
    assert sources, row
    in_files = set().union(*(figures((ROOT / s).read_text()) for s in sources))
    assert not quoted - in_files, (row[0], sorted(quoted - in_files))
  # Outside the table the section quotes no figure.
  prose = '\n'.join(line for line in section('Results').splitlines()
                    if not line.startswith('|'))
  assert not figures(prose)


def test_committed_demo_table_is_the_current_demos():
  # The README quotes the committed demo table: it must be the table the demo
  # writes today (same columns, same optimizers), not an older layout.
  committed = (ROOT / 'docs' / '_results' / 'demo' / 'demo_results.md')
  text = committed.read_text()
  assert demo.table({}) in text
  names = set(re.findall(r'^\| `([^`]+)` \|', text, re.M))
  assert names == set(demo.optimizers(steps_per_epoch=22, epochs=60))


def test_readme_links_point_to_files_that_exist():
  for target in re.findall(r'\]\(([^)#:]+)(?:#[^)]*)?\)', README.read_text()):
    assert (ROOT / target).exists(), target
