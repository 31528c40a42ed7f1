"""The paper's table 1 and figure 4: one learning rate across tasks.

The paper's headline claim: Fromage at `eta = 0.01` needs no tuning across
very different tasks, where SGD and Adam do. Here Fromage, SGD (momentum 0.9)
and Adam each train four offline tasks (`benchmarks.paper.tasks`: a CNN
classifier, a GAN and an autoencoder on scikit-learn's digits, and a
byte-level transformer LM on the Python standard library's source) over a log
grid of learning rates and several seeds. As in the paper, every learning
rate is divided by 10 when the training loss plateaus: for Fromage with
`fromage_jax.fromage_on_plateau`, which lowers `eta` inside both the step and
the prefactor; for SGD and Adam by chaining
`optax.contrib.reduce_on_plateau`, which for them is the same as lowering the
learning rate. The loss is averaged over each epoch before the plateau check.

All learning rates and seeds of one (task, optimizer) pair are `jax.vmap`-ed
into one compiled epoch, run epoch by epoch with a progress bar.

Writes the run to `sensitivity.json`, then `sensitivity.png` from it
(figure 4: for each task and optimizer, the best error over the grid divided
by the error at each learning rate, so 1.0 marks the best; top row on the
training set as in the paper, bottom row held out) and the tables of
`table1.md` (each optimizer at its best learning rate, Fromage also at 0.01,
mean +- std over seeds; then every learning rate).

    python -m benchmarks.paper.sensitivity [--quick | --large] [--out DIR]
"""

import argparse
import pathlib
import time

import jax
import jax.numpy as jnp
import numpy as np
import optax
from optax import contrib
from tqdm.auto import tqdm

from benchmarks import common
from benchmarks import render as rendering
from benchmarks.paper import _common
from benchmarks.paper import tasks as tasks_lib
import fromage_jax

NAME = 'sensitivity'
TABLE = PAGE = 'table1'
TITLE = 'Table 1 and Figure 4: one learning rate across tasks'
OPTIMIZERS = ('Fromage', 'SGD', 'Adam')
FROMAGE_DEFAULT = 0.01
# At most three divisions by 10, as a floor on the learning rate.
MIN_SCALE = 1e-3



def log_grid(low: int, high: int) -> tuple[float, ...]:
  """Half-decades from `10**low` to `10**high`, rounded to 1 and 3."""
  return tuple(float(f'{m}e{e}') for e in range(low, high + 1)
               for m in (1, 3) if (e, m) != (high, 3))


# Four decades each, centred on the optimizer's usual setting; SGD's reaches
# two more down, where its best GAN learning rate lies.
GRIDS = {'Fromage': log_grid(-4, 0), 'SGD': log_grid(-5, 1),
         'Adam': log_grid(-5, -1)}
# `patience` in epochs. The GAN's FID swings from epoch to epoch: with a
# patience of 20 of its 200 epochs every SGD and Adam run decayed three times
# (best mean FIDs 308 and 218); with 50, 201 and 118.
FULL = dict(
    seeds=(0, 1, 2), grids=GRIDS,
    tasks={'classifier': dict(epochs=40, patience=5),
           'gan': dict(epochs=200, patience=50),
           'lm': dict(epochs=24, patience=5),
           'autoencoder': dict(epochs=200, patience=5)},
)
QUICK = dict(
    seeds=(0, 1),
    grids={'Fromage': (1e-3, 1e-2, 1e-1), 'SGD': (1e-2, 1e-1, 1.0),
           'Adam': (1e-4, 1e-3, 1e-2)},
    tasks={'classifier': dict(epochs=3, patience=1, width=4),
           'gan': dict(epochs=3, patience=1, width=16, latent=8,
                       n_samples=200),
           'lm': dict(epochs=2, patience=1, width=16, heads=2, depth=1,
                      seq=16, batch_size=4, steps_per_epoch=10,
                      train_bytes=20_000, test_bytes=5_000, eval_windows=16),
           'autoencoder': dict(epochs=3, patience=1, width=16)},
)
# For an accelerator: larger models, longer runs, more seeds.
LARGE = dict(
    seeds=(0, 1, 2, 3, 4), grids=GRIDS,
    tasks={'classifier': dict(epochs=100, patience=5, width=64),
           'gan': dict(epochs=300, patience=75, width=512, latent=64,
                       n_samples=1797),
           'lm': dict(epochs=100, patience=5, depth=6, width=256, heads=4,
                      seq=128, batch_size=64, steps_per_epoch=100,
                      train_bytes=4_000_000, test_bytes=400_000,
                      eval_windows=1024),
           'autoencoder': dict(epochs=300, patience=5, width=512, code=32)},
)


def build(cfg: dict, name: str):
  """`(task, epochs, patience)` for task `name` of configuration `cfg`."""
  kwargs = dict(cfg['tasks'][name])
  epochs, patience = kwargs.pop('epochs'), kwargs.pop('patience')
  return tasks_lib.TASKS[name](**kwargs), epochs, patience


def optimizer(name: str, learning_rate, steps_per_epoch: int, patience: int):
  """`name` at `learning_rate`, divided by 10 (at most three times) when the
  epoch-mean `value` passed to `update` has not improved for `patience`
  epochs."""
  plateau = dict(factor=0.1, patience=patience, min_scale=MIN_SCALE,
                 accumulation_size=steps_per_epoch)
  if name == 'Fromage':
    return fromage_jax.fromage_on_plateau(learning_rate, **plateau)
  base = (optax.adam(learning_rate) if name == 'Adam'
          else optax.sgd(learning_rate, momentum=0.9))
  return optax.chain(base, contrib.reduce_on_plateau(**plateau))


def make_sweep(task: tasks_lib.Task, name: str, patience: int):
  """Compiled `init`, `epoch` and `evaluate` over a `[lr, seed]` grid.

  `init(lrs, params, data)` takes params stacked over seeds; `epoch(lrs, carry,
  batches, data)` takes one epoch's batches stacked over seeds and returns the
  new carry and each group's mean loss over the epoch, `[lr, seed]`.
  """

  def txs(lr):
    return {g: optimizer(name, lr, task.steps_per_epoch, patience)
            for g in task.groups}

  def signal(params, data):
    if task.plateau_signal is None:
      return None
    return task.plateau_signal(params, data)

  def init_one(lr, params, data):
    states = {g: tx.init(params[g]) for g, tx in txs(lr).items()}
    return params, states, signal(params, data)

  def epoch_one(lr, carry, batches, data):
    opt = txs(lr)
    params, states, last_signal = carry

    def step(carry, batch):
      params, states = carry
      losses = {}
      for g in task.groups:
        def group_loss(p, g=g, params=params):
          return task.loss(g, {**params, g: p}, data, batch)
        losses[g], grads = jax.value_and_grad(group_loss)(params[g])
        # The plateau check averages `value` over an epoch: the epoch-mean
        # loss, or the task's signal measured after the previous epoch.
        value = losses[g] if last_signal is None else last_signal
        updates, state = opt[g].update(grads, states[g], params[g],
                                       value=value)
        params = {**params, g: optax.apply_updates(params[g], updates)}
        states = {**states, g: state}
      return (params, states), losses

    (params, states), losses = jax.lax.scan(step, (params, states), batches)
    return ((params, states, signal(params, data)),
            jax.tree.map(jnp.mean, losses))

  def grid(fn, lr_axes, seed_axes):
    """Maps `fn` over seeds (inner) and learning rates (outer)."""
    return jax.vmap(jax.vmap(fn, in_axes=seed_axes), in_axes=lr_axes)

  init = jax.jit(grid(init_one, (0, None, None), (None, 0, None)))
  epoch = jax.jit(grid(epoch_one, (0, 0, None, None), (None, 0, 0, None)),
                  donate_argnums=1)
  evaluate = jax.jit(grid(task.evaluate, (0, None), (0, None)))
  return init, epoch, evaluate


def _is_plateau(x) -> bool:
  return isinstance(x, contrib.ReduceLROnPlateauState)


def lr_scales(states, groups) -> dict:
  """Each group's plateau scale (1, 0.1, 0.01, ...), `[lr, seed]`."""
  def scale(state):
    (plateau,) = [s for s in jax.tree.leaves(state, is_leaf=_is_plateau)
                  if _is_plateau(s)]
    return np.asarray(plateau.scale)

  return {g: scale(states[g]) for g in groups}


def run_task(task: tasks_lib.Task, epochs: int, seeds, grids, patience: int,
             bar=None) -> dict:
  """Trains every optimizer, learning rate and seed on `task`.

  Returns `{optimizer: dict(lrs, train, test, ..., curves, scales, wall)}`;
  figures are `[lr, seed]` arrays (NaN where a run diverged), `curves` each
  group's mean training loss per epoch, `[epoch, lr, seed]` (and the
  task's plateau signal after each epoch, if it has one).
  """
  params = jax.tree.map(lambda *a: jnp.stack(a),
                        *[task.init(s) for s in seeds])
  per_seed = [task.batches(np.random.default_rng(1000 + s), epochs)
              for s in seeds]
  # [epoch, seed, step, ...]: one epoch's slice goes to the compiled epoch.
  batches = jax.tree.map(lambda *a: np.stack(a, axis=1), *per_seed)
  results = {}
  for name, lrs in grids.items():
    start = time.perf_counter()
    init, epoch, evaluate = make_sweep(task, name, patience)
    lr_arr = jnp.asarray(lrs, jnp.float32)
    carry = init(lr_arr, params, task.data)
    curves = []
    for e in range(epochs):
      carry, losses = epoch(lr_arr, carry,
                            jax.tree.map(lambda b, e=e: b[e], batches),
                            task.data)
      if task.plateau_signal is not None:
        losses = {**losses, 'plateau_signal': carry[2]}
      curves.append(jax.device_get(losses))
      if bar is not None:
        first = np.asarray(curves[-1][task.groups[0]])
        bar.set_postfix_str(f'{task.name} {name} epoch {e + 1}: '
                            f'{task.groups[0]} loss {np.nanmedian(first):.3g}')
        bar.update()
    out = jax.device_get(evaluate(carry[0], task.data))
    results[name] = dict(
        lrs=tuple(float(lr) for lr in lrs),
        **{k: np.asarray(v, np.float64) for k, v in out.items()},
        curves={k: np.stack([c[k] for c in curves]) for k in curves[0]},
        scales=lr_scales(carry[1], task.groups),
        wall=time.perf_counter() - start,
    )
  return results


# --------------------------------------------------------------------------
# Summaries.


def error(figures) -> np.ndarray:
  """Figures with non-finite ones (diverged runs) as +inf."""
  figures = np.asarray(figures, np.float64)
  return np.where(np.isfinite(figures), figures, np.inf)


def best_index(figures) -> int:
  """The learning rate with the lowest mean figure over seeds."""
  return int(np.argmin(error(figures).mean(axis=-1)))


def ratios(figures) -> np.ndarray:
  """Figure 4's `best error / error` per learning rate (mean over seeds);
  1.0 at the best learning rate (also where the best is 0), 0 where runs
  diverged."""
  mean = error(figures).mean(axis=-1)
  best = mean.min()
  with np.errstate(divide='ignore', invalid='ignore'):
    return np.where(mean == best, 1.0,
                    np.where(np.isfinite(mean), best / mean, 0.0))


def mean_std(values) -> str:
  values = np.asarray(values, np.float64)
  if not np.all(np.isfinite(values)):
    return f'diverged ({np.sum(~np.isfinite(values))}/{values.size})'
  std = values.std(ddof=1) if values.size > 1 else 0.0
  return f'{values.mean():.4g} ± {std:.2g}'


SPLITS = {'train': 'training', 'test': 'held-out'}


def summarise(results: dict) -> dict:
  """Per task, optimizer and split: the best learning rate and figure 4's
  ratios; per optimizer and split, the best single learning rate for all
  tasks (the one whose worst ratio over the tasks is highest)."""
  tasks = {
      task: {name: {key: dict(best_lr=r['lrs'][best_index(r[key])],
                              ratio=ratios(r[key]))
                    for key in SPLITS}
             for name, r in by_opt.items()}
      for task, by_opt in results.items()}
  across = {key: {} for key in SPLITS}
  for name in OPTIMIZERS:
    runs = [by_opt[name] for by_opt in results.values() if name in by_opt]
    if not runs:
      continue
    for key in SPLITS:
      worst = np.min([tasks[t][name][key]['ratio'] for t in results], axis=0)
      i = int(np.argmax(worst))
      across[key][name] = dict(lrs=runs[0]['lrs'], worst_ratio=worst,
                               best_single_lr=runs[0]['lrs'][i],
                               best_single_worst=float(worst[i]))
  return dict(tasks=tasks, across=across)


# --------------------------------------------------------------------------
# Output.


def plot(results: dict, summary: dict, metrics: dict, path=None, *,
         title: str = 'Figure 4 offline', styles: dict | None = None):
  """Figure 4: per task and split, each optimizer's ratio (best error /
  error) against its learning rate; `styles[name]`: its line's matplotlib
  keywords."""
  names = list(results)
  fig, axes = _common.figure(len(names), 2, width=3.6, height=3.2)
  styles = styles or {name: dict(marker=m)
                      for name, m in zip(OPTIMIZERS, 'osd', strict=True)}
  for col, task in enumerate(names):
    for row, split in enumerate(SPLITS):
      ax = axes[row][col]
      for name, r in results[task].items():
        ax.plot(r['lrs'], summary['tasks'][task][name][split]['ratio'],
                label=name, **styles[name])
      ax.axvline(FROMAGE_DEFAULT, color='0.6', ls=':', lw=1, zorder=0)
      ax.set_xscale('log')
      ax.set_ylim(-0.03, 1.05)
      ax.set_xlabel('learning rate')
      ax.set_title(f'{task}: {SPLITS[split]} {metrics[task]}', fontsize=9)
      if col == 0:
        ax.set_ylabel('best error / error')
  axes[0][0].legend(fontsize=7)
  fig.suptitle(f'{title}: learning-rate sensitivity (1.0 = best learning '
               'rate; dotted: 0.01)', fontsize=10)
  fig.tight_layout()
  if path:
    fig.savefig(path, dpi=110)
  return fig


def _decays(r, i) -> float:
  """Mean number of divisions by 10 at learning rate `i` (over seeds and
  parameter groups)."""
  return float(np.mean([-np.log10(np.asarray(s)[i]) for s in
                        r['scales'].values()]))


def summary_tables(results: dict, summary: dict, metrics: dict) -> list:
  """Table 1, the ratios of one learning rate for every task, and every
  learning rate's figures, as `Table`s."""
  rows = []
  for task, by_opt in results.items():
    for name, r in by_opt.items():
      best = summary['tasks'][task][name]['train']['best_lr']
      labels = [(best, name)]
      if name == 'Fromage' and best != FROMAGE_DEFAULT and (
          FROMAGE_DEFAULT in r['lrs']):
        labels.append((FROMAGE_DEFAULT, 'Fromage at 0.01'))
      for lr, label in labels:
        i = r['lrs'].index(lr)
        figures = [mean_std(r[key][i]) for key in SPLITS]
        if 'train_error' in r:
          figures = [f'{f} (error {mean_std(100 * np.asarray(r[k])[i])}%)'
                     for f, k in zip(figures, ('train_error', 'test_error'),
                                     strict=True)]
        rows.append([f'{task} ({metrics[task]})', label, f'{lr:g}', *figures,
                     f'{_decays(r, i):.1f}'])
  out = [rendering.Table(
      ['task (figure)', 'optimizer', 'lr', 'training', 'held-out',
       'lr decays (mean)'], rows,
      title='Table 1: each optimizer at its best learning rate', left=2,
      note='Best = lowest mean training figure over seeds (the paper\'s '
      'choice); mean ± standard deviation over seeds (ddof=1). Lower is '
      'better.')]
  tasks = list(results)
  for key, where in SPLITS.items():
    rows = []
    for name, a in summary['across'][key].items():
      for k, lr in enumerate(a['lrs']):
        worst = f'{a["worst_ratio"][k]:.2f}'
        if lr == a['best_single_lr']:
          worst = f'**{worst}**'
        rows.append([name, f'{lr:g}',
                     *(f'{summary["tasks"][t][name][key]["ratio"][k]:.2f}'
                       for t in tasks), worst])
    out.append(rendering.Table(
        ['optimizer', 'lr', *tasks, 'worst'], rows,
        title=f'One learning rate for every task: {where} figures',
        note='Figure 4\'s ratio: the best mean figure over the grid divided '
        'by the mean figure at that learning rate (1.00 = best for that '
        'task, 0 = diverged); "worst" is the lowest over the tasks, in bold '
        'for the best single learning rate.'))
  for n, (task, by_opt) in enumerate(results.items()):
    rows = [[name, f'{lr:g}', mean_std(r['train'][i]), mean_std(r['test'][i]),
             f'{_decays(r, i):.1f}', f'{r["wall"]:.0f}' if i == 0 else '']
            for name, r in by_opt.items() for i, lr in enumerate(r['lrs'])]
    out.append(rendering.Table(
        ['optimizer', 'lr', 'training', 'held-out', 'decays', 'wall (s)'],
        rows, title=f'Every learning rate: {task} ({metrics[task]})',
        note='' if n else 'Mean ± std over seeds; "decays": mean number of '
        'divisions by 10 on plateau; wall: that optimizer\'s whole grid, '
        'compile included.'))
  return out


def table(results: dict, summary: dict, metrics: dict) -> str:
  """`summary_tables` in Markdown."""
  return '\n\n'.join(map(rendering.markdown,
                         summary_tables(results, summary, metrics)))


def tables(data: dict) -> list:
  results, metrics = data['runs'], data['metrics']
  summary = summarise(results)
  tasks = list(results)
  best = []
  for key, where in SPLITS.items():
    for name, a in summary['across'][key].items():
      best.append([where, name, *(
          f'{summary["tasks"][t][name][key]["best_lr"]:g}' for t in tasks),
                   f'{a["best_single_lr"]:g}',
                   f'{a["best_single_worst"]:.2f}'])
  return [
      rendering.Table(['task', 'setup'], list(data['settings'].items()),
                      title='Tasks', left=2),
      rendering.Table(
          ['figures', 'optimizer', *tasks, 'one lr for all',
           'its worst ratio'], best, title='Best learning rates', left=2,
          note='Each task\'s best learning rate (lowest mean figure over '
          'seeds), and the single learning rate whose worst ratio over the '
          'tasks (figure 4\'s best error / error) is highest.'),
      *summary_tables(results, summary, metrics)]


def draw(data: dict, path):
  results = data['runs']
  return plot(results, summarise(results), data['metrics'], path)


def render(data: dict, out: str) -> tuple[str, str]:
  """Writes `sensitivity.png` and `table1.md` into `out` from a run's data
  (`run`'s result, or its JSON); returns their paths."""
  md = rendering.write(data, pathlib.Path(out) / f'{TABLE}.md')
  return str(md.with_name(f'{NAME}.png')), str(md)


def run(cfg: dict, mode: str, names=None) -> dict:
  """Trains every task of `cfg` (or `names`); returns the data `render`
  takes."""
  names = names or list(cfg['tasks'])
  start = time.perf_counter()
  total = len(cfg['grids']) * sum(cfg['tasks'][t]['epochs'] for t in names)
  bar = tqdm(total=total, desc=NAME, unit='epoch')
  runs, metrics, settings = {}, {}, {}
  for t in names:
    task, epochs, patience = build(cfg, t)
    runs[t] = run_task(task, epochs, cfg['seeds'], cfg['grids'], patience,
                       bar)
    metrics[t] = task.metric
    settings[t] = (f'{task.title}: {task.settings}; {epochs} epochs of '
                   f'{task.steps_per_epoch} steps, patience {patience} '
                   'epochs')
  bar.close()
  info = common.run_info(f'benchmarks.paper.{NAME}', mode,
                         time.perf_counter() - start, cfg)
  return dict(info, runs=runs, metrics=metrics, settings=settings)


def main(argv=None):
  parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  _common.add_common_args(parser)
  parser.add_argument('--large', action='store_true',
                      help='larger models, longer runs, more seeds (for an '
                      'accelerator)')
  parser.add_argument('--tasks', nargs='*', default=None,
                      help=f'a subset of {list(tasks_lib.TASKS)}')
  parser.add_argument('--render', metavar='JSON', default=None,
                      help='no training: redraw the figure and table from '
                      'the JSON of an earlier run')
  args = parser.parse_args(argv)
  if args.render:
    return _common.publish(args, NAME, None, TABLE)
  mode = 'quick' if args.quick else 'large' if args.large else 'full'
  cfg = dict(quick=QUICK, large=LARGE, full=FULL)[mode]
  return _common.publish(args, NAME, run(cfg, mode, args.tasks), TABLE)


if __name__ == '__main__':
  main()
