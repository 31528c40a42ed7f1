"""The paper's figure 1: loss and gradient along relative gradient perturbations.

ReLU MLPs of depth 2 and 16 (no biases) are trained with
`fromage_jax.fromage` on scikit-learn's digits. At checkpoints during training
the network is frozen, the full-batch gradient `g_l` of every layer is taken,
and every layer is perturbed to `W_l - eta * g_l * ||W_l|| / ||g_l||` for
`eta` on a log grid. We record the full-batch loss and the relative change in
the input layer's gradient `||g~_1 - g_1|| / ||g_1||`, next to deep relative
trust's prediction `(1 + eta)**L - 1` (`fromage_jax.deep_relative_trust` of the
perturbed params: every layer moves by exactly `eta` relative to its norm).

    python -m benchmarks.paper.perturbation [--quick] [--out DIR]
"""

import argparse
import time

import jax
import jax.numpy as jnp
import numpy as np
import optax
from tqdm.auto import tqdm

from benchmarks import common
from benchmarks import render
from benchmarks.paper import _common
import fromage_jax

NAME = 'perturbation'
TITLE = 'Figure 1: perturbation study (digits)'
FULL = dict(depths=(2, 16), width=128, epochs=40, checkpoints=10,
            etas=tuple(np.logspace(-3, 0, 13)), batch_size=128, lr=0.01,
            seed=0)
QUICK = dict(depths=(2, 16), width=32, epochs=4, checkpoints=3,
             etas=tuple(np.logspace(-3, 0, 7)), batch_size=128, lr=0.01,
             seed=0)

def perturb(params, grads, eta):
  """Every layer to `W - eta * g * ||W|| / ||g||`."""
  return [
      w - eta * g * jnp.linalg.norm(w) / jnp.linalg.norm(g)
      for w, g in zip(params, grads, strict=True)
  ]


@jax.jit
def probe(params, x, y, etas):
  """Loss, input-layer relative gradient change and DRT along the slice."""
  grads = jax.grad(_common.loss_fn)(params, x, y)

  def one(eta):
    moved = perturb(params, grads, eta)
    loss, moved_grads = jax.value_and_grad(_common.loss_fn)(moved, x, y)
    change = (jnp.linalg.norm(moved_grads[0] - grads[0])
              / jnp.linalg.norm(grads[0]))
    return loss, change, fromage_jax.deep_relative_trust(params, moved)

  return jax.vmap(one)(etas)


def make_epoch(tx, x, y, batch_size):
  def step(carry, idx):
    params, state = carry
    loss, grads = jax.value_and_grad(_common.loss_fn)(params, x[idx], y[idx])
    updates, state = tx.update(grads, state, params)
    return (optax.apply_updates(params, updates), state), loss

  @jax.jit
  def epoch(params, state, key):
    perm = jax.random.permutation(key, x.shape[0])
    n = (x.shape[0] // batch_size) * batch_size
    (params, state), losses = jax.lax.scan(
        step, (params, state), perm[:n].reshape(-1, batch_size))
    return params, state, losses.mean()

  return epoch


def run_depth(depth, *, width, epochs, checkpoints, etas, batch_size, lr,
              seed, bar=None):
  """Trains one MLP with Fromage; probes it at `checkpoints` epochs."""
  x, y = _common.load_digits()
  params = _common.init_mlp(jax.random.key(seed),
                            _common.mlp_sizes(depth, width))
  tx = fromage_jax.fromage(lr)
  state = tx.init(params)
  epoch = make_epoch(tx, x, y, batch_size)
  probe_at = sorted(set(np.linspace(0, epochs, checkpoints).round().astype(int)))
  keys = jax.random.split(jax.random.key(seed + 1), epochs)
  etas_arr = jnp.asarray(etas, jnp.float32)
  out = []
  for e in range(epochs + 1):
    if e in probe_at:
      loss, change, drt = probe(params, x, y, etas_arr)
      out.append(dict(
          epoch=e,
          loss0=float(_common.loss_fn(params, x, y)),
          acc=float(_common.accuracy(params, x, y)),
          loss=np.asarray(loss), change=np.asarray(change),
          drt=np.asarray(drt)))
    if e < epochs:
      params, state, _ = epoch(params, state, keys[e])
    if bar is not None:
      bar.update()
  return out


def run(depths, **cfg):
  bar = tqdm(total=len(depths) * (cfg['epochs'] + 1), desc=NAME, unit='epoch')
  results = {d: run_depth(d, bar=bar, **cfg) for d in depths}
  bar.close()
  return results


def _at(etas, values, eta):
  return values[int(np.argmin(np.abs(np.log(np.asarray(etas)) - np.log(eta))))]


def plot(results, etas, path=None):
  """Loss and relative gradient change against eta, one row per depth."""
  import matplotlib as mpl

  fig, axes = _common.figure(2, len(results), width=4.6, height=3.4)
  etas = np.asarray(etas)
  for row, (depth, ckpts) in enumerate(results.items()):
    colors = mpl.colormaps['viridis'](np.linspace(0, 0.9, len(ckpts)))
    ax_loss, ax_g = axes[row]
    for c, ck in zip(colors, ckpts, strict=True):
      label = f'epoch {ck["epoch"]}'
      ax_loss.plot(etas, ck['loss'], color=c, label=label)
      ax_g.plot(etas, ck['change'], color=c, label=label)
    ax_g.plot(etas, ckpts[-1]['drt'], 'k--', lw=2,
              label=f'DRT $(1+\\eta)^{{{depth}}}-1$')
    ax_loss.set_ylabel('full-batch loss')
    ax_g.set_ylabel(r'$\|\tilde g_1 - g_1\|_F / \|g_1\|_F$')
    for ax in (ax_loss, ax_g):
      ax.set_xscale('log')
      ax.set_yscale('log')
      ax.set_xlabel(r'perturbation strength $\eta$')
      ax.set_title(f'depth {depth}')
    ax_g.legend(fontsize=6, ncol=2)
  fig.suptitle('Figure 1 on digits: perturbing every layer by '
               r'$\eta\,\|W_l\|\,g_l/\|g_l\|$ (Fromage-trained MLPs)')
  fig.tight_layout()
  if path:
    fig.savefig(path, dpi=110)
  return fig


def draw(data, path):
  depths = {int(d): ckpts for d, ckpts in data['depths'].items()}
  return plot(depths, data['config']['etas'], path)


def tables(data) -> list:
  etas = data['config']['etas']
  out, spread = [], []
  for depth, ckpts in data['depths'].items():
    def trio(ck, key):
      return ' / '.join(f'{_at(etas, ck[key], e):.3g}' for e in (0.01, 0.1, 1))

    out.append(render.Table(
        ['epoch', 'train loss', 'train acc', 'loss at eta 0.01 / 0.1 / 1',
         'grad change at eta 0.01 / 0.1 / 1',
         'DRT (1+eta)^L-1 at 0.01 / 0.1 / 1'],
        [[f'{ck["epoch"]:.0f}', f'{ck["loss0"]:.4f}', f'{ck["acc"]:.4f}',
          trio(ck, 'loss'), trio(ck, 'change'), trio(ck, 'drt')]
         for ck in ckpts], title=f'depth {depth}', left=0))
    growth = [_at(etas, ck['change'], 1.0) / _at(etas, ck['change'], 0.1)
              for ck in ckpts]
    below = np.mean([np.mean(np.asarray(ck['change'])
                             <= np.asarray(ck['drt']) * (1 + 1e-4))
                     for ck in ckpts])
    spread.append([depth, f'{np.median(growth):.3g}', f'{min(growth):.3g}',
                   f'{max(growth):.3g}', f'{below:.2f}'])
  out.append(render.Table(
      ['depth', 'median', 'min', 'max', 'at or under DRT'], spread,
      title='Grad change at eta = 1 over that at eta = 0.1',
      note='Over the checkpoints; 10 for a change linear in eta. The last '
      'column: the fraction of (checkpoint, eta) points where the measured '
      'change is at most deep relative trust\'s.', left=0))
  return out


def main(argv=None):
  parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  _common.add_common_args(parser)
  args = parser.parse_args(argv)
  mode = 'quick' if args.quick else 'full'
  cfg = dict(QUICK if args.quick else FULL)
  start = time.perf_counter()
  results = run(**cfg)
  data = dict(common.run_info(f'benchmarks.paper.{NAME}', mode,
                              time.perf_counter() - start, cfg),
              depths=results)
  return _common.publish(args, NAME, data)


if __name__ == '__main__':
  main()
