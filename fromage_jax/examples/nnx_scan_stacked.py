"""Flax NNX: scanned residual blocks on digits, each block its own layer.

The blocks are created with `nnx.vmap` over a `Block`'s constructor and
applied with `nnx.scan` (flax's "scan over layers" pattern), so each of the
block's parameters is one `[num_blocks, ...]` array. Fromage must scale each
block by its own norm, not by the norm of the whole stack; one argument says
so:

    tx = fromage_jax.fromage(
        0.01, layer_axes=fromage_jax.stacked_layer_axes('blocks'))

The example prints each block's relative step `||dW_l|| / ||W_l||` on the
first batch, with and without `stacked_layer_axes` (with it, every block moves
by eta), then trains and prints train and test accuracy.

    python -m fromage_jax.examples.nnx_scan_stacked [--epochs 15] [--quick]
"""

import time

import jax
import numpy as np
import optax

import fromage_jax
from fromage_jax.examples._common import argument_parser
from fromage_jax.examples._common import load_digits
from fromage_jax.examples._common import minibatches
from fromage_jax.examples._common import require
from fromage_jax.examples._nnx import accuracy
from fromage_jax.examples._nnx import loss_fn
from fromage_jax.examples._nnx import train_step

nnx = require('flax.nnx')
tqdm = require('tqdm.auto').tqdm


class Block(nnx.Module):
  """Pre-norm residual MLP block: `x + W2 relu(W1 norm(x))`."""

  def __init__(self, width: int, rngs: nnx.Rngs):
    self.norm = nnx.LayerNorm(width, rngs=rngs)
    self.lin1 = nnx.Linear(width, 2 * width, rngs=rngs)
    self.lin2 = nnx.Linear(2 * width, width, rngs=rngs)

  def __call__(self, x):
    return x + self.lin2(jax.nn.relu(self.lin1(self.norm(x))))


class ResidualMLP(nnx.Module):
  """Embedding, `num_blocks` scanned `Block`s (in `self.blocks`), head."""

  def __init__(self, rngs: nnx.Rngs, width: int = 64, num_blocks: int = 4):
    self.embed = nnx.Linear(64, width, rngs=rngs)

    @nnx.split_rngs(splits=num_blocks)
    @nnx.vmap(in_axes=(0,), out_axes=0)
    def create_blocks(rngs: nnx.Rngs):
      return Block(width, rngs=rngs)

    self.blocks = create_blocks(rngs)  # every leaf: [num_blocks, ...]
    self.head_norm = nnx.LayerNorm(width, rngs=rngs)
    self.head = nnx.Linear(width, 10, rngs=rngs)

  def __call__(self, x):
    @nnx.scan(in_axes=(nnx.Carry, 0), out_axes=nnx.Carry)
    def forward(x, block: Block):
      return block(x)

    x = forward(self.embed(x), self.blocks)
    return self.head(self.head_norm(x))


def make_optimizer(learning_rate: float) -> optax.GradientTransformation:
  """Fromage with each slice of `blocks` along axis 0 as its own layer."""
  return fromage_jax.fromage(
      learning_rate, layer_axes=fromage_jax.stacked_layer_axes('blocks')
  )


@nnx.jit
def pure_params_and_grads(model, x, y):
  """The model's params and gradients as `nnx.State`s of arrays."""
  grads = nnx.grad(loss_fn)(model, x, y)
  return (nnx.as_pure(nnx.state(model, nnx.Param)),
          nnx.as_pure(nnx.state(grads, nnx.Param)))


def first_step_block_steps(model, x, y, learning_rate: float) -> dict:
  """Each block's relative step on one batch, with and without the axes.

  Returns:
    `{'stacked': ..., 'one layer': ...}`: for the first block kernel
    (`blocks.lin1.kernel`), its `num_blocks` relative steps.
  """
  params, grads = pure_params_and_grads(model, x, y)
  axes = fromage_jax.stacked_layer_axes('blocks')
  out = {}
  for name, tx in (('stacked', make_optimizer(learning_rate)),
                   ('one layer', fromage_jax.fromage(learning_rate))):

    @jax.jit
    def block_steps(params, grads, tx=tx):
      updates, _ = tx.update(grads, tx.init(params), params)
      rel = fromage_jax.relative_update_norms(updates, params, layer_axes=axes)
      return rel['blocks']['lin1']['kernel']

    out[name] = np.asarray(block_steps(params, grads))
  return out


@nnx.jit(static_argnums=(1, 2))
def create_model(rngs: nnx.Rngs, width: int, num_blocks: int):
  # Under jit, the vmapped init compiles once instead of running op by op.
  return ResidualMLP(rngs, width=width, num_blocks=num_blocks)


def train(epochs: int, batch_size: int, learning_rate: float, seed: int,
          width: int = 64, num_blocks: int = 4):
  """Trains the model; returns accuracies, wall time and first-step steps."""
  x_tr, y_tr, x_te, y_te = load_digits(seed)
  model = create_model(nnx.Rngs(seed), width, num_blocks)
  block_steps = first_step_block_steps(
      model, x_tr[:batch_size], y_tr[:batch_size], learning_rate
  )
  for name, steps in block_steps.items():
    print(f'first step, ||dW_l|| / ||W_l|| of blocks.lin1.kernel ({name}): '
          f'{np.array2string(steps, precision=4)}')
  optimizer = nnx.Optimizer(
      model, make_optimizer(learning_rate), wrt=nnx.Param
  )
  rng = np.random.default_rng(seed)
  steps = len(x_tr) // batch_size
  start = time.perf_counter()
  with tqdm(total=epochs * steps, desc='nnx scan', unit='step') as bar:
    for _ in range(epochs):
      for idx in minibatches(rng, len(x_tr), batch_size):
        loss = train_step(model, optimizer, x_tr[idx], y_tr[idx])
        bar.update()
      bar.set_postfix(loss=f'{float(loss):.3f}')
  return dict(
      train_acc=float(accuracy(model, x_tr, y_tr)),
      test_acc=float(accuracy(model, x_te, y_te)),
      wall=time.perf_counter() - start,
      block_steps=block_steps,
  )


def main(argv=None) -> dict:
  parser = argument_parser('fromage_jax.examples.nnx_scan_stacked', __doc__)
  parser.add_argument('--epochs', type=int, default=15)
  parser.add_argument('--batch-size', type=int, default=32)
  parser.add_argument('--learning-rate', type=float, default=0.01)
  parser.add_argument('--width', type=int, default=64)
  parser.add_argument('--blocks', type=int, default=4)
  parser.add_argument('--seed', type=int, default=0)
  parser.add_argument('--quick', action='store_true',
                      help='a few seconds: 3 epochs')
  args = parser.parse_args(argv)
  epochs = 3 if args.quick else args.epochs
  result = train(epochs, args.batch_size, args.learning_rate, args.seed,
                 width=args.width, num_blocks=args.blocks)
  print(f'train accuracy {result["train_acc"]:.4f}, '
        f'test accuracy {result["test_acc"]:.4f} '
        f'({epochs} epochs, {result["wall"]:.1f} s)')
  return result


if __name__ == '__main__':
  main()
