"""The paper's figure 3: training accuracy of deep MLPs against depth.

The authors' protocol (jxbz/fromage, `classify-mnist/depth.ipynb`), on
scikit-learn's digits instead of MNIST: `L` hidden `width x width` ReLU layers
and a linear output layer (`L + 1` matrices, each with a bias; no
normalisation or skip connections), batch 250, Fromage at eta in
{0.1, 0.01, 0.001}, SGD with momentum 0.9 at {1, 0.1, 0.01} and Adam at
{1e-2, 1e-3, 1e-4}, every learning rate times 0.95 after each of 100
"epochs" (equal slices of the step budget). Two initialisations, everything
else equal: the authors' (PyTorch's default `nn.Linear`: weights and biases
from U(-1/sqrt(fan_in), 1/sqrt(fan_in))) and He-normal weights (the same
uniform biases), with the gradient norm of every layer at init measured
under both.

The hidden layers are one stacked `{'w': [L, width, width], 'b': [L, width]}`
run by `lax.scan`; Fromage treats each slice of both leaves as a layer of its
own (`fromage_jax.stacked_layer_axes('hidden')`), as the authors' Fromage
treats each weight and each bias tensor. Learning rates, seeds and both
inits of one (optimizer, depth) are `jax.vmap`-ed and the steps
`lax.scan`-ed: one compiled call per (optimizer, depth).

    python -m benchmarks.paper.depth [--quick] [--out DIR]
"""

import argparse
import json
import os
import time
import warnings

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
INITS = {'authors': 'PyTorch default (authors)', 'he': 'He-normal weights'}
# The digits' 64 pixels: every hidden layer is square, as the authors' 784
# (MNIST's pixels) are.
WIDTH = 64
ADAM_EPS = 1e-8  # optax.adam's default, as torch.optim.Adam's
# 3,000 steps, an eighth of the authors' 24,000: what the 2-core CPU runs in
# about 45 minutes for 5 depths x 54 runs.
FULL = dict(depths=(1, 10, 20, 30, 50), epochs=100, steps_per_epoch=30,
            batch_size=250, seeds=(0, 1, 2), decay=0.95, grad_depth=50)
# The gradients at init are measured at L = 50 in both modes: one backward
# pass, and the authors' init shows its decay only once biases dominate.
QUICK = dict(depths=(1, 5), epochs=20, steps_per_epoch=10, batch_size=250,
             seeds=(0, 1, 2), decay=0.95, grad_depth=50)
# The authors' logs (jxbz/fromage, make-plots/logs/mnist-depth/100_epochs/):
# the mean minibatch training accuracy of the last of 100 epochs, one seed
# per run, at our depths; reference figures only, never compared in code.
AUTHORS_LOGS = {
    'Fromage': {0.1: (0.998, 1.000, 0.998, 0.112, 0.112, 0.112, 0.112),
                0.01: (1.000, 0.999, 1.000, 0.970, 0.112, 0.112, 0.112),
                0.001: (0.971, 0.993, 0.988, 0.972, 0.704, 0.687, 0.654)},
    'SGD (momentum 0.9)': {
        1.0: (0.185, 0.099, 0.112, 0.112, 0.112, 0.112, 0.112),
        0.1: (1.000, 1.000, 1.000, 0.112, 0.112, 0.112, 0.112),
        0.01: (0.998, 1.000, 1.000, 0.112, 0.112, 0.112, 0.112)},
    'Adam': {0.01: (1.000, 1.000, 0.992, 0.112, 0.112, 0.112, 0.112),
             0.001: (1.000, 1.000, 1.000, 0.984, 0.112, 0.112, 0.112),
             0.0001: (0.996, 1.000, 1.000, 1.000, 0.112, 0.112, 0.112)},
}
AUTHORS_DEPTHS = (1, 5, 10, 20, 30, 40, 50)


def init(key, depth, kind, d_in=WIDTH, d_out=10):
  """`depth` hidden layers and the output layer, each `x @ w + b`."""
  sizes = [d_in] + [WIDTH] * depth + [d_out]
  layers = []
  for k, fan_in, fan_out in zip(jax.random.split(key, depth + 1), sizes[:-1],
                                sizes[1:], strict=True):
    kw, kb = jax.random.split(k)
    bound = 1 / np.sqrt(fan_in)
    if kind == 'authors':
      w = jax.random.uniform(kw, (fan_in, fan_out), minval=-bound,
                             maxval=bound)
    else:
      w = jax.random.normal(kw, (fan_in, fan_out)) * np.sqrt(2 / fan_in)
    b = jax.random.uniform(kb, (fan_out,), minval=-bound, maxval=bound)
    layers.append((w, b))
  return {'hidden': {'w': jnp.stack([w for w, _ in layers[:-1]]),
                     'b': jnp.stack([b for _, b in layers[:-1]])},
          'out': {'w': layers[-1][0], 'b': layers[-1][1]}}


def mlp(params, x):
  def layer(h, wb):
    return jax.nn.relu(h @ wb[0] + wb[1]), None

  h, _ = jax.lax.scan(layer, x, (params['hidden']['w'], params['hidden']['b']))
  return h @ params['out']['w'] + params['out']['b']


LAYER_AXES = fromage_jax.stacked_layer_axes('hidden')


def optimizer(name, schedule):
  if name == 'Fromage':
    return fromage_jax.fromage(schedule, layer_axes=LAYER_AXES)
  if name == 'Adam':
    return optax.adam(schedule)
  return optax.sgd(schedule, momentum=0.9)


def loss_and_acc(params, x, y):
  logits = mlp(params, x)
  loss = optax.softmax_cross_entropy_with_integer_labels(logits, y).mean()
  return loss, jnp.mean(jnp.argmax(logits, -1) == y)


def make_train(name, steps_per_epoch, decay, x, y):
  """A jitted `(lrs, params, batches) -> metrics`, vmapped over learning
  rates (axis 0 of `lrs`) and runs (axis 0 of `params` and `batches`)."""

  def train_one(lr, params, batches):
    schedule = optax.exponential_decay(lr, steps_per_epoch, decay,
                                       staircase=True)
    tx = optimizer(name, schedule)

    def step(carry, idx):
      params, state = carry
      (_, acc), grads = jax.value_and_grad(loss_and_acc, has_aux=True)(
          params, x[idx], y[idx])
      updates, state = tx.update(grads, state, params)
      return (optax.apply_updates(params, updates), state), acc

    (params, _), accs = jax.lax.scan(step, (params, tx.init(params)),
                                     batches)
    loss, acc = loss_and_acc(params, x, y)
    return dict(acc=acc, loss=loss,
                last_epoch_acc=accs[-steps_per_epoch:].mean())

  return jax.jit(jax.vmap(jax.vmap(train_one, in_axes=(None, 0, 0)),
                          in_axes=(0, None, None)))


@jax.jit
def hidden_grad_norms(params, x, y):
  """`||dL/dW_l||` of each hidden layer, full batch."""
  grads = jax.grad(lambda p: loss_and_acc(p, x, y)[0])(params)
  return jnp.sqrt(jnp.sum(jnp.square(grads['hidden']['w']), axis=(1, 2)))


def decay_per_layer(norms):
  """The factor by which `||dL/dW_l||` shrinks per layer toward the input:
  `exp(slope)` of the least-squares line through `log ||g_l||` over the
  layers whose gradient did not underflow to 0 in float32."""
  layers = np.flatnonzero(norms > 0)
  slope = np.polyfit(layers, np.log(norms[layers]), 1)[0]
  return float(np.exp(slope))


def batches_for(seed, n, steps, batch_size):
  """Shuffled passes over the data (remainder dropped), `[steps, batch]`."""
  rng = np.random.default_rng(seed + 1000)
  per_pass = n // batch_size
  passes = -(-steps // per_pass)
  idx = np.concatenate([rng.permutation(n)[: per_pass * batch_size]
                        for _ in range(passes)])
  return idx.reshape(-1, batch_size)[:steps].astype(np.int32)


def run(depths, epochs, steps_per_epoch, batch_size, seeds, decay, grad_depth,
        optimizers=None):
  """Returns (runs, grad_norms): `runs[(optimizer, depth)]` holds `acc`,
  `loss` and `last_epoch_acc` shaped `[lr, init, seed]`; `grad_norms[init]`
  is `[seed, layer]` at depth `grad_depth`."""
  x, y = _common.load_digits()
  optimizers = optimizers or LEARNING_RATES
  steps = epochs * steps_per_epoch
  batches = np.stack([batches_for(s, x.shape[0], steps, batch_size)
                      for s in seeds])
  batches = jnp.asarray(np.concatenate([batches] * len(INITS)))
  results = {}
  bar = tqdm(total=len(depths) * len(optimizers), desc=NAME, unit='run')
  for depth in depths:
    inits = [init(jax.random.key(s), depth, kind) for kind in INITS
             for s in seeds]
    params = jax.tree.map(lambda *a: jnp.stack(a), *inits)
    for name, lrs in optimizers.items():
      start = time.perf_counter()
      train = make_train(name, steps_per_epoch, decay, x, y)
      out = jax.device_get(train(jnp.asarray(lrs, jnp.float32), params,
                                 batches))
      out = {k: np.asarray(v).reshape(len(lrs), len(INITS), len(seeds))
             for k, v in out.items()}
      out['wall'] = time.perf_counter() - start
      out['lrs'] = tuple(lrs)
      results[(name, depth)] = out
      bar.set_postfix_str(f'{name} depth {depth}: best acc '
                          + ' / '.join(f'{best(out, i)[1]:.3f}'
                                       for i in range(len(INITS))))
      bar.update()
  bar.close()
  grad_norms = {kind: np.stack([
      np.asarray(hidden_grad_norms(init(jax.random.key(s), grad_depth, kind),
                                   x, y)) for s in seeds]) for kind in INITS}
  return results, grad_norms


def best(result, i, key='acc'):
  """(best lr, mean over seeds, min, max) under init `i`, by mean `key`."""
  mean = result[key][:, i].mean(axis=1)
  j = int(np.argmax(mean))
  vals = result[key][j, i]
  return result['lrs'][j], float(mean[j]), float(vals.min()), float(vals.max())


def plot(results, grad_norms, depths, path=None):
  fig, axes = _common.figure(3, width=4.6, height=3.9)
  names = list(dict.fromkeys(name for name, _ in results))
  for i, title in enumerate(INITS.values()):
    ax = axes[0][i]
    for name, marker in zip(names, 'osd', strict=False):
      stats = np.array([best(results[(name, d)], i)[1:] for d in depths])
      line, = ax.plot(depths, stats[:, 0], marker=marker,
                      label=f'{name} (best lr)')
      ax.fill_between(depths, stats[:, 1], stats[:, 2], alpha=0.2,
                      color=line.get_color())
    ax.set_xlabel('L (hidden layers; L + 1 matrices)')
    ax.set_ylabel('training accuracy')
    ax.set_ylim(0, 1.02)
    ax.set_title(f'init: {title}', fontsize=10)
    ax.legend(fontsize=8)
  ax = axes[0][2]
  for kind, title in INITS.items():
    norms = grad_norms[kind]
    # Gradients that underflowed to exactly 0 are left out (log scale).
    rel = np.where(norms > 0, norms / norms[:, -1:], np.nan)
    layers = np.arange(1, norms.shape[1] + 1)
    factors = [decay_per_layer(n) for n in norms]
    with warnings.catch_warnings():  # layers where every seed underflowed
      warnings.simplefilter('ignore', RuntimeWarning)
      line, = ax.plot(layers, np.exp(np.nanmean(np.log(rel), 0)),
                      label=f'{title}: x{np.mean(factors):.2f} per layer')
      ax.fill_between(layers, np.nanmin(rel, 0), np.nanmax(rel, 0),
                      alpha=0.2, color=line.get_color())
  ax.set_yscale('log')
  ax.set_xlabel(f'hidden layer l (of {norms.shape[1]})')
  ax.set_ylabel(r'$\|\partial L/\partial W_l\| / \|\partial L/\partial W_L\|$')
  ax.set_title('gradient norm per layer at init', fontsize=10)
  ax.legend(fontsize=8)
  fig.suptitle('Figure 3 on digits, the authors\' protocol: best learning '
               'rate per depth (band: min-max over seeds)')
  fig.tight_layout()
  if path:
    fig.savefig(path, dpi=110)
  return fig


def table(results, depths, i, key='acc') -> list:
  head = ' | '.join(f'{d}' for d in depths)
  lines = [f'| optimizer | lr | {head} |',
           '| --- | ---: |' + ' ---: |' * len(depths)]
  for name in dict.fromkeys(name for name, _ in results):
    for j, lr in enumerate(results[(name, depths[0])]['lrs']):
      cells = []
      for d in depths:
        r = results[(name, d)]
        vals = r[key][j, i]
        cell = f'{vals.mean():.3f} ({vals.min():.2f}-{vals.max():.2f})'
        if not np.all(np.isfinite(r['loss'][j, i])):
          cell += ' nan'
        if best(r, i, key)[0] == lr:
          cell = f'**{cell}**'
        cells.append(cell)
      lines.append(f'| {name} | {lr:g} | ' + ' | '.join(cells) + ' |')
  return lines


def deepest_trained(accs, depths, threshold=0.9):
  """The largest depth up to which every accuracy exceeds `threshold`."""
  out = None
  for d, a in zip(depths, accs, strict=True):
    if a <= threshold:
      break
    out = d
  return out


def findings(results, grad_norms, depths) -> list:
  names = list(dict.fromkeys(name for name, _ in results))
  lines = []
  for i, title in enumerate(INITS.values()):
    parts = []
    for name in names:
      accs = [best(results[(name, d)], i)[1] for d in depths]
      lr, mean, lo, hi = best(results[(name, depths[-1])], i)
      parts.append(f'{name} up to L = {deepest_trained(accs, depths)} '
                   f'(at L = {depths[-1]}: {mean:.3f}, seeds {lo:.2f}-'
                   f'{hi:.2f}, lr {lr:g})')
    lines.append(f'- Init {title}: best-lr accuracy above 0.9 at every depth '
                 f'for ' + '; '.join(parts) + '.')
  deepest = depths[-1]
  for i, title in enumerate(INITS.values()):
    at = {name: best(results[(name, deepest)], i)[1] for name in names}
    others = max(v for k, v in at.items() if k != 'Fromage')
    verdict = ('held' if at['Fromage'] > others + 0.05 else 'did not hold'
               if at['Fromage'] < others - 0.05 else 'was a tie (within 0.05)')
    lines.append(f'- Figure 3\'s claim, that Fromage at its best learning rate '
                 f'trains deep networks SGD and Adam at theirs cannot, '
                 f'{verdict} at L = {deepest} under {title}: '
                 + ', '.join(f'{k} {v:.3f}' for k, v in at.items()) + '.')
  authors = []
  for name in names:
    accs = np.max(list(AUTHORS_LOGS[name].values()), axis=0)
    authors.append(f'{name} up to L = '
                   f'{deepest_trained(accs, AUTHORS_DEPTHS)} (at L = 50: '
                   f'{accs[-1]:.3f})')
  lines.append('- The authors\' logs (MNIST, width 784, 24,000 steps, one '
               'seed, their last-epoch minibatch metric, best of the three '
               'learning rates at our depths): ' + '; '.join(authors) + '.')
  for kind, title in INITS.items():
    norms = grad_norms[kind]
    factors = [decay_per_layer(n) for n in norms]
    lines.append(f'- Gradient norm at init, L = {norms.shape[1]}, full batch: '
                 f'under {title} `||dL/dW_l||` shrinks by '
                 f'x{np.mean(factors):.2f} per layer from the output toward '
                 f'the input (seeds {min(factors):.2f}-{max(factors):.2f}); '
                 f'last hidden layer {np.median(norms[:, -1]):.2g}, first '
                 f'{np.median(norms[:, 0]):.2g} (medians over seeds); '
                 f'{np.sum(norms == 0) / len(norms):.1f} of the '
                 f'{norms.shape[1]} hidden layers (mean over seeds) have a '
                 f'gradient that underflows to exactly 0 in float32, and '
                 f'{np.sum(norms / WIDTH < ADAM_EPS) / len(norms):.1f} a root-'
                 f'mean-square gradient entry below Adam\'s epsilon '
                 f'{ADAM_EPS:g}.')
  return lines


def summary(results, grad_norms, depths) -> str:
  lines = ['## Findings', ''] + findings(results, grad_norms, depths)
  for i, title in enumerate(INITS.values()):
    lines += ['', f'## Init: {title}', '',
              'Full-batch training accuracy after the last step: mean over '
              'seeds (min-max); **bold** = best learning rate per depth; '
              '"nan" = a seed diverged (non-finite loss; its accuracy counted '
              'as measured).', ''] + table(results, depths, i)
    lines += ['', 'The authors\' metric (mean minibatch accuracy over the '
              'last epoch), best learning rate per depth: mean over seeds '
              '(min-max):', '',
              '| optimizer | ' + ' | '.join(f'{d}' for d in depths) + ' |',
              '| --- |' + ' ---: |' * len(depths)]
    for name in dict.fromkeys(name for name, _ in results):
      cells = []
      for d in depths:
        lr, mean, lo, hi = best(results[(name, d)], i, 'last_epoch_acc')
        cells.append(f'{mean:.3f} ({lo:.2f}-{hi:.2f}) @ {lr:g}')
      lines.append(f'| {name} | ' + ' | '.join(cells) + ' |')
  bound = np.asarray(fromage_jax.descent_learning_rate_bound(
      np.asarray(depths) + 1))
  lines += ['', 'Lemma 2\'s bound on Fromage\'s eta for L + 1 matrices, '
            '`fromage_jax.descent_learning_rate_bound(L + 1)`: '
            + ', '.join(f'L = {d}: {b:.3g}' for d, b in zip(depths, bound,
                                                           strict=True))
            + '.']
  head = ' | '.join(f'{d}' for d in AUTHORS_DEPTHS)
  lines += ['', '## The authors\' logs', '',
            'From jxbz/fromage `make-plots/logs/mnist-depth/100_epochs/`: '
            'mean minibatch training accuracy over the last of 100 epochs '
            '(MNIST, width 784, batch 250), one seed per run:', '',
            f'| optimizer | lr | {head} |',
            '| --- | ---: |' + ' ---: |' * len(AUTHORS_DEPTHS)]
  for name, by_lr in AUTHORS_LOGS.items():
    for lr, accs in by_lr.items():
      lines.append(f'| {name} | {lr:g} | '
                   + ' | '.join(f'{a:.3f}' for a in accs) + ' |')
  lines += ['', 'Wall time per (optimizer, depth), all learning rates, seeds '
            'and both inits vmapped, compile included (s):', '',
            '| optimizer | ' + ' | '.join(f'{d}' for d in depths) + ' |',
            '| --- |' + ' ---: |' * len(depths)]
  for name in dict.fromkeys(name for name, _ in results):
    lines.append(f'| {name} | '
                 + ' | '.join(f'{results[(name, d)]["wall"]:.1f}'
                              for d in depths) + ' |')
  return '\n'.join(lines)


PROTOCOL = """\
## The authors' protocol and ours

| | the authors (`classify-mnist/depth.ipynb`) | here |
| --- | --- | --- |
| data | MNIST, 60,000 images, normalised by its global mean and std | scikit-learn's digits (offline), 1,797 images, standardised per pixel |
| width | 784 (the input size) | 64 (the input size) |
| depth L | hidden 784x784 layers (1 to 50), plus the output layer: L + 1 matrices | the same count, {depths} |
| layers | `nn.Linear`: weight and bias on every layer; ReLU | the same |
| init | PyTorch's default: weights and biases from U(-1/sqrt(fan_in), 1/sqrt(fan_in)) (weight variance 1/(3 fan_in)) | the same, and a second run with He-normal weights N(0, 2/fan_in) (biases unchanged) |
| Fromage | each weight and each bias tensor a layer | the same (stacked leaves with `layer_axes`; each slice a layer) |
| optimizers, grids | Fromage {{0.1, 0.01, 0.001}}, SGD momentum 0.9 {{1, 0.1, 0.01}}, Adam {{1e-2, 1e-3, 1e-4}} (PyTorch defaults otherwise) | the same (optax's defaults agree: Adam eps 1e-8, SGD momentum without dampening) |
| budget | 100 epochs of 240 steps (24,000), batch 250 | {epochs} "epochs" of {spe} steps ({steps:,}), batch 250 ({passes:.0f} passes over the digits) |
| decay | x0.95 per epoch | x0.95 per "epoch" ({spe} steps): the same 100-stage schedule |
| seeds | one per run (a new seed for every depth and learning rate) | {seeds} seeds, the same for every optimizer and learning rate |
| metric | mean minibatch accuracy of the last epoch; the plot takes, at each step, the best of the three learning rates, and fits a line through Fromage's 10 deepest points (figure 3 right: three points set by hand) | full-batch training accuracy after the last step, best learning rate by mean over seeds; the authors' metric beside it |

What was cut for the 2-core CPU: the budget ({steps:,} steps, {frac:.1%} of
the authors' 24,000, with the same 100-stage decay compressed into it), the
depths ({ndepths} of their 30) and the data and width (the digits at width
64 instead of MNIST at 784). Seeds were added (theirs: one per run).

Why the init decides it: PyTorch's default init has weight variance
1/(3 fan_in), a sixth of what keeps a ReLU layer's signal level (2/fan_in), so
the forward signal shrinks by about sqrt(6) per layer until the biases
dominate it, and the backward signal keeps shrinking all the way down: the
gradient of the first layers of a deep net is tiny (below float32's range
at L = 50). SGD's step is proportional to the gradient, so those layers do
not move; Adam's, `m / (sqrt(v) + eps)`, is about lr wherever the gradient
is well above eps = 1e-8, but shrinks in proportion to it below that.
Fromage moves every layer by eta relative to its norm whatever its
gradient's size (a layer whose gradient is exactly 0 only shrinks by
`1/sqrt(1+eta^2)`), so it can still train. He-normal init keeps the
gradient level across layers, so all three start on equal terms.
"""


def to_data(results, grad_norms, cfg, wall, mode) -> dict:
  """A run as plain values: what `--json` writes and `render` reads."""
  runs = {}
  for (name, d), r in results.items():
    runs.setdefault(name, {})[d] = dict(
        lrs=r['lrs'], acc=r['acc'], loss=r['loss'],
        last_epoch_acc=r['last_epoch_acc'], wall=r['wall'],
        best={kind: dict(zip(('lr', 'mean', 'min', 'max'), best(r, i),
                             strict=True))
              for i, kind in enumerate(INITS)})
  return dict(mode=mode, machine=_common.machine(), config=cfg, wall=wall,
              inits=list(INITS), runs=runs, grad_norms=grad_norms,
              decay_per_layer={k: [decay_per_layer(n) for n in v]
                               for k, v in grad_norms.items()})


def render(data: dict, out: str) -> tuple[str, str, str]:
  """Writes `depth.png` and `depth.md` into `out` from a run's data (or its
  JSON); returns their paths and the Markdown body."""
  cfg, wall = data['config'], data['wall']
  results = {(name, int(d)): dict(
      lrs=tuple(r['lrs']), wall=r['wall'],
      **{k: np.asarray(r[k], dtype=float)
         for k in ('acc', 'loss', 'last_epoch_acc')})
             for name, by_depth in data['runs'].items()
             for d, r in by_depth.items()}
  grad_norms = {k: np.asarray(v, dtype=float)
                for k, v in data['grad_norms'].items()}
  depths = list(cfg['depths'])
  os.makedirs(out, exist_ok=True)
  png = os.path.join(out, f'{NAME}.png')
  plot(results, grad_norms, depths, png)
  steps = cfg['epochs'] * cfg['steps_per_epoch']
  protocol = PROTOCOL.format(
      depths=depths, epochs=cfg['epochs'], spe=cfg['steps_per_epoch'],
      steps=steps, passes=steps * cfg['batch_size'] / 1797,
      seeds=len(cfg['seeds']), frac=steps / 24_000, ndepths=len(depths))
  settings = (
      f'Mode: {data["mode"]}. Seeds {list(cfg["seeds"])}: init from '
      f'`jax.random.key(seed)`, shuffles from '
      f'`numpy.random.default_rng(seed + 1000)`, the same for every optimizer '
      f'and learning rate (both inits share the shuffles). Fromage = '
      f'`fromage_jax.fromage(schedule, layer_axes=stacked_layer_axes('
      f'"hidden"))`, SGD = `optax.sgd(schedule, momentum=0.9)`, Adam = '
      f'`optax.adam(schedule)`, schedule = `optax.exponential_decay(lr, '
      f'{cfg["steps_per_epoch"]}, {cfg["decay"]}, staircase=True)`.\n\n'
      f'Machine: {data["machine"]}. Total wall time: {wall:.1f} s '
      f'({wall / 60:.1f} min).')
  body = f'{settings}\n\n{protocol}\n{summary(results, grad_norms, depths)}\n'
  md = _common.write_markdown(out, NAME, 'Figure 3: training accuracy '
                              'against depth (digits)', body)
  return png, md, body


def main(argv=None):
  parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  _common.add_common_args(parser)
  parser.add_argument('--steps-per-epoch', type=int, default=None,
                      help='override the mode\'s steps per "epoch"')
  parser.add_argument('--render', metavar='JSON', default=None,
                      help='write the Markdown and PNG from the --json file '
                      'of an earlier run instead of training')
  args = parser.parse_args(argv)
  if args.render:
    with open(args.render) as f:
      data = json.load(f)
  else:
    cfg = dict(QUICK if args.quick else FULL)
    if args.steps_per_epoch:
      cfg['steps_per_epoch'] = args.steps_per_epoch
    start = time.perf_counter()
    results, grad_norms = run(**cfg)
    data = to_data(results, grad_norms, cfg, time.perf_counter() - start,
                   'quick' if args.quick else 'full')
    if args.json:
      _common.write_json(args.json, data)
  png, md, body = render(data, args.out)
  print(f'{body}\nwrote {png} and {md}')
  return dict(data=data, png=png, md=md)


if __name__ == '__main__':
  main()
