"""Constant against decayed eta over long training, and a floor on ||g||.

A relative step never shrinks by itself: near a minimum the gradient
vanishes, but every layer still moves by `eta` of its norm. This study trains
two tasks far past their minimum (the demo's MLP classifier and the MLP
autoencoder of `sensitivity.py`, both on the digits, both with
zero-initialised biases), three seeds each, with

- `constant`: `fromage_jax.fromage(0.01)`;
- `cosine`: `fromage_jax.fromage(optax.cosine_decay_schedule(0.01, steps))`,
  decaying to 0 at the last step;
- `on plateau`: `fromage_jax.fromage_on_plateau(0.01)`, eta / 10 when the
  epoch-mean loss has not improved for `patience` epochs (the paper's
  protocol);
- `constant, grad_norm_floor`: `fromage_jax.fromage(0.01,
  grad_norm_floor=1e-6)`, whose ratio is `||W|| / max(||g||, 1e-6)`: the
  floor that `optax.fromage`'s `min_norm` puts on the gradient's norm, with
  fromage_jax's rule for zero-norm layers kept;
- `optax.fromage(0.01)`, whose `min_norm=1e-6` floors both norms.

and records, per epoch, the epoch-mean training loss and the held-out
figure, and at the end the norm of the layers that started at zero.

    python -m benchmarks.paper.eta_decay [--quick] [--out DIR] [--json FILE]
"""

import argparse
import time

import jax
import jax.numpy as jnp
import numpy as np
import optax
from tqdm.auto import tqdm

from benchmarks import common
from benchmarks import render as rendering
from benchmarks.paper import _common
from benchmarks.paper import tasks as tasks_lib
import fromage_jax

NAME = 'eta_decay'
TITLE = 'Constant against decayed eta over long training'
ETA = 0.01
FLOOR = 1e-6  # optax.fromage's min_norm

TASKS = {'mlp': tasks_lib.mlp_classifier, 'autoencoder': tasks_lib.autoencoder}
FULL = dict(seeds=(0, 1, 2), patience=5,
            tasks={'mlp': dict(epochs=200), 'autoencoder': dict(epochs=400)})
QUICK = dict(seeds=(0, 1), patience=1,
             tasks={'mlp': dict(epochs=3, width=16),
                    'autoencoder': dict(epochs=3, width=16)})


def methods(steps: int, steps_per_epoch: int, patience: int) -> dict:
  """The optimizers compared, by name, for a run of `steps` steps."""
  return {
      'constant': fromage_jax.fromage(ETA),
      'cosine': fromage_jax.fromage(optax.cosine_decay_schedule(ETA, steps)),
      'on plateau': fromage_jax.fromage_on_plateau(
          ETA, patience=patience, accumulation_size=steps_per_epoch),
      'constant, grad_norm_floor': fromage_jax.fromage(
          ETA, grad_norm_floor=FLOOR),
      'optax.fromage': optax.fromage(ETA),
  }


def zero_norm(params, init_params) -> jax.Array:
  """The norm, over all of them, of the leaves that were zero at init."""
  squares = jax.tree.map(
      lambda p, p0: jnp.where(jnp.all(p0 == 0), jnp.sum(jnp.square(p)), 0.0),
      params, init_params)
  return jnp.sqrt(sum(jax.tree.leaves(squares)))


def train(task, tx, seeds, epochs: int, bar) -> dict:
  """Trains `task` with `tx` from each seed (vmapped); returns per-epoch
  figures `[epoch, seed]` and the final zero-initialised layers' norm."""
  tx = optax.with_extra_args_support(tx)

  def step(carry, batch):
    params, state = carry
    loss, grads = jax.value_and_grad(
        lambda p: task.loss('model', p, task.data, batch))(params)
    updates, state = tx.update(grads, state, params, value=loss)
    return (optax.apply_updates(params, updates), state), loss

  @jax.jit
  @jax.vmap
  def epoch(params, state, batches):
    (params, state), losses = jax.lax.scan(step, (params, state), batches)
    return params, state, losses.mean(), task.evaluate(params, task.data)

  params0 = jax.tree.map(lambda *x: jnp.stack(x),
                         *[task.init(s)['model'] for s in seeds])
  params0 = {'model': params0}
  per_seed = [task.batches(np.random.default_rng(1000 + s), epochs)
              for s in seeds]
  params, state = params0, jax.vmap(tx.init)(params0)
  train_loss, test = [], []
  for e in range(epochs):
    batches = jnp.stack([b[e] for b in per_seed])
    params, state, loss, figures = epoch(params, state, batches)
    train_loss.append(np.asarray(loss))
    test.append(np.asarray(figures['test']))
    bar.update()
  return dict(train=np.stack(train_loss), test=np.stack(test),
              zero_norm=np.asarray(jax.vmap(zero_norm)(params, params0)))


def run(cfg: dict, mode: str) -> dict:
  start = time.perf_counter()
  names = list(methods(1, 1, 1))
  bar = tqdm(total=len(names) * sum(t['epochs'] for t in cfg['tasks'].values()),
             desc=NAME, unit='epoch')
  runs, settings = {}, {}
  for name, kwargs in cfg['tasks'].items():
    kwargs = dict(kwargs)
    epochs = kwargs.pop('epochs')
    task = TASKS[name](**kwargs)
    txs = methods(epochs * task.steps_per_epoch, task.steps_per_epoch,
                  cfg['patience'])
    runs[name] = {}
    for method, tx in txs.items():
      bar.set_postfix_str(f'{name}: {method}')
      runs[name][method] = train(task, tx, cfg['seeds'], epochs, bar)
    settings[name] = (f'{task.title}: {task.settings}; {epochs} epochs of '
                      f'{task.steps_per_epoch} steps; figure: '
                      f'{task.metric}')
  bar.close()
  info = common.run_info(f'benchmarks.paper.{NAME}', mode,
                         time.perf_counter() - start, cfg)
  return dict(info, runs=runs, settings=settings)


# --------------------------------------------------------------------------
# Summaries, tables and the figure.


def summary(run: dict) -> dict:
  """Per seed: the lowest training loss and its epoch, the last one, the
  last and best held-out figures."""
  train = np.asarray(run['train'], np.float64)  # [epoch, seed]
  test = np.asarray(run['test'], np.float64)
  low = np.nanmin(train, axis=0)
  last = train[-1]
  return dict(
      low=low, low_epoch=np.nanargmin(train, axis=0) + 1, last=last,
      last_test=test[-1],
      best_test=np.nanmin(test, axis=0),
      zero_norm=np.asarray(run['zero_norm'], np.float64))


def _mean(x) -> str:
  return f'{np.mean(x):.3g}'


def tables(data: dict) -> list:
  rows = []
  for task, by_method in data['runs'].items():
    for method, run in by_method.items():
      s = summary(run)
      rows.append([task, method, _mean(s['low']), _mean(s['low_epoch']),
                   _mean(s['last']),
                   ', '.join(f'{x:.3g}' for x in s['last'] / s['low']),
                   _mean(s['last_test']), _mean(s['best_test']),
                   _mean(s['zero_norm'])])
  return [
      rendering.Table(['task', 'setup'], list(data['settings'].items()),
                      title='Tasks', left=2),
      rendering.Table(
          ['task', 'method', 'lowest training loss', 'at epoch',
           'last training loss', 'last / lowest, per seed',
           'last held-out', 'best held-out', 'zero-init layers\' norm'],
          rows, title='Results', left=2,
          note='Means over seeds; training loss: the epoch mean; held-out: '
          'the task\'s figure on the held-out split after each epoch; the '
          'last column: the norm, at the end, of the layers that started at '
          'zero (the biases).')]


def draw(data: dict, path) -> None:
  names = list(data['runs'])
  fig, axes = _common.figure(len(names), 2, width=5.0, height=3.4)
  for col, task in enumerate(names):
    for row, (key, label) in enumerate((('train', 'training loss'),
                                        ('test', 'held-out figure'))):
      ax = axes[row][col]
      for method, run in data['runs'][task].items():
        curve = np.nanmean(np.asarray(run[key], np.float64), axis=1)
        ax.plot(np.arange(1, len(curve) + 1), np.maximum(curve, 1e-12),
                label=method)
      ax.set_yscale('log')
      ax.set_xlabel('epoch')
      ax.set_title(f'{task}: {label} (mean of seeds)', fontsize=9)
  axes[0][0].legend(fontsize=7)
  fig.tight_layout()
  fig.savefig(path, dpi=110)


def main(argv=None):
  parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  _common.add_common_args(parser)
  args = parser.parse_args(argv)
  mode = 'quick' if args.quick else 'full'
  return _common.publish(args, NAME, run(QUICK if args.quick else FULL, mode))


if __name__ == '__main__':
  main()
