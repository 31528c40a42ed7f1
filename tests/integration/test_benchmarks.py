"""The benchmark scripts, on the CPU in small forms, and their renderer."""

import json
import math
import os
import re
import subprocess
import sys

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

from benchmarks import render
from benchmarks import timing
from benchmarks import trees
import fromage_jax
from tests.helpers import ROOT

RESULTS = ROOT / 'benchmarks' / 'results'
TREES = ['GPT-2 small, scanned blocks']
ROUNDS = 3


def run_module(*args, timeout=600):
  env = dict(os.environ, JAX_PLATFORMS='cpu')
  return subprocess.run(
      [sys.executable, '-m', *args], cwd=ROOT, env=env, capture_output=True,
      text=True, timeout=timeout, check=False,
  )


def numbers(text: str) -> list[float]:
  """Every number in `text` (thousands separators allowed)."""
  found = re.findall(r'\d[\d,]*(?:\.\d+)?(?:e[+-]?\d+)?', text)
  return [float(x.replace(',', '')) for x in found]


def shows(cells: list[str], value: float, decimals: int) -> bool:
  """Whether a cell shows `value` rounded to `decimals`."""
  return any(abs(x - value) <= 0.51 * 10**-decimals
             for x in numbers(' '.join(cells)))


def table_rows(text: str) -> list[list[str]]:
  return [[c.strip() for c in line.split('|')[1:-1]]
          for line in text.splitlines() if line.startswith('| ')]


def block_of(text: str) -> str:
  return text[text.index(render.BEGIN):text.index(render.END)
              + len(render.END)]


@pytest.fixture(scope='module')
def step_time_run(tmp_path_factory):
  page = tmp_path_factory.mktemp('step_time') / 'step_time.md'
  proc = run_module('benchmarks.step_time', '--scale', '0.001', '--rounds',
                    str(ROUNDS), '--trees', *TREES, '--no-lm',
                    '--compile-repeats', '2', '--out', str(page))
  assert proc.returncode == 0, proc.stderr[-3000:]
  return json.loads(page.with_suffix('.json').read_text()), page


def test_step_time_json_has_every_tree_and_optimizer(step_time_run):
  data, _ = step_time_run
  assert data['script'] == 'benchmarks.step_time'
  assert data['config']['rounds'] == ROUNDS
  assert data['config']['compile_repeats'] == 2
  assert data['lm'] is None
  assert list(data['trees']) == TREES
  for tree in data['trees'].values():
    assert list(tree['optimizers']) == list(timing.optimizers())
    for r in tree['optimizers'].values():
      assert len(r['times']) == ROUNDS and min(r['times']) > 0
      assert r['compile_s'] > 0 and r['peak_bytes'] > 0 and r['kernels'] > 0
    assert len(tree['norms_times']) == ROUNDS


def test_state_bytes_are_one_float_per_layer_with_p_bound(step_time_run):
  data, _ = step_time_run
  for tree in data['trees'].values():
    opts, layers = tree['optimizers'], tree['layers']
    count = 4  # the step count, an int32
    assert opts['optax.sgd']['state_bytes'] == 0
    assert opts['optax.adam']['state_bytes'] == 2 * tree['param_bytes'] + count
    assert opts['fromage_jax.fromage']['state_bytes'] == count
    for name in ('fromage_jax.fromage(p_bound)',
                 f'{timing.CHAIN} (p_bound)'):
      assert opts[name]['state_bytes'] == 4 * layers + count
  # Stacked blocks: a norm per block's layer, not per stacked leaf.
  scanned = data['trees']['GPT-2 small, scanned blocks']
  unstacked = trees.TREES['GPT-2 small'](data['config']['scale'])
  assert scanned['layers'] == len(jax.tree.leaves(
      unstacked, is_leaf=lambda x: isinstance(x, tuple)))
  assert scanned['leaves'] < scanned['layers']


def test_rendered_table_has_a_row_per_optimizer_with_its_figures(
    step_time_run):
  """Each optimizer of each tree has one row holding its median step, its
  ratio to SGD (the median of the per-round ratios) with their quartiles,
  its compile time, state and state per layer."""
  data, page = step_time_run
  rows = table_rows(page.read_text())
  for tree in data['trees'].values():
    opts = tree['optimizers']
    for name, r in opts.items():
      ratio = timing.paired_ratio(r['times'], opts['optax.sgd']['times'])
      figures = [(1e3 * np.median(r['times']), 2), *((x, 2) for x in ratio),
                 (r['compile_s'], 2), (r['state_bytes'], 0),
                 (r['state_bytes'] / tree['layers'], 1)]
      held = [row for row in rows if row[0] == f'`{name}`'
              and all(shows(row[1:], v, d) for v, d in figures)]
      assert len(held) == 1, (name, figures)


def test_render_rewrites_only_its_block(step_time_run, tmp_path):
  data, page = step_time_run
  json_path = tmp_path / 'step_time.json'
  json_path.write_text(page.with_suffix('.json').read_text())
  before = '# Step time\n\nWritten by hand: what the run shows.\n\n'
  after = '\n\n## Notes\n\nWritten by hand too.\n'
  target = tmp_path / 'step_time.md'
  target.write_text(f'{before}{render.BEGIN}\nstale\n{render.END}{after}')
  assert render.render(json_path) == target
  text = target.read_text()
  assert text == before + render.rendered(data) + after
  render.render(json_path)
  assert target.read_text() == text


def test_render_leaves_a_page_without_its_markers_alone(step_time_run,
                                                        tmp_path):
  _, page = step_time_run
  json_path = tmp_path / 'step_time.json'
  json_path.write_text(page.with_suffix('.json').read_text())
  hand_kept = tmp_path / 'step_time.md'
  hand_kept.write_text('# Kept by hand\n')
  with pytest.raises(ValueError):
    render.render(json_path)
  assert hand_kept.read_text() == '# Kept by hand\n'


def test_render_command_reproduces_the_scripts_page(step_time_run, tmp_path):
  _, page = step_time_run
  json_path = tmp_path / 'step_time.json'
  json_path.write_text(page.with_suffix('.json').read_text())
  proc = run_module('benchmarks.render', str(json_path))
  assert proc.returncode == 0, proc.stderr[-3000:]
  assert (tmp_path / 'step_time.md').read_text() == page.read_text()


def test_block_states_the_run_and_its_settings(step_time_run):
  data, _ = step_time_run
  block = render.block(data, [])
  for value in (data['machine'], data['mode'], data['date'],
                data['script'], *data['config']['trees']):
    assert value in block
  assert shows([block], data['wall'], 0)


def committed_results():
  for path in sorted(RESULTS.glob('*.json')):
    page = render.page_for(path)
    if page.exists() and render.BEGIN in page.read_text():
      yield pytest.param(path, page, id=page.name)


@pytest.mark.parametrize(('json_path', 'page'), list(committed_results()))
def test_committed_page_is_its_json_rendered(json_path, page):
  data = json.loads(json_path.read_text())
  assert block_of(page.read_text()) == render.rendered(data)


def test_every_page_with_tables_has_its_json():
  rendered = {page for _, page in (p.values for p in committed_results())}
  with_tables = {p for p in RESULTS.glob('*.md')
                 if render.BEGIN in p.read_text()}
  assert with_tables and with_tables == rendered


def test_gpu_script_runs_on_cpu_and_checks_against_reference(tmp_path):
  page = tmp_path / 'gpu.md'
  proc = run_module('benchmarks.gpu.run', '--cpu', '--quick', '--out',
                    str(page), '--hlo', str(tmp_path / 'hlo'), '--profile',
                    str(tmp_path / 'profile'))
  assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
  assert 'fusion' in (tmp_path / 'hlo' / 'fromage.hlo.txt').read_text()
  assert list((tmp_path / 'profile').rglob('*.xplane.pb'))
  data = json.loads(page.with_suffix('.json').read_text())
  assert data['checks']
  for check in data['checks'].values():
    assert check['error'] <= check['tolerance']
  assert data['copy_bps'] > 0
  assert list(data['trees']) == [t for t in trees.TREES
                                 if t.startswith('GPT-2')]
  for tree in data['trees'].values():
    assert set(tree['optimizers']) == set(timing.optimizers()) | {
        timing.CHAIN}
    assert tree['layers'] == 148
  assert block_of(page.read_text()) == render.rendered(data)


def test_many_small_leaves_repeat_few_shapes():
  """The 2,000-leaf tree compiles on a small CPU because its shapes repeat."""
  shapes = trees.TREES['2,000 small leaves']()
  assert len(shapes) == 2000
  assert len(set(shapes.values())) == 34
  assert all(16 <= math.prod(s) <= 4096 for s in shapes.values())


def test_paired_ratio_takes_ratios_within_rounds():
  # The machine slows down 10x between rounds; within each the ratio is 2.
  median, q1, q3 = timing.paired_ratio([2, 20, 200, 2000], [1, 10, 100, 1000])
  assert median == q1 == q3 == 2
  median, q1, q3 = timing.paired_ratio([1, 2, 3, 4, 5], [1, 1, 1, 1, 1])
  assert (median, q1, q3) == (3, 2, 4)


def test_step_loop_makes_every_step():
  """`compile_step(loop=k)` is k steps, none skipped or hoisted."""
  params, grads = trees.materialise({'w': (8, 16), 'b': (16,)}, seed=0)
  for tx in (optax.sgd(0.1), fromage_jax.fromage(0.1)):
    compiled, _ = timing.compile_step(tx, params, tx.init(params), grads,
                                      loop=3)
    got, _ = compiled(jax.tree.map(jnp.copy, params), tx.init(params), grads)
    want, state = params, tx.init(params)
    for i in range(3):
      scaled = jax.tree.map(lambda g, i=i: g * (1 + 1e-7 * i), grads)
      updates, state = tx.update(scaled, state, want)
      want = optax.apply_updates(want, updates)
    for k in params:
      np.testing.assert_allclose(got[k], want[k], rtol=1e-5, atol=1e-7)
      assert not np.allclose(want[k], params[k], rtol=1e-3)
