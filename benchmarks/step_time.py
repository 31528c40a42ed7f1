"""Optimizer step time, compile time and memory: fromage_jax against optax.

A jitted, buffer-donated step (`update` + `optax.apply_updates`) of each
optimizer on the trees of `benchmarks.trees`, all in one process, the runs
interleaved round by round in a shuffled order, a few steps of each in a row
(`benchmarks.timing`); then a real training step of a transformer LM
(`benchmarks.lm_step`). Times are medians over the timed rounds; ratios are
medians of the ratios within each round, with their quartiles.

    python -m benchmarks.step_time [--rounds 15] [--scale 1.0] [--out PATH]
        [--trees NAME ...] [--steps-per-round 3] [--compile-repeats 3]
        [--no-lm]

Writes the run's JSON beside the page `--out` (by default
benchmarks/results/step_time.md) and renders its tables into that page.
`--scale` shrinks the trees (a test runs `--scale 0.001 --rounds 2`).
"""

import argparse
import pathlib
import statistics
import time

from benchmarks import common
from benchmarks import lm_step
from benchmarks import render
from benchmarks import timing
from benchmarks import trees as zoo

NAME = 'step_time'
TITLE = 'Optimizer step time: fromage_jax against optax'
WARMUP = 2  # untimed rounds before the timed ones


def _ms(times) -> str:
  return f'{statistics.median(times) * 1e3:.2f}'


def _ratio(times, other_times, quartiles: bool = True) -> str:
  median, q1, q3 = timing.paired_ratio(times, other_times)
  return f'{median:.2f} ({q1:.2f}–{q3:.2f})' if quartiles else f'{median:.2f}'


def tree_tables(name: str, tree: dict, kernels: bool = False) -> list:
  """One tree's table (`kernels` adds their count), and how Fromage's step
  compares with a two-pass floor when the norms pass was timed."""
  opts = tree['optimizers']
  sgd, adam = opts['optax.sgd'], opts['optax.adam']
  ofr = opts['optax.fromage']['times']
  title = (f'{name}: {tree["params"] / 1e6:.1f}M params, '
           f'{tree["leaves"]:,} leaves')
  if tree['layers'] != tree['leaves']:
    title += f' ({tree["layers"]} layers)'
  rows = [
      [f'`{n}`', _ms(r['times']), _ratio(r['times'], sgd['times']),
       _ratio(r['times'], ofr, False), _ratio(r['times'], adam['times'], False),
       f'{r["compile_s"]:.2f}', f'{r["compile_s"] / adam["compile_s"]:.2f}',
       f'{r["state_bytes"]:,}', f'{r["state_bytes"] / tree["layers"]:.1f}',
       f'{r["peak_bytes"] / 1e6:.1f}',
       f'{r["peak_bytes"] / sgd["peak_bytes"]:.3f}',
       *([str(r['kernels'])] if kernels else [])]
      for n, r in opts.items()]
  tables = [render.Table(
      ['optimizer', 'step (ms)', 'x SGD', 'x optax.fromage', 'x optax.adam',
       'compile (s)', 'compile x Adam', 'state (bytes)',
       'state / layer (bytes)', 'peak (MB)', 'peak x SGD',
       *(['kernels'] if kernels else [])], rows, title=title)]
  norms = tree['norms_times']
  if norms:
    floor = [a + b for a, b in zip(sgd['times'], norms, strict=True)]
    fro = opts['fromage_jax.fromage']['times']
    bound = opts['fromage_jax.fromage(p_bound)']['times']
    tables.append(render.Table(
        ['step', 'time (ms)', 'x SGD', 'x floor', 'x `fromage_jax.fromage`'],
        [['norms pass', _ms(norms), _ratio(norms, sgd['times']), '', ''],
         ['floor: `optax.sgd` + norms pass', _ms(floor),
          _ratio(floor, sgd['times']), '', ''],
         ['`fromage_jax.fromage`', _ms(fro), _ratio(fro, sgd['times']),
          _ratio(fro, floor), ''],
         ['`fromage_jax.fromage(p_bound)`', _ms(bound),
          _ratio(bound, sgd['times']), _ratio(bound, floor),
          _ratio(bound, fro)]],
        title=f'{name}: against a two-pass floor',
        note='The norms pass reads every `W` and `g` once for their squared '
        'norms with plain `jnp.sum`s; the floor is `optax.sgd`\'s step plus '
        'that pass, round by round.'))
  return tables


def lm_table(lm: dict) -> render.Table:
  m, opts = lm['model'], lm['optimizers']
  adam = opts['optax.adam']['times']
  return render.Table(
      ['optimizer', 'step (ms)', 'x Adam', 'loss: first -> last step'],
      [[f'`{n}`', _ms(r['times']), _ratio(r['times'], adam),
        f'{r["losses"][0]:.3f} -> {r["losses"][-1]:.3f}']
       for n, r in opts.items()],
      title=f'Real training step: Flax NNX transformer LM ({m["depth"]} '
      f'layers, width {m["width"]}, {m["params"] / 1e6:.1f}M params, '
      f'{m["leaves"]} leaves; batch {m["batch"]} x {m["seq"]} bytes of stdlib '
      'source)')


def tables(data: dict) -> list:
  out = [t for name, tree in data['trees'].items()
         for t in tree_tables(name, tree)]
  return out + ([lm_table(data['lm'])] if data['lm'] else [])


def main(argv=None) -> dict:
  parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  parser.add_argument('--rounds', type=int, default=15)
  parser.add_argument('--scale', type=float, default=1.0)
  parser.add_argument('--steps-per-round', type=int, default=3,
                      help='steps of each optimizer in a row per round; all '
                      'but the first are timed')
  parser.add_argument('--compile-repeats', type=int, default=3,
                      help='compile each step this many times; the fastest '
                      'is reported')
  parser.add_argument('--trees', nargs='*', default=list(zoo.TREES))
  parser.add_argument('--no-lm', action='store_true',
                      help='skip the transformer LM step')
  parser.add_argument('--out', default=str(common.RESULTS_DIR / f'{NAME}.md'),
                      help='the results page; the JSON goes beside it '
                      '(default benchmarks/results/step_time.md)')
  args = parser.parse_args(argv)
  from tqdm.auto import tqdm  # an "examples" extra

  start = time.perf_counter()
  results, lm = {}, None
  total = len(args.trees) * (len(timing.optimizers()) + WARMUP + args.rounds)
  with tqdm(total=total + (0 if args.no_lm else WARMUP + args.rounds),
            desc=NAME) as bar:
    for tree in args.trees:
      bar.set_postfix_str(tree)
      results[tree] = timing.bench_tree(
          zoo.TREES[tree](args.scale), args.rounds, warmup=WARMUP,
          progress=bar, compile_repeats=args.compile_repeats,
          layer_axes=zoo.LAYER_AXES.get(tree),
          steps_per_round=args.steps_per_round)
    if not args.no_lm:
      bar.set_postfix_str('transformer LM')
      lm = lm_step.bench_lm(args.rounds, progress=bar, warmup=WARMUP)
  config = dict(rounds=args.rounds, warmup_rounds=WARMUP,
                steps_per_round=args.steps_per_round,
                compile_repeats=args.compile_repeats, scale=args.scale,
                trees=args.trees, lm=not args.no_lm)
  full = (args.scale == 1 and set(args.trees) == set(zoo.TREES)
          and not args.no_lm)
  data = dict(common.run_info(f'benchmarks.{NAME}',
                              'full' if full else 'partial',
                              time.perf_counter() - start, config),
              trees=results, lm=lm)
  out = pathlib.Path(args.out)
  page = render.save(data, out.with_suffix('.json'), out)
  print(page.read_text())
  return data


if __name__ == '__main__':
  main()
