"""Figure 4 over other directions: one learning rate across tasks?

The paper's claim for Fromage is that one learning rate serves very different
tasks because each layer moves by `eta` of its own norm. Does the same
relative step give that property to other optimizers' directions? Here the
four tasks of `benchmarks.paper.sensitivity` (a CNN classifier, a GAN, a
byte-level transformer LM and an autoencoder) are trained, over three seeds
and one learning-rate grid shared by every relative-step method, by

- `Adam`: `optax.adam(lr)`, on its own grid (as in sensitivity.py);
- `Fromage`: `fromage_jax.fromage_on_plateau(lr)`, Fromage over the raw
  gradient;
- `rel(Adam)`: `optax.chain(optax.scale_by_adam(), fromage_jax.fromage(lr))`,
  Adam's direction moved by `lr` of each layer's norm;
- `rel(Adam)+proj`: the same, then `fromage_jax.norm_project_to_init()`,
  which holds every layer's norm at its initial one;
- `Muon`: `optax.contrib.muon(lr)`, on its own grid (Muon on the 2-D leaves,
  AdamW with the same learning rate on the others);
- `rel(Muon)+proj`: Muon's orthogonalised momentum on the 2-D leaves and the
  raw gradient on the others (conv kernels, attention's 3-D kernels, biases,
  layer-norm scales), as optax's muon splits them, then `fromage(lr)` and
  `norm_project_to_init()` on every leaf.

Every learning rate is divided by 10 when the epoch-mean training loss (the
GAN: its training FID) plateaus, at most three times, as in sensitivity.py.
For the relative-step chains the whole chain runs inside
`optax.inject_hyperparams` and the plateau scale multiplies `eta` itself, so
that the step and Fromage's prefactor both use the decayed `eta` (what
`fromage_on_plateau` does for Fromage); Adam and Muon chain
`optax.contrib.reduce_on_plateau`, which for them is the same as lowering the
learning rate.

Writes `directions.png` (figure 4's ratio, best error / error, per task,
method and learning rate; training figures on top, held-out below) and
`directions.md` (the best single learning rate of each method for all tasks
and how far each task is from its own best there; each method at its best
learning rate per task; every learning rate).

    python -m benchmarks.paper.directions [--quick] [--out DIR] [--json FILE]
"""

import argparse
import contextlib
import datetime
import json
import os
import pathlib
from typing import NamedTuple
from unittest import mock

import jax
import jax.numpy as jnp
import numpy as np
import optax
from optax import contrib

from benchmarks import render as rendering
from benchmarks.paper import _common
from benchmarks.paper import sensitivity
from benchmarks.paper import tasks as tasks_lib
import fromage_jax

NAME = 'directions'
TITLE = "Figure 4 over Adam's and Muon's directions: one learning rate across tasks?"
# The relative-step methods, which share one grid.
RELATIVE = ('Fromage', 'rel(Adam)', 'rel(Adam)+proj', 'rel(Muon)+proj')
OPTIMIZERS = ('Adam', 'Fromage', 'rel(Adam)', 'rel(Adam)+proj', 'Muon',
              'rel(Muon)+proj')
# The paper's default for Fromage, marked in the figure and tables.
DEFAULT = sensitivity.FROMAGE_DEFAULT
SHARED_GRID = sensitivity.GRIDS['Fromage']  # 1e-4 to 1 in half-decades
GRIDS = {'Adam': sensitivity.GRIDS['Adam'],
         **{name: SHARED_GRID for name in RELATIVE},
         # Four decades around Muon's usual 0.02.
         'Muon': sensitivity.log_grid(-4, 0)}
GRIDS = {name: GRIDS[name] for name in OPTIMIZERS}
FULL = dict(sensitivity.FULL, grids=GRIDS)
# Two of the four tasks: seconds each, for the tests.
QUICK = dict(sensitivity.QUICK, grids={
    name: (1e-4, 1e-3, 1e-2) if name == 'Adam' else (1e-3, 1e-2, 1e-1)
    for name in OPTIMIZERS}, tasks={
        t: sensitivity.QUICK['tasks'][t] for t in ('classifier', 'autoencoder')})

# --------------------------------------------------------------------------
# The optimizers.


def muon_labels(params):
  """`'muon'` for the 2-D leaves (optax.contrib.muon's default split),
  `'raw'` for every other leaf."""
  return jax.tree.map(lambda x: 'muon' if x.ndim == 2 else 'raw', params)


def _matrix_dims(updates):
  # scale_by_muon's default (None) only works when the params are one array;
  # under `partition`, `updates` holds the 2-D leaves (and MaskedNodes).
  return jax.tree.map(lambda _: contrib.MuonDimensionNumbers(), updates)


def muon_direction() -> optax.GradientTransformation:
  """Muon's orthogonalised momentum on the 2-D leaves; the raw gradient on
  the others."""
  return optax.partition(
      {'muon': contrib.scale_by_muon(weight_dimension_numbers=_matrix_dims),
       'raw': optax.identity()}, muon_labels)


def relative(name: str, learning_rate) -> optax.GradientTransformation:
  """The relative-step chain `name` (of `RELATIVE`, but Fromage) at `eta =
  learning_rate`."""
  direction = (muon_direction() if name == 'rel(Muon)+proj'
               else optax.scale_by_adam())
  parts = [direction, fromage_jax.fromage(learning_rate)]
  if name.endswith('+proj'):
    parts.append(fromage_jax.norm_project_to_init())
  return optax.chain(*parts)


class RelativeOnPlateauState(NamedTuple):
  plateau: contrib.ReduceLROnPlateauState
  inner: optax.InjectHyperparamsState


def relative_on_plateau(name: str, learning_rate,
                        **plateau_kwargs) -> optax.GradientTransformation:
  """`relative(name, eta)` with `eta = scale * learning_rate`, `scale` that of
  `optax.contrib.reduce_on_plateau(**plateau_kwargs)`: the decay reaches
  `eta` itself, in the step and in the prefactor, as in
  `fromage_jax.fromage_on_plateau`. Pass `value=loss` to `update`."""
  plateau = contrib.reduce_on_plateau(**plateau_kwargs)
  inner = optax.inject_hyperparams(
      lambda learning_rate: relative(name, learning_rate),
      hyperparam_dtype=jnp.float32)(learning_rate=0.0)
  eta = jnp.asarray(learning_rate, jnp.float32)

  def with_eta(state, scale):
    return state._replace(
        hyperparams={**state.hyperparams, 'learning_rate': scale * eta})

  def init_fn(params):
    return RelativeOnPlateauState(
        plateau=plateau.init(jnp.zeros([], jnp.float32)),
        inner=with_eta(inner.init(params), 1.0))

  def update_fn(updates, state, params=None, *, value, **extra_args):
    _, plateau_state = plateau.update((), state.plateau, value=value)
    updates, inner_state = inner.update(
        updates, with_eta(state.inner, plateau_state.scale), params,
        **extra_args)
    return updates, RelativeOnPlateauState(plateau_state, inner_state)

  return optax.GradientTransformationExtraArgs(init_fn, update_fn)


_SENSITIVITY_OPTIMIZER = sensitivity.optimizer


def optimizer(name: str, learning_rate, steps_per_epoch: int, patience: int):
  """`name` at `learning_rate`, divided by 10 (at most three times) on a
  plateau of the epoch-mean `value` passed to `update`; the same protocol as
  `sensitivity.optimizer`, which builds `Adam` and `Fromage`."""
  if name in ('Adam', 'Fromage'):
    return _SENSITIVITY_OPTIMIZER(name, learning_rate, steps_per_epoch,
                                  patience)
  plateau = dict(factor=0.1, patience=patience,
                 min_scale=sensitivity.MIN_SCALE,
                 accumulation_size=steps_per_epoch)
  if name == 'Muon':
    return optax.chain(contrib.muon(learning_rate),
                       contrib.reduce_on_plateau(**plateau))
  return relative_on_plateau(name, learning_rate, **plateau)


@contextlib.contextmanager
def _these_optimizers():
  """sensitivity.py's sweep and summary with this study's optimizers.

  Its `make_sweep` builds `sensitivity.optimizer(name, ...)` and its
  `summarise` walks `sensitivity.OPTIMIZERS`; neither takes them as an
  argument, so both are swapped for the duration of a call.
  """
  with mock.patch.multiple(sensitivity, optimizer=optimizer,
                           OPTIMIZERS=OPTIMIZERS, NAME=NAME):
    yield


def summarise(results: dict) -> dict:
  """`sensitivity.summarise` over this study's optimizers."""
  with _these_optimizers():
    return sensitivity.summarise(results)


# --------------------------------------------------------------------------
# Summaries.


def best_of_all(results: dict, task: str, split: str) -> float:
  """The lowest mean figure over seeds of any method and learning rate."""
  return float(min(sensitivity.error(r[split]).mean(axis=-1).min()
                   for r in results[task].values()))


def at_lr(results: dict, summary: dict, name: str, split: str, lr: float):
  """Per task: the ratio to `name`'s own best at `lr`, and to the best of
  every method; `None` where `lr` is not on `name`'s grid."""
  out = {}
  for task, by_opt in results.items():
    r = by_opt[name]
    if lr not in r['lrs']:
      return None
    i = r['lrs'].index(lr)
    mean = sensitivity.error(r[split]).mean(axis=-1)[i]
    best = best_of_all(results, task, split)
    out[task] = dict(
        own=float(summary['tasks'][task][name][split]['ratio'][i]),
        all=1.0 if mean == best else (
            float(best / mean) if np.isfinite(mean) else 0.0))
  return out


def headline(results: dict, summary: dict) -> list:
  """The key tables, one per split: each method's best single learning rate
  for all tasks, and each task's ratio there."""
  tasks = list(results)
  out = []
  for split, where in sensitivity.SPLITS.items():
    rows = []
    for name in OPTIMIZERS:
      if name not in summary['across'][split]:
        continue
      per_task = ', '.join(
          f'{summary["tasks"][t][name][split]["best_lr"]:g}' for t in tasks)
      single = summary['across'][split][name]['best_single_lr']
      lrs = [single]
      if name in RELATIVE and DEFAULT != single:
        lrs.append(DEFAULT)
      for lr in lrs:
        r = at_lr(results, summary, name, split, lr)
        if r is None:
          continue
        rows.append([
            name, per_task if lr == single else '',
            f'**{lr:g}**' if lr == single else f'{lr:g}',
            *(f'{r[t]["own"]:.2f} / {r[t]["all"]:.2f}' for t in tasks),
            f'{min(r[t]["own"] for t in tasks):.2f}',
            f'{min(r[t]["all"] for t in tasks):.2f}'])
    out.append(rendering.Table(
        ['method', 'best lr per task', 'lr', *tasks, 'worst (own)',
         'worst (any method)'], rows, left=2,
        title=f'One learning rate for every task: {where} figures',
        note='Each task\'s ratio to its own best (figure 4\'s best error / '
        'error) and, after the slash, to the best figure of any method and '
        f'learning rate; relative-step methods also at {DEFAULT:g}. '
        '1.00 = best, 0.00 = diverged.'))
  return out


# --------------------------------------------------------------------------
# Output.

# Solid: the shared relative-step grid; dashed: Adam's and Muon's own.
STYLES = {name: dict(marker=m, ms=4, ls='-' if name in RELATIVE else '--')
          for name, m in zip(OPTIMIZERS, 'os^vdP', strict=True)}


def tables(data: dict) -> list:
  results = data['runs']
  summary = summarise(results)
  walls = [[t, f'{m["wall"]:.0f}', m['date'], f'{m["load"]:.1f}']
           for t, m in data['tasks_meta'].items()]
  return [
      rendering.Table(['task', 'setup'], list(data['settings'].items()),
                      title='Tasks', left=2),
      rendering.Table(['task', 'wall (s)', 'date', 'load at its end'], walls,
                      title=f'Runs (cut: {cut(data)})'),
      *headline(results, summary),
      *sensitivity.summary_tables(results, summary, data['metrics'])]


def draw(data: dict, path):
  results = data['runs']
  return sensitivity.plot(results, summarise(results), data['metrics'], path,
                          title='Figure 4 over other directions',
                          styles=STYLES)


def cut(data: dict) -> str:
  """What this run left out of the full study, in words."""
  if data['mode'] == 'quick':
    return ('the quick configuration: two tasks, small models, 2 or 3 epochs, 2 seeds, '
            '3 learning rates a method')
  tasks = data['config']['tasks']
  cuts = [f'{t} not run' for t in FULL['tasks'] if t not in data['runs']]
  cuts += [f'{t} trained {tasks[t]["epochs"]} of {FULL["tasks"][t]["epochs"]} '
           'epochs' for t in data['runs']
           if tasks[t]['epochs'] < FULL['tasks'][t]['epochs']]
  return '; '.join(cuts) or 'nothing'


def run_task(cfg: dict, mode: str, task: str) -> dict:
  """Trains every method of `cfg` on `task`, in sensitivity.py's sweep."""
  with _these_optimizers():
    data = sensitivity.run(cfg, mode, [task])
  meta = dict(wall=data['wall'], date=datetime.date.today().isoformat(),
              load=os.getloadavg()[0])
  return dict(data, tasks_meta={task: meta})


def merge(parts: list[dict]) -> dict:
  """One run's data from runs of some tasks each (the same mode, seeds and
  grids), in the order of `FULL`'s tasks."""
  first = parts[0]
  for part in parts[1:]:
    for key in ('seeds', 'grids'):
      if part['config'][key] != first['config'][key]:
        raise ValueError(f'runs with different {key} cannot be merged')
    if part['mode'] != first['mode']:
      raise ValueError('runs of different modes cannot be merged')
  by_task = {t: part for part in parts for t in part['runs']}
  order = [t for t in FULL['tasks'] if t in by_task]
  return dict(
      first,
      config=dict(first['config'], tasks={
          t: by_task[t]['config']['tasks'][t] for t in order}),
      **{key: {t: by_task[t][key][t] for t in order}
         for key in ('runs', 'metrics', 'settings', 'tasks_meta')},
      wall=sum(by_task[t]['tasks_meta'][t]['wall'] for t in order),
  )


def run(cfg: dict, mode: str, names=None) -> dict:
  """Trains every task of `cfg` (or `names`), each on its own; returns the
  data `render` takes."""
  return merge([run_task(cfg, mode, t) for t in names or cfg['tasks']])


def main(argv=None):
  parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  _common.add_common_args(parser)
  parser.add_argument('--tasks', nargs='*', default=None,
                      help=f'a subset of {list(tasks_lib.TASKS)}')
  parser.add_argument('--epochs', nargs='*', default=(), metavar='TASK=N',
                      help='train TASK for N epochs (a stated cut)')
  parser.add_argument('--render', metavar='JSON', nargs='+', default=None,
                      help='no training: merge the --json files of earlier '
                      'runs (of some tasks each), then draw the figure and '
                      'tables from them')
  args = parser.parse_args(argv)
  if args.render:
    data = merge([json.loads(pathlib.Path(p).read_text())
                  for p in args.render])
  else:
    cfg = QUICK if args.quick else FULL
    for item in args.epochs:
      task, epochs = item.split('=')
      cfg = dict(cfg, tasks={**cfg['tasks'],
                             task: dict(cfg['tasks'][task], epochs=int(epochs))})
    data = run(cfg, 'quick' if args.quick else 'full', args.tasks)
  return _common.publish(args, NAME, data)


if __name__ == '__main__':
  main()
