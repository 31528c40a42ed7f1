"""Flax Linen: an MLP on scikit-learn's digits, trained with Fromage.

`TrainState.create(apply_fn=..., params=..., tx=fromage_jax.fromage(0.01))`
and `state.apply_gradients(grads=grads)` inside a `jax.jit` train step:
`apply_gradients` passes the params to the optimizer, as Fromage requires.
Prints train and test accuracy.

    python -m fromage_jax.examples.linen_mlp_digits [--epochs 20] [--quick]
"""

import time

import jax
import jax.numpy as jnp
import numpy as np
import optax

import fromage_jax
from fromage_jax.examples._common import argument_parser
from fromage_jax.examples._common import load_digits
from fromage_jax.examples._common import minibatches
from fromage_jax.examples._common import require

nn = require('flax.linen')
train_state = require('flax.training.train_state')
tqdm = require('tqdm.auto').tqdm


class MLP(nn.Module):
  """ReLU MLP; Dense layers with zero-initialised biases."""

  hidden: int = 128
  depth: int = 3

  @nn.compact
  def __call__(self, x):
    for _ in range(self.depth - 1):
      x = nn.relu(nn.Dense(self.hidden)(x))
    return nn.Dense(10)(x)


@jax.jit
def train_step(state: train_state.TrainState, x, y):
  def loss_fn(params):
    logits = state.apply_fn({'params': params}, x)
    return optax.softmax_cross_entropy_with_integer_labels(logits, y).mean()

  loss, grads = jax.value_and_grad(loss_fn)(state.params)
  return state.apply_gradients(grads=grads), loss


@jax.jit
def accuracy(state: train_state.TrainState, x, y):
  logits = state.apply_fn({'params': state.params}, x)
  return jnp.mean(jnp.argmax(logits, -1) == y)


def train(epochs: int, batch_size: int, learning_rate: float, seed: int,
          hidden: int = 128, depth: int = 3):
  """Trains the MLP; returns a dict of train/test accuracy and wall time."""
  x_tr, y_tr, x_te, y_te = load_digits(seed)
  model = MLP(hidden=hidden, depth=depth)
  params = model.init(jax.random.key(seed), x_tr[:1])['params']
  state = train_state.TrainState.create(
      apply_fn=model.apply, params=params,
      tx=fromage_jax.fromage(learning_rate),
  )
  rng = np.random.default_rng(seed)
  steps = len(x_tr) // batch_size
  start = time.perf_counter()
  with tqdm(total=epochs * steps, desc='linen mlp', unit='step') as bar:
    for _ in range(epochs):
      for idx in minibatches(rng, len(x_tr), batch_size):
        state, loss = train_step(state, x_tr[idx], y_tr[idx])
        bar.update()
      bar.set_postfix(loss=f'{float(loss):.3f}')
  return dict(
      train_acc=float(accuracy(state, x_tr, y_tr)),
      test_acc=float(accuracy(state, x_te, y_te)),
      wall=time.perf_counter() - start,
  )


def main(argv=None) -> dict:
  parser = argument_parser('fromage_jax.examples.linen_mlp_digits', __doc__)
  parser.add_argument('--epochs', type=int, default=20)
  parser.add_argument('--batch-size', type=int, default=32)
  parser.add_argument('--learning-rate', type=float, default=0.01)
  parser.add_argument('--hidden', type=int, default=128)
  parser.add_argument('--depth', type=int, default=3, help='number of layers')
  parser.add_argument('--seed', type=int, default=0)
  parser.add_argument('--quick', action='store_true',
                      help='a few seconds: 3 epochs')
  args = parser.parse_args(argv)
  epochs = 3 if args.quick else args.epochs
  result = train(epochs, args.batch_size, args.learning_rate, args.seed,
                 hidden=args.hidden, depth=args.depth)
  print(f'train accuracy {result["train_acc"]:.4f}, '
        f'test accuracy {result["test_acc"]:.4f} '
        f'({epochs} epochs, {result["wall"]:.1f} s)')
  return result


if __name__ == '__main__':
  main()
