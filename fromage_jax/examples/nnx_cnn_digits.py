"""Flax NNX: a small CNN on scikit-learn's 8x8 digits, trained with Fromage.

`nnx.Optimizer(model, fromage_jax.fromage(0.01), wrt=nnx.Param)` and
`optimizer.update(model, grads)` inside an `nnx.jit` train step: Fromage is an
ordinary optax transformation, and `nnx.Optimizer` hands it the params it
needs. Prints train and test accuracy.

    python -m fromage_jax.examples.nnx_cnn_digits [--epochs 15] [--quick]
"""

import time

import jax
import numpy as np

import fromage_jax
from fromage_jax.examples._common import argument_parser
from fromage_jax.examples._common import load_digits
from fromage_jax.examples._common import minibatches
from fromage_jax.examples._common import require
from fromage_jax.examples._nnx import accuracy
from fromage_jax.examples._nnx import train_step

nnx = require('flax.nnx')
tqdm = require('tqdm.auto').tqdm


class CNN(nnx.Module):
  """Two 3x3 convolutions, 2x2 average pooling and a two-layer head."""

  def __init__(self, rngs: nnx.Rngs, channels: int = 16, hidden: int = 64):
    self.conv1 = nnx.Conv(1, channels, (3, 3), rngs=rngs)
    self.conv2 = nnx.Conv(channels, 2 * channels, (3, 3), rngs=rngs)
    self.fc = nnx.Linear(4 * 4 * 2 * channels, hidden, rngs=rngs)
    self.out = nnx.Linear(hidden, 10, rngs=rngs)

  def __call__(self, x):
    x = jax.nn.relu(self.conv1(x))
    x = jax.nn.relu(self.conv2(x))
    x = nnx.avg_pool(x, window_shape=(2, 2), strides=(2, 2))
    x = jax.nn.relu(self.fc(x.reshape(x.shape[0], -1)))
    return self.out(x)


def train(epochs: int, batch_size: int, learning_rate: float, seed: int,
          channels: int = 16):
  """Trains the CNN; returns a dict of train/test accuracy and wall time."""
  x_tr, y_tr, x_te, y_te = load_digits(seed, standardise=False)
  # [N, 8, 8, 1] images for the convolutions.
  x_tr, x_te = x_tr.reshape(-1, 8, 8, 1), x_te.reshape(-1, 8, 8, 1)
  model = CNN(nnx.Rngs(seed), channels=channels)
  optimizer = nnx.Optimizer(
      model, fromage_jax.fromage(learning_rate), wrt=nnx.Param
  )
  rng = np.random.default_rng(seed)
  steps = len(x_tr) // batch_size
  start = time.perf_counter()
  with tqdm(total=epochs * steps, desc='nnx cnn', unit='step') as bar:
    for _ in range(epochs):
      for idx in minibatches(rng, len(x_tr), batch_size):
        loss = train_step(model, optimizer, x_tr[idx], y_tr[idx])
        bar.update()
      bar.set_postfix(loss=f'{float(loss):.3f}')
  return dict(
      train_acc=float(accuracy(model, x_tr, y_tr)),
      test_acc=float(accuracy(model, x_te, y_te)),
      wall=time.perf_counter() - start,
  )


def main(argv=None) -> dict:
  parser = argument_parser('fromage_jax.examples.nnx_cnn_digits', __doc__)
  parser.add_argument('--epochs', type=int, default=15)
  parser.add_argument('--batch-size', type=int, default=32)
  parser.add_argument('--learning-rate', type=float, default=0.01)
  parser.add_argument('--seed', type=int, default=0)
  parser.add_argument('--quick', action='store_true',
                      help='a few seconds: 3 epochs of a narrower CNN')
  args = parser.parse_args(argv)
  epochs, channels = (3, 8) if args.quick else (args.epochs, 16)
  result = train(epochs, args.batch_size, args.learning_rate, args.seed,
                 channels=channels)
  print(f'train accuracy {result["train_acc"]:.4f}, '
        f'test accuracy {result["test_acc"]:.4f} '
        f'({epochs} epochs, {result["wall"]:.1f} s)')
  return result


if __name__ == '__main__':
  main()
