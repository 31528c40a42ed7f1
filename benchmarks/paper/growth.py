"""The paper's figure 2: compounding weight growth without Fromage's prefactor.

A ReLU MLP whose every layer is scale-invariant (it uses `W / ||W||_F`, times a
fixed gain, in place of `W`: a stand-in for spectral or layer normalisation)
is trained on scikit-learn's digits with the LARS-style rule
`optax.chain(fromage_jax.scale_by_frobenius_ratio(),
optax.scale_by_learning_rate(eta))` and with `fromage_jax.fromage(eta)`, from
the same initialisation on the same batches. The gradient of a scale-invariant
layer is orthogonal to `W`, so by Pythagoras each LARS step multiplies
`||W||` by `sqrt(1 + eta**2)`: `||W_t|| = (1 + eta**2)**(t/2) ||W_0||`, until
float32 overflows. Fromage's `1/sqrt(1 + eta**2)` prefactor keeps it flat.

    python -m benchmarks.paper.growth [--quick] [--out DIR]
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

NAME = 'growth'
TITLE = 'Figure 2: compounding growth of scale-invariant layers (digits)'
# 10,000 steps: long enough for LARS at eta = 0.1 to overflow float32
# (||W||^2 > 3.4e38 near t = 2 ln(1.8e19) / ln(1.01), about 8,900 steps).
FULL = dict(etas=(0.01, 0.03, 0.1), steps=10_000, depth=4, width=64,
            batch_size=128, seed=0)
QUICK = dict(etas=(0.1,), steps=200, depth=3, width=32, batch_size=128,
             seed=0)

def scale_invariant_mlp(params, x):
  """Each layer multiplies by `sqrt(2 d_out) W / ||W||`: invariant to `||W||`."""
  for i, w in enumerate(params):
    x = x @ (w * (jnp.sqrt(2.0 * w.shape[1]) / jnp.linalg.norm(w)))
    if i < len(params) - 1:
      x = jax.nn.relu(x)
  return x


def optimizer(rule: str, eta):
  """`eta` may be traced (the runs for all etas are vmapped)."""
  if rule == 'lars':
    return optax.chain(fromage_jax.scale_by_frobenius_ratio(),
                       optax.scale_by_learning_rate(eta))
  # A constant schedule: lets `eta` be a traced value.
  return fromage_jax.fromage(lambda count: eta)


def make_train(rule, x, y, steps, batch_size):
  def loss(params, xb, yb):
    return _common.loss_fn(params, xb, yb, model=scale_invariant_mlp)

  def train_one(eta, params, batches):
    tx = optimizer(rule, eta)

    def step(carry, idx):
      params, state = carry
      value, grads = jax.value_and_grad(loss)(params, x[idx], y[idx])
      cos = [jnp.vdot(g, w) / (jnp.linalg.norm(g) * jnp.linalg.norm(w))
             for g, w in zip(grads, params, strict=True)]
      updates, state = tx.update(grads, state, params)
      params = optax.apply_updates(params, updates)
      norms = jnp.stack([jnp.linalg.norm(w) for w in params])
      dead = jnp.any(jnp.stack([jnp.all(g == 0) for g in grads]))
      return (params, state), (norms, value,
                               jnp.max(jnp.abs(jnp.stack(cos))), dead)

    _, out = jax.lax.scan(step, (params, tx.init(params)), batches)
    return out

  return jax.jit(jax.vmap(train_one, in_axes=(0, None, None)))


def batches_for(key, n, steps, batch_size):
  per_epoch = n // batch_size
  epochs = -(-steps // per_epoch)
  keys = jax.random.split(key, epochs)
  perms = [jax.random.permutation(k, n)[: per_epoch * batch_size] for k in keys]
  return jnp.concatenate(perms).reshape(-1, batch_size)[:steps]


def run(etas, steps, depth, width, batch_size, seed):
  x, y = _common.load_digits()
  params = _common.init_mlp(jax.random.key(seed),
                            _common.mlp_sizes(depth, width))
  batches = batches_for(jax.random.key(seed + 1), x.shape[0], steps,
                        batch_size)
  norms0 = np.array([float(jnp.linalg.norm(w)) for w in params])
  results = {}
  for rule in tqdm(('lars', 'fromage'), desc=NAME, unit='optimizer'):
    train = make_train(rule, x, y, steps, batch_size)
    norms, losses, cos, dead = train(jnp.asarray(etas, jnp.float32), params, batches)
    for i, eta in enumerate(etas):
      rel = np.asarray(norms[i]) / norms0  # [steps, layers]
      results[(rule, eta)] = dict(
          rel=rel, loss=np.asarray(losses[i]),
          # Over the steps whose gradients are finite and non-zero.
          max_cos=float(np.max(np.where(np.isfinite(cos[i]), cos[i], 0))),
          zero_grad_steps=int(np.sum(dead[i])))
  return results


def prediction(eta, t):
  return (1 + eta**2) ** (np.asarray(t) / 2)


def late_steps(steps):
  """The last 10% of the run: one minibatch's loss near zero swings by orders
  of magnitude with float rounding (0.333 against 3.1e-5 in two runs)."""
  return max(1, steps // 10)


def late_loss(losses):
  return float(np.mean(losses[-late_steps(len(losses)):]))


def first_nonfinite(rel):
  bad = ~np.isfinite(rel).all(axis=1)
  return int(np.argmax(bad)) + 1 if bad.any() else None


def curve(r) -> dict:
  """What the figure draws of a run, at the end of each of about 100 windows
  of steps: the norm ratios, and the mean minibatch loss over the window
  (the loss is noisy)."""
  w = max(1, len(r['loss']) // 100)
  m = len(r['loss']) // w * w
  return dict(step=np.arange(w, m + 1, w), norm_ratio=r['rel'][w - 1:m:w],
              loss=r['loss'][:m].reshape(-1, w).mean(1))


def plot(results, etas, path=None):
  return plot_curves({key: curve(r) for key, r in results.items()}, etas,
                     path)


def draw(data, path):
  return plot_curves({(r['rule'], r['eta']): r['curve']
                      for r in data['runs'].values()},
                     data['config']['etas'], path)


def plot_curves(curves, etas, path=None):
  """`curves[(rule, eta)]` as `curve` makes them."""
  import matplotlib as mpl

  fig, axes = _common.figure(2, width=5.2, height=4.0)
  ax_n, ax_l = axes[0]
  colors = mpl.colormaps['tab10'](np.arange(len(etas)))
  for c, eta in zip(colors, etas, strict=True):
    for rule, style in (('lars', '-'), ('fromage', '--')):
      r = curves[(rule, eta)]
      label = f'{"LARS" if rule == "lars" else "Fromage"} $\\eta$={eta:g}'
      with np.errstate(all='ignore'):
        geo = np.exp(np.log(np.asarray(r['norm_ratio'])).mean(axis=1))
      ax_n.plot(r['step'], geo, style, color=c, lw=1.8, label=label)
      ax_l.plot(r['step'], r['loss'], style, color=c, lw=1.2, label=label)
    t = np.asarray(curves[('lars', eta)]['step'])
    pred = prediction(eta, t)
    ax_n.plot(t[pred < 3e38], pred[pred < 3e38], ':', color='k', lw=1)
  ax_n.plot([], [], ':', color='k', label=r'$(1+\eta^2)^{t/2}$')
  ax_n.set_yscale('log')
  ax_n.set_xlabel('step t')
  ax_n.set_ylabel(r'$\|W_t\|_F / \|W_0\|_F$ (geometric mean over layers)')
  ax_n.set_title('weight norm, scale-invariant layers')
  ax_n.legend(fontsize=7)
  ax_l.set_yscale('log')
  ax_l.set_xlabel('step t')
  ax_l.set_ylabel('minibatch training loss (window mean)')
  ax_l.set_title('training loss')
  fig.suptitle('Figure 2 on digits: LARS (no prefactor) vs Fromage')
  fig.tight_layout()
  if path:
    fig.savefig(path, dpi=110)
  return fig


def to_data(results, cfg, wall, mode) -> dict:
  """A run as plain values: what its JSON holds."""
  steps = cfg['steps']
  runs = {f'{rule}/{eta:g}': dict(
      rule=rule, eta=eta, final_norm_ratio=r['rel'][-1],
      prediction=prediction(eta, steps),
      first_nonfinite_step=first_nonfinite(r['rel']),
      first_loss=r['loss'][0], late_loss=late_loss(r['loss']),
      max_cos=r['max_cos'], zero_grad_steps=r['zero_grad_steps'],
      curve=curve(r)) for (rule, eta), r in results.items()}
  return dict(common.run_info(f'benchmarks.paper.{NAME}', mode, wall, cfg),
              runs=runs)


def tables(data) -> list:
  steps = data['config']['steps']
  rows = []
  for r in data['runs'].values():
    last = np.asarray(r['final_norm_ratio'], float)
    bad = r['first_nonfinite_step']
    rows.append([
        'LARS' if r['rule'] == 'lars' else 'Fromage', f'{r["eta"]:g}',
        f'{np.nanmin(last):.6g} / {np.max(last):.6g}',
        f'{r["prediction"]:.6g}', 'none' if bad is None else str(bad),
        f'{r["late_loss"]:.3g}', f'{r["max_cos"]:.2g}',
        f'{r["zero_grad_steps"]:.0f}'])
  return [render.Table(
      ['rule', 'eta', f'norm ratio at step {steps} (min / max over layers)',
       '(1+eta^2)^(t/2)', 'first non-finite step',
       f'mean minibatch loss, last {late_steps(steps)} steps',
       'max abs cos(g, W)', 'steps with a zero layer gradient'], rows,
      title='Norms and losses',
      note='A norm ratio is `||W_t|| / ||W_0||`, nan where it overflowed.',
      left=2)]


def main(argv=None):
  parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  _common.add_common_args(parser)
  args = parser.parse_args(argv)
  mode = 'quick' if args.quick else 'full'
  cfg = dict(QUICK if args.quick else FULL)
  start = time.perf_counter()
  results = run(**cfg)
  data = to_data(results, cfg, time.perf_counter() - start, mode)
  return _common.publish(args, NAME, data)


if __name__ == '__main__':
  main()
