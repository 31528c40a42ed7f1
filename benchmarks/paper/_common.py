"""Shared pieces of the paper-figure scripts: data, bias-free MLPs, output."""

import pathlib

import jax
import jax.numpy as jnp
import numpy as np
import optax

from benchmarks import render
from benchmarks.common import RESULTS_DIR

# Defined in benchmarks.common, shared with the other benchmarks; re-exported
# for the scripts that use them from here.
from benchmarks.common import machine as machine
from benchmarks.common import to_jsonable as to_jsonable
from benchmarks.common import write_json as write_json


def load_digits():
  """All 1,797 of scikit-learn's 8x8 digits, standardised per pixel.

  The paper reports training-set numbers only, so everything is training data.
  """
  from sklearn import datasets

  x, y = datasets.load_digits(return_X_y=True)
  x = x.astype(np.float32)
  mean, std = x.mean(0), x.std(0)
  std = np.where(std > 0, std, 1.0)  # constant (blank) pixels stay unscaled
  return jnp.asarray((x - mean) / std), jnp.asarray(y.astype(np.int32))


def digits_split(test_size: float = 0.2, seed: int = 0):
  """The digits split for held-out figures, pixels scaled to [0, 1].

  Stratified by label (`seed`); returns `x_tr, y_tr, x_te, y_te` as numpy.
  """
  from sklearn import datasets
  from sklearn import model_selection

  x, y = datasets.load_digits(return_X_y=True)
  x_tr, x_te, y_tr, y_te = model_selection.train_test_split(
      x.astype(np.float32) / 16, y.astype(np.int32), test_size=test_size,
      random_state=seed, stratify=y)
  return x_tr, y_tr, x_te, y_te


def mlp_sizes(depth: int, width: int, d_in: int = 64, d_out: int = 10):
  """Layer sizes of a `depth`-layer MLP (`depth` weight matrices)."""
  return [d_in] + [width] * (depth - 1) + [d_out]


def init_mlp(key, sizes):
  """He-normal weight matrices, no biases: the paper's `L` matrices `W_l`."""
  keys = jax.random.split(key, len(sizes) - 1)
  return [
      jax.random.normal(k, (d_in, d_out)) * jnp.sqrt(2.0 / d_in)
      for k, d_in, d_out in zip(keys, sizes[:-1], sizes[1:], strict=True)
  ]


def mlp(params, x):
  """ReLU MLP without biases, normalisation or skip connections."""
  for w in params[:-1]:
    x = jax.nn.relu(x @ w)
  return x @ params[-1]


def loss_fn(params, x, y, model=mlp):
  logits = model(params, x)
  return optax.softmax_cross_entropy_with_integer_labels(logits, y).mean()


def accuracy(params, x, y, model=mlp):
  return jnp.mean(jnp.argmax(model(params, x), -1) == y)


def figure(ncols: int, nrows: int = 1, width: float = 5.0, height: float = 3.8):
  """A matplotlib figure and its axes grid, without pyplot (no backend)."""
  from matplotlib.figure import Figure

  fig = Figure(figsize=(width * ncols, height * nrows))
  axes = fig.subplots(nrows, ncols, squeeze=False)
  return fig, axes


def add_common_args(parser):
  parser.add_argument('--quick', action='store_true',
                      help='small sizes: seconds, for the tests and notebooks')
  parser.add_argument('--out', default=RESULTS_DIR,
                      help='where <name>.json, .md and .png go (default '
                      'benchmarks/results)')
  parser.add_argument('--json', default=None,
                      help='the JSON file of the run (default: '
                      '<out>/<name>.json)')


def publish(args, name: str, data: dict | None, page: str | None = None):
  """Writes a run's JSON (`--json`, else `<out>/<name>.json`) and renders it
  into `<out>/<page or name>.md`; with `data` None, renders the JSON of an
  earlier run (`--render`) there instead. Prints the page; returns its
  path."""
  out = pathlib.Path(args.out)
  out.mkdir(parents=True, exist_ok=True)
  path = out / f'{page or name}.md'
  if data is None:
    path = render.render(args.render, path)
  else:
    path = render.save(data, args.json or out / f'{name}.json', path)
  print(path.read_text())
  return path
