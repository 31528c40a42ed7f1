"""Shared data and model helpers for the demo and examples."""

import argparse
import importlib

import jax
import jax.numpy as jnp
import numpy as np
import optax


def require(module: str):
  """Imports `module`, or raises `ModuleNotFoundError` naming its extra."""
  try:
    return importlib.import_module(module)
  except ImportError as e:
    raise ModuleNotFoundError(
        f'{module} is missing: the demo and examples need the "examples" '
        'extra: pip install "fromage_jax[examples]" (in a checkout of the '
        'repository: pip install -e ".[examples]")',
        name=e.name,
    ) from e


def argument_parser(module: str, doc: str) -> argparse.ArgumentParser:
  """The parser of `python -m <module>`, described by `doc`'s first line."""
  return argparse.ArgumentParser(
      prog=f'python -m {module}', description=doc.splitlines()[0]
  )


def load_digits(seed: int, standardise: bool = True):
  """Digits as 64 pixels, split 80/20 with a fixed (stratified) seed.

  Returns `x_tr, y_tr, x_te, y_te`: pixels standardised with the training
  split's statistics, or with `standardise=False` scaled to [0, 1].
  """
  datasets = require('sklearn.datasets')
  model_selection = require('sklearn.model_selection')
  x, y = datasets.load_digits(return_X_y=True)
  # int32: the labels' dtype in JAX anyway (without x64).
  x_tr, x_te, y_tr, y_te = model_selection.train_test_split(
      x.astype(np.float32), y.astype(np.int32), test_size=0.2,
      random_state=seed, stratify=y,
  )
  if standardise:
    # Some pixels are constant in the training split: leave those unscaled.
    mean, std = x_tr.mean(0), x_tr.std(0)
    std = np.where(std > 0, std, 1.0)
  else:
    mean, std = 0.0, 16.0  # pixel values are 0 to 16
  return (x_tr - mean) / std, y_tr, (x_te - mean) / std, y_te


def minibatches(rng: np.random.Generator, n: int, batch_size: int):
  """One epoch's batches of indices into `n` examples, shuffled by `rng`.

  The last, partial batch is dropped.
  """
  perm = rng.permutation(n)
  for i in range(n // batch_size):
    yield perm[i * batch_size:(i + 1) * batch_size]


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


def accuracy(params, x, y) -> float:
  return float(jnp.mean(jnp.argmax(mlp(params, x), -1) == y))


def evaluate(params, x, y):
  """`(loss, accuracy)` of the MLP, as Python floats."""
  return float(loss_fn(params, x, y)), accuracy(params, x, y)


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
