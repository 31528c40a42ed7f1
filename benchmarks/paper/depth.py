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
import time
import warnings

import jax
import jax.numpy as jnp
import numpy as np
import optax
from tqdm.auto import tqdm

from benchmarks import common
from benchmarks import render
from benchmarks.paper import _common
import fromage_jax

NAME = 'depth'
TITLE = 'Figure 3: training accuracy against depth (digits)'
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


def deepest_trained(accs, depths, threshold=0.9):
  """The largest depth up to which every accuracy exceeds `threshold`."""
  out = None
  for d, a in zip(depths, accs, strict=True):
    if a <= threshold:
      break
    out = d
  return out


def to_data(results, grad_norms, cfg, wall, mode) -> dict:
  """A run as plain values: what its JSON holds."""
  runs = {}
  for (name, d), r in results.items():
    runs.setdefault(name, {})[d] = dict(
        lrs=r['lrs'], acc=r['acc'], loss=r['loss'],
        last_epoch_acc=r['last_epoch_acc'], wall=r['wall'],
        best={kind: dict(zip(('lr', 'mean', 'min', 'max'), best(r, i),
                             strict=True))
              for i, kind in enumerate(INITS)})
  return dict(common.run_info(f'benchmarks.paper.{NAME}', mode, wall, cfg),
              inits=list(INITS), runs=runs, grad_norms=grad_norms,
              decay_per_layer={k: [decay_per_layer(n) for n in v]
                               for k, v in grad_norms.items()})


def from_data(data):
  """`run`'s results and gradient norms from a run's JSON."""
  results = {(name, int(d)): dict(
      lrs=tuple(r['lrs']), wall=r['wall'],
      **{k: np.asarray(r[k], dtype=float)
         for k in ('acc', 'loss', 'last_epoch_acc')})
             for name, by_depth in data['runs'].items()
             for d, r in by_depth.items()}
  grad_norms = {k: np.asarray(v, dtype=float)
                for k, v in data['grad_norms'].items()}
  return results, grad_norms


def draw(data, path):
  return plot(*from_data(data), list(data['config']['depths']), path)


def tables(data) -> list:
  results, grad_norms = from_data(data)
  depths = list(data['config']['depths'])
  names = list(data['runs'])
  out = []
  for i, title in enumerate(INITS.values()):
    rows = []
    for name in names:
      for j, lr in enumerate(results[(name, depths[0])]['lrs']):
        cells = []
        for d in depths:
          r = results[(name, d)]
          vals = r['acc'][j, i]
          cell = f'{vals.mean():.3f} ({vals.min():.2f}-{vals.max():.2f})'
          if not np.all(np.isfinite(r['loss'][j, i])):
            cell += ' nan'
          if best(r, i)[0] == lr:
            cell = f'**{cell}**'
          cells.append(cell)
        rows.append([name, f'{lr:g}', *cells])
    out.append(render.Table(
        ['optimizer', 'lr', *map(str, depths)], rows,
        title=f'Init: {title}', left=2,
        note='Full-batch training accuracy after the last step at each '
        'depth L: mean over seeds (min-max); **bold** = best learning rate '
        'per depth; "nan" = a seed diverged (non-finite loss; its accuracy '
        'counted as measured).'))
    out.append(render.Table(
        ['optimizer', *map(str, depths)],
        [[name, *(f'{m:.3f} ({lo:.2f}-{hi:.2f}) @ {lr:g}' for lr, m, lo, hi
                  in (best(results[(name, d)], i, 'last_epoch_acc')
                      for d in depths))] for name in names],
        title=f'Init: {title}, the authors\' metric',
        note='Mean minibatch accuracy over the last epoch, best learning '
        'rate per depth: mean over seeds (min-max) @ lr.'))
  rows = []
  for i, title in enumerate(INITS.values()):
    for name in names:
      accs = [best(results[(name, d)], i)[1] for d in depths]
      lr, mean, lo, hi = best(results[(name, depths[-1])], i)
      rows.append([title, name, str(deepest_trained(accs, depths)),
                   f'{mean:.3f} ({lo:.2f}-{hi:.2f}) @ {lr:g}'])
  out.append(render.Table(
      ['init', 'optimizer', 'deepest L above 0.9',
       f'accuracy at L = {depths[-1]}'], rows, title='Deepest trained',
      note='The largest L up to which the best-lr accuracy (mean over '
      'seeds) is above 0.9 at every depth; the accuracy at the deepest L: '
      'mean (min-max) @ lr.', left=2))
  rows = []
  for kind, title in INITS.items():
    norms = grad_norms[kind]
    factors = data['decay_per_layer'][kind]
    rows.append([title, f'{np.mean(factors):.2f} ({min(factors):.2f}-'
                 f'{max(factors):.2f})', f'{np.median(norms[:, -1]):.2g}',
                 f'{np.median(norms[:, 0]):.2g}',
                 f'{np.sum(norms == 0) / len(norms):.1f}',
                 f'{np.sum(norms / WIDTH < ADAM_EPS) / len(norms):.1f}'])
  out.append(render.Table(
      ['init', 'shrinks per layer toward the input', 'last hidden layer',
       'first hidden layer', 'layers at 0', f'layers below eps {ADAM_EPS:g}'],
      rows, title=f'Gradient norm at init, L = {norms.shape[1]}',
      note='`||dL/dW_l||` of each hidden layer, full batch: the factor per '
      'layer (mean over seeds, min-max), the last and first layers\' norms '
      '(medians over seeds), and how many layers (mean over seeds) have a '
      'gradient that underflows to exactly 0 in float32 or a root-mean-'
      'square entry below Adam\'s epsilon.'))
  bound = np.asarray(fromage_jax.descent_learning_rate_bound(
      np.asarray(depths) + 1))
  out.append(render.Table(
      ['L', *map(str, depths)],
      [['Lemma 2\'s bound on eta', *(f'{b:.3g}' for b in bound)],
       *([name, *(f'{results[(name, d)]["wall"]:.1f}' for d in depths)]
         for name in names)],
      title='Lemma 2 and wall times per depth',
      note='`fromage_jax.descent_learning_rate_bound(L + 1)`; then the wall '
      'time (s) of each (optimizer, depth): all learning rates, seeds and '
      'both inits vmapped, compile included.'))
  return out


def main(argv=None):
  parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  _common.add_common_args(parser)
  parser.add_argument('--steps-per-epoch', type=int, default=None,
                      help='override the mode\'s steps per "epoch"')
  parser.add_argument('--render', metavar='JSON', default=None,
                      help='write the Markdown and PNG from the JSON of an '
                      'earlier run instead of training')
  args = parser.parse_args(argv)
  if args.render:
    return _common.publish(args, NAME, None)
  cfg = dict(QUICK if args.quick else FULL)
  if args.steps_per_epoch:
    cfg['steps_per_epoch'] = args.steps_per_epoch
  start = time.perf_counter()
  results, grad_norms = run(**cfg)
  data = to_data(results, grad_norms, cfg, time.perf_counter() - start,
                 'quick' if args.quick else 'full')
  return _common.publish(args, NAME, data)


if __name__ == '__main__':
  main()
