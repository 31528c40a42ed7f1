"""The paper's figure 3: training accuracy of deep MLPs against depth.

ReLU MLPs without biases, normalisation or skip connections, of depth 2 to 50
(depth = number of weight matrices), trained on scikit-learn's digits with
Fromage at eta in {0.1, 0.01, 0.001}, SGD with momentum 0.9 at {1, 0.1, 0.01}
and Adam at {1e-2, 1e-3, 1e-4}; each learning rate decays by 0.95 every epoch
(`optax.exponential_decay(..., staircase=True)`). Left: the training accuracy
of each optimizer's best learning rate per depth. Right: Fromage per learning
rate, beside Lemma 2's bound `fromage_jax.descent_learning_rate_bound(depth)`.

The hidden layers are one stacked `[depth - 2, width, width]` leaf run by
`lax.scan` (Fromage treats its slices as layers via `layer_axes`), so the
compile time does not grow with depth; learning rates and seeds of one
optimizer and depth are `jax.vmap`-ed and the epochs and steps `lax.scan`-ed:
one compiled call per (optimizer, depth).

    python -m benchmarks.paper.depth [--quick] [--out DIR]
"""

import argparse
import os
import time

import jax
import jax.numpy as jnp
import numpy as np
import optax
from tqdm.auto import tqdm

from benchmarks.paper import _common
import fromage_jax

NAME = 'depth'
LEARNING_RATES = {
    'Fromage': (0.1, 0.01, 0.001),
    'SGD (momentum 0.9)': (1.0, 0.1, 0.01),
    'Adam': (1e-2, 1e-3, 1e-4),
}
FULL = dict(depths=(2, 5, 10, 20, 30, 50), width=64, epochs=100,
            batch_size=128, seeds=(0, 1), decay=0.95)
QUICK = dict(depths=(2, 6), width=16, epochs=3, batch_size=128, seeds=(0,),
             decay=0.95)


def init(key, depth, width, d_in=64, d_out=10):
  """He-normal, bias-free; hidden matrices stacked along axis 0."""
  ws = _common.init_mlp(key, _common.mlp_sizes(depth, width, d_in, d_out))
  params = {'in': ws[0], 'out': ws[-1]}
  if depth > 2:
    params['hidden'] = jnp.stack(ws[1:-1])
  return params


def mlp(params, x):
  x = jax.nn.relu(x @ params['in'])
  if 'hidden' in params:
    x, _ = jax.lax.scan(lambda h, w: (jax.nn.relu(h @ w), None), x,
                        params['hidden'])
  return x @ params['out']


def layer_axes(params):
  """Each slice of the stacked hidden leaf is one layer for Fromage."""
  return {k: (0,) if k == 'hidden' else None for k in params}


def optimizer(name, schedule):
  if name == 'Fromage':
    return fromage_jax.fromage(schedule, layer_axes=layer_axes)
  if name == 'Adam':
    return optax.adam(schedule)
  return optax.sgd(schedule, momentum=0.9)


def make_train(name, epochs, decay, x, y):
  """A jitted `(lrs, params, batches) -> metrics`, vmapped over learning
  rates (axis 0 of `lrs`) and seeds (axis 0 of `params` and `batches`)."""
  steps_per_epoch = None

  def loss(params, xb, yb):
    return _common.loss_fn(params, xb, yb, model=mlp)

  def train_one(lr, params, batches):
    schedule = optax.exponential_decay(lr, steps_per_epoch, decay,
                                       staircase=True)
    tx = optimizer(name, schedule)

    def step(carry, idx):
      params, state = carry
      value, grads = jax.value_and_grad(loss)(params, x[idx], y[idx])
      updates, state = tx.update(grads, state, params)
      return (optax.apply_updates(params, updates), state), value

    (params, _), losses = jax.lax.scan(step, (params, tx.init(params)),
                                       batches)
    return dict(acc=_common.accuracy(params, x, y, model=mlp),
                loss=loss(params, x, y),
                curve=losses.reshape(epochs, -1).mean(axis=1))

  vm = jax.vmap(jax.vmap(train_one, in_axes=(None, 0, 0)),
                in_axes=(0, None, None))
  jitted = jax.jit(vm)

  def call(lrs, params, batches):
    nonlocal steps_per_epoch
    steps_per_epoch = batches.shape[1] // epochs
    return jitted(lrs, params, batches)

  return call


def seeded_inputs(seed, depth, width, epochs, batch_size, n):
  """Init (from `key(seed)`) and shuffled batches (from `key(seed + 1000)`).

  Made outside the compiled training: random draws inside a vmapped jit cost
  much more compile time than the training itself at these sizes.
  """
  params = init(jax.random.key(seed), depth, width)
  steps = n // batch_size
  keys = jax.random.split(jax.random.key(seed + 1000), epochs)
  batches = jnp.stack([jax.random.permutation(k, n)[: steps * batch_size]
                       for k in keys]).reshape(epochs * steps, batch_size)
  return params, batches


def run(depths, width, epochs, batch_size, seeds, decay, optimizers=None):
  """Returns {(optimizer, depth): dict(acc=[lr, seed], loss=..., wall=...)}."""
  x, y = _common.load_digits()
  optimizers = optimizers or LEARNING_RATES
  results = {}
  bar = tqdm(total=len(depths) * len(optimizers), desc=NAME, unit='run')
  for depth in depths:
    inputs = [seeded_inputs(s, depth, width, epochs, batch_size, x.shape[0])
              for s in seeds]
    params = jax.tree.map(lambda *a: jnp.stack(a), *[p for p, _ in inputs])
    batches = jnp.stack([b for _, b in inputs])
    for name, lrs in optimizers.items():
      start = time.perf_counter()
      train = make_train(name, epochs, decay, x, y)
      out = jax.device_get(train(jnp.asarray(lrs, jnp.float32), params,
                                 batches))
      out = {k: np.asarray(v) for k, v in out.items()}
      out['wall'] = time.perf_counter() - start
      out['lrs'] = tuple(lrs)
      results[(name, depth)] = out
      bar.set_postfix_str(f'{name} depth {depth}: best acc '
                          f'{out["acc"].mean(1).max():.3f}')
      bar.update()
  bar.close()
  return results


def best(result):
  """(best lr, its mean training accuracy over seeds)."""
  mean = result['acc'].mean(axis=1)
  i = int(np.argmax(mean))
  return result['lrs'][i], float(mean[i])


def plot(results, depths, path=None):
  fig, axes = _common.figure(2, width=5.2, height=4.0)
  ax_best, ax_fr = axes[0]
  names = list(dict.fromkeys(name for name, _ in results))
  for name, marker in zip(names, 'osd', strict=False):
    accs = [best(results[(name, d)])[1] for d in depths]
    ax_best.plot(depths, accs, marker=marker, label=f'{name} (best lr)')
  ax_best.set_xlabel('depth L (weight matrices)')
  ax_best.set_ylabel('training accuracy')
  ax_best.set_ylim(0, 1.02)
  ax_best.set_title('best learning rate per depth')
  ax_best.legend(fontsize=8)

  lrs = results[('Fromage', depths[0])]['lrs']
  colors = ['C3', 'C2', 'C0']
  for i, (lr, c) in enumerate(zip(lrs, colors, strict=False)):
    accs = [results[('Fromage', d)]['acc'][i].mean() for d in depths]
    ax_fr.plot(depths, accs, 'o-', color=c, label=f'Fromage $\\eta$={lr:g}')
  ax_fr.set_xlabel('depth L')
  ax_fr.set_ylabel('training accuracy')
  ax_fr.set_ylim(0, 1.02)
  twin = ax_fr.twinx()
  dense = np.linspace(min(depths), max(depths), 200)
  twin.plot(dense, fromage_jax.descent_learning_rate_bound(dense), 'k--',
            label=r"Lemma 2 bound $2^{1/L}-1$")
  for lr, c in zip(lrs, colors, strict=False):
    twin.axhline(lr, color=c, ls=':', lw=1)
  twin.set_yscale('log')
  twin.set_ylabel(r'$\eta$ (dotted: the three settings)')
  twin.legend(fontsize=8, loc='lower left')
  ax_fr.legend(fontsize=8, loc='center left')
  ax_fr.set_title('Fromage per learning rate')
  fig.suptitle('Figure 3 on digits: bias-free ReLU MLPs, no normalisation '
               'or skips')
  fig.tight_layout()
  if path:
    fig.savefig(path, dpi=110)
  return fig


def summary(results, depths) -> str:
  names = list(dict.fromkeys(name for name, _ in results))
  head = ' | '.join(f'{d}' for d in depths)
  lines = ['Training accuracy (mean over seeds) after the last epoch, per '
           'learning rate; **bold** = best per depth for that optimizer; '
           '"nan" marks a diverged run (non-finite loss, accuracy counted as '
           'measured).', '',
           f'| optimizer | lr | {head} |',
           '| --- | ---: |' + ' ---: |' * len(depths)]
  for name in names:
    lrs = results[(name, depths[0])]['lrs']
    for i, lr in enumerate(lrs):
      cells = []
      for d in depths:
        r = results[(name, d)]
        acc = r['acc'][i].mean()
        cell = f'{acc:.3f}'
        if not np.all(np.isfinite(r['loss'][i])):
          cell += ' nan'
        if best(r)[0] == lr:
          cell = f'**{cell}**'
        cells.append(cell)
      lines.append(f'| {name} | {lr:g} | ' + ' | '.join(cells) + ' |')
  bound = np.asarray(fromage_jax.descent_learning_rate_bound(
      np.asarray(depths)))
  lines += ['', '| Lemma 2 bound (1+1)^(1/L)-1 | | '
            + ' | '.join(f'{b:.3g}' for b in bound) + ' |', '',
            'Wall time per (optimizer, depth), all learning rates and seeds '
            'vmapped, compile included (s):', '',
            f'| optimizer | {head} |', '| --- |' + ' ---: |' * len(depths)]
  for name in names:
    lines.append(f'| {name} | '
                 + ' | '.join(f'{results[(name, d)]["wall"]:.1f}'
                              for d in depths) + ' |')
  return '\n'.join(lines)


def main(argv=None):
  parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  _common.add_common_args(parser)
  parser.add_argument('--epochs', type=int, default=None,
                      help='override the mode\'s epoch count')
  args = parser.parse_args(argv)
  cfg = dict(QUICK if args.quick else FULL)
  if args.epochs:
    cfg['epochs'] = args.epochs
  start = time.perf_counter()
  results = run(**cfg)
  wall = time.perf_counter() - start
  os.makedirs(args.out, exist_ok=True)
  png = os.path.join(args.out, f'{NAME}.png')
  plot(results, cfg['depths'], png)
  spe = 1797 // cfg['batch_size']
  settings = (
      f'Mode: {"quick" if args.quick else "full"}. Depths '
      f'{list(cfg["depths"])}, width {cfg["width"]}, bias-free ReLU MLPs, '
      f'He-normal init, no normalisation or skip connections; all 1,797 '
      f'digits (standardised) as training set, batch {cfg["batch_size"]} '
      f'({spe} steps per epoch, remainder dropped), {cfg["epochs"]} epochs '
      f'({cfg["epochs"] * spe} steps); learning rate times {cfg["decay"]} '
      f'every epoch; seeds {list(cfg["seeds"])} (init from '
      f'`jax.random.key(seed)`, shuffles from `key(seed + 1000)`; the same '
      f'init and batches for every optimizer and learning rate); accuracy = full-batch training accuracy '
      f'after the last epoch, averaged over seeds. Fromage = '
      f'`fromage_jax.fromage(schedule, layer_axes=...)`, SGD = '
      f'`optax.sgd(schedule, momentum=0.9)`, Adam = `optax.adam(schedule)`.'
      f'\n\nMachine: {_common.machine()}. Total wall time: {wall:.1f} s.')
  body = f'{settings}\n\n{summary(results, cfg["depths"])}\n'
  md = _common.write_markdown(args.out, NAME, 'Figure 3: training accuracy '
                              'against depth (digits)', body)
  if args.json:
    runs = {}
    for (name, d), r in results.items():
      runs.setdefault(name, {})[d] = dict(
          lrs=r['lrs'], acc=r['acc'], loss=r['loss'], wall=r['wall'],
          best_lr=best(r)[0], best_acc=best(r)[1])
    _common.write_json(args.json, dict(
        config=cfg, wall=wall, runs=runs,
        bound={d: float(fromage_jax.descent_learning_rate_bound(d))
               for d in cfg['depths']}))
  print(f'{body}\nwrote {png} and {md}')
  return dict(results=results, config=cfg, wall=wall, png=png, md=md)


if __name__ == '__main__':
  main()
