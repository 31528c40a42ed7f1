"""Main job: Fromage against optax's optimizers on scikit-learn's digits.

Trains one MLP (zero-initialised biases, as most frameworks do) from the same
initialisation on the same batches with `fromage_jax.fromage(0.01)`,
`fromage_jax.fromage_on_plateau(0.01)` (the paper's protocol),
`optax.fromage(0.01)`, `optax.adam(1e-3)` and `optax.sgd(0.1)`; prints a table
of final train/test accuracy, loss and wall time, and writes the loss curves
as a PNG and the table as Markdown.

    python -m fromage_jax.demo [--epochs 60] [--out demo_results]
"""

import argparse
import importlib
import os
import platform
import sys
import time

import jax
import jax.numpy as jnp
import numpy as np
import optax

import fromage_jax


def _require(module: str):
  try:
    return importlib.import_module(module)
  except ImportError:
    sys.exit(
        f'The demo needs {module.split(".")[0]}, from the "examples" extra: '
        'python3 -m pip install -e ".[examples]"'
    )


def load_digits(seed: int):
  """Standardised digits, split 80/20 with a fixed seed."""
  datasets = _require('sklearn.datasets')
  model_selection = _require('sklearn.model_selection')
  x, y = datasets.load_digits(return_X_y=True)
  x_tr, x_te, y_tr, y_te = model_selection.train_test_split(
      x.astype(np.float32), y, test_size=0.2, random_state=seed, stratify=y
  )
  # Some pixels are constant in the training split: leave those unscaled.
  mean, std = x_tr.mean(0), x_tr.std(0)
  std = np.where(std > 0, std, 1.0)
  return (x_tr - mean) / std, y_tr, (x_te - mean) / std, y_te


def init_mlp(key, sizes):
  """He-initialised weights and zero biases."""
  params = []
  keys = jax.random.split(key, len(sizes) - 1)
  for k, d_in, d_out in zip(keys, sizes[:-1], sizes[1:], strict=True):
    w = jax.random.normal(k, (d_in, d_out)) * jnp.sqrt(2.0 / d_in)
    params.append({'w': w, 'b': jnp.zeros(d_out)})
  return params


def mlp(params, x):
  for layer in params[:-1]:
    x = jax.nn.relu(x @ layer['w'] + layer['b'])
  return x @ params[-1]['w'] + params[-1]['b']


def loss_fn(params, x, y):
  logits = mlp(params, x)
  return optax.softmax_cross_entropy_with_integer_labels(logits, y).mean()


def evaluate(params, x, y):
  logits = mlp(params, x)
  loss = optax.softmax_cross_entropy_with_integer_labels(logits, y).mean()
  return float(loss), float(jnp.mean(jnp.argmax(logits, -1) == y))


def make_epoch(tx, x, y, batch_size):
  """One jitted epoch: a scan over the batches of a given permutation."""

  # Optimizers that take the loss (decay on plateau) get it; others ignore it.
  tx = optax.with_extra_args_support(tx)

  def step(carry, idx):
    params, state = carry
    loss, grads = jax.value_and_grad(loss_fn)(params, x[idx], y[idx])
    updates, state = tx.update(grads, state, params, value=loss)
    return (optax.apply_updates(params, updates), state), loss

  @jax.jit
  def epoch(params, state, perm):
    n = (perm.shape[0] // batch_size) * batch_size
    batches = perm[:n].reshape(-1, batch_size)
    (params, state), losses = jax.lax.scan(step, (params, state), batches)
    return params, state, losses

  return epoch


def optimizers(steps_per_epoch: int) -> dict:
  """The optimizers compared, by name."""
  return {
      'fromage_jax.fromage(0.01)': fromage_jax.fromage(0.01),
      # The paper's protocol: eta / 10 when the epoch's mean loss plateaus.
      'fromage_jax.fromage_on_plateau(0.01)': fromage_jax.fromage_on_plateau(
          0.01, patience=3, accumulation_size=steps_per_epoch
      ),
      'optax.fromage(0.01)': optax.fromage(0.01),
      'optax.adam(1e-3)': optax.adam(1e-3),
      'optax.sgd(0.1)': optax.sgd(0.1),
  }


def run(epochs: int, batch_size: int, hidden: int, depth: int, seed: int):
  """Trains every optimizer; returns {name: results dict}."""
  tqdm = _require('tqdm.auto').tqdm
  x_tr, y_tr, x_te, y_te = load_digits(seed)
  x_tr, y_tr = jnp.asarray(x_tr), jnp.asarray(y_tr)
  sizes = [x_tr.shape[1]] + [hidden] * (depth - 1) + [10]
  params0 = init_mlp(jax.random.key(seed), sizes)
  perm_keys = jax.random.split(jax.random.key(seed + 1), epochs)
  perms = [jax.random.permutation(k, x_tr.shape[0]) for k in perm_keys]

  txs = optimizers(steps_per_epoch=x_tr.shape[0] // batch_size)
  results = {}
  bar = tqdm(total=epochs * len(txs), desc='training', unit='epoch')
  for name, tx in txs.items():
    epoch = make_epoch(tx, x_tr, y_tr, batch_size)
    params, state = params0, tx.init(params0)
    curve = []
    start = time.perf_counter()
    for perm in perms:
      params, state, losses = epoch(params, state, perm)
      curve.append(float(losses.mean()))
      bar.set_postfix_str(f'{name}: loss {curve[-1]:.3f}')
      bar.update()
    wall = time.perf_counter() - start
    train_loss, train_acc = evaluate(params, x_tr, y_tr)
    test_loss, test_acc = evaluate(params, x_te, y_te)
    biases = [float(jnp.linalg.norm(p['b'])) for p in params]
    results[name] = dict(
        curve=curve, train_loss=train_loss, train_acc=train_acc,
        test_loss=test_loss, test_acc=test_acc, wall=wall,
        bias_norm=float(np.sqrt(np.sum(np.square(biases)))),
    )
  bar.close()
  return results


def table(results) -> str:
  rows = [
      '| optimizer | train acc | test acc | train loss | test loss '
      '| bias norm | wall (s) |',
      '| --- | ---: | ---: | ---: | ---: | ---: | ---: |',
  ]
  for name, r in results.items():
    rows.append(
        f'| `{name}` | {r["train_acc"]:.4f} | {r["test_acc"]:.4f} '
        f'| {r["train_loss"]:.4f} | {r["test_loss"]:.4f} '
        f'| {r["bias_norm"]:.3g} | {r["wall"]:.1f} |'
    )
  return '\n'.join(rows)


def plot(results, path: str) -> None:
  matplotlib = _require('matplotlib')
  matplotlib.use('Agg')
  plt = _require('matplotlib.pyplot')
  fig, ax = plt.subplots(figsize=(6, 4))
  for name, r in results.items():
    # Losses that reach exactly 0 are drawn at the floor of the log axis.
    curve = np.maximum(r['curve'], 1e-10)
    ax.plot(np.arange(1, len(curve) + 1), curve, label=name)
  ax.set_yscale('log')
  ax.set_ylim(bottom=1e-10)
  ax.set_xlabel('epoch')
  ax.set_ylabel('mean training loss')
  ax.set_title('MLP on scikit-learn digits')
  ax.legend(fontsize=8)
  fig.tight_layout()
  fig.savefig(path, dpi=120)
  plt.close(fig)


def main(argv=None) -> dict:
  parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  parser.add_argument('--epochs', type=int, default=60)
  parser.add_argument('--batch-size', type=int, default=64)
  parser.add_argument('--hidden', type=int, default=256)
  parser.add_argument('--depth', type=int, default=4, help='number of layers')
  parser.add_argument('--seed', type=int, default=0)
  parser.add_argument('--out', default='demo_results')
  args = parser.parse_args(argv)

  results = run(args.epochs, args.batch_size, args.hidden, args.depth,
                args.seed)
  os.makedirs(args.out, exist_ok=True)
  png = os.path.join(args.out, 'demo_loss.png')
  plot(results, png)
  settings = (
      f'{args.depth}-layer ReLU MLP, width {args.hidden}, zero-initialised '
      f'biases; {args.epochs} epochs, batch {args.batch_size}, seed '
      f'{args.seed}; jax {jax.__version__}, optax {optax.__version__}, '
      f'{jax.devices()[0].platform}, {platform.processor() or platform.machine()}'
      f', {os.cpu_count()} CPUs'
  )
  md = f'{table(results)}\n\n{settings}\n'
  with open(os.path.join(args.out, 'demo_results.md'), 'w') as f:
    f.write(f'# fromage_jax demo: digits\n\n![loss curves](demo_loss.png)\n\n{md}')
  print(f'\n{md}\nwrote {png} and {os.path.join(args.out, "demo_results.md")}')
  return results


if __name__ == '__main__':
  main()
